//! `thinblk generate man DIR` and `thinblk generate completions SHELL [DIR]`.
#![allow(clippy::unwrap_used)]

use std::process::Command;

fn thinblk(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_thinblk"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "thinblk {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn man_pages_cover_every_subcommand_and_its_flags() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("man1");
    thinblk(&["generate", "man", dir.to_str().unwrap()]);
    for page in [
        "thinblk",
        "thinblk-serve",
        "thinblk-check",
        "thinblk-ctl",
        "thinblk-generate",
    ] {
        let text = std::fs::read_to_string(dir.join(format!("{page}.1"))).unwrap();
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page} is not roff"
        );
    }
    let serve = std::fs::read_to_string(dir.join("thinblk-serve.1")).unwrap();
    for flag in ["socket\\-group", "config", "control\\-mode"] {
        assert!(serve.contains(flag), "thinblk-serve.1 lacks {flag}");
    }
    assert!(!dir.join("thinblk-help.1").exists());
}

#[test]
fn completions_are_written_for_each_shell_and_bash_parses_its_own() {
    let d = tempfile::tempdir().unwrap();
    for (shell, file) in [
        ("bash", "thinblk.bash"),
        ("zsh", "_thinblk"),
        ("fish", "thinblk.fish"),
    ] {
        thinblk(&["generate", "completions", shell, d.path().to_str().unwrap()]);
        let text = std::fs::read_to_string(d.path().join(file)).unwrap();
        assert!(
            text.contains("serve") && text.contains("socket-group"),
            "{shell}"
        );
    }
    let stdout = thinblk(&["generate", "completions", "bash"]).stdout;
    assert!(String::from_utf8_lossy(&stdout).contains("_thinblk"));
    let check = Command::new("bash")
        .arg("-n")
        .arg(d.path().join("thinblk.bash"))
        .status()
        .expect("bash is needed to check the bash completion");
    assert!(check.success());
}
