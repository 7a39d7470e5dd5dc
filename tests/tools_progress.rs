//! Offline tools draw progress on a terminal and nothing else when stderr is not one.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;

/// A small pool's metadata, written by a daemon that then stops.
fn pool() -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("pool");
    let args: Vec<String> = ["--metadata-size", "16M", "--data-size", "64M", "--export"]
        .iter()
        .map(|s| s.to_string())
        .chain([
            "name=vm,size=1M".to_string(),
            "--dir".into(),
            dir.to_str().unwrap().into(),
        ])
        .collect();
    drop(Daemon::start(&args, &[&dir.join("control.sock")]));
    (d, dir.join("metadata"))
}

#[test]
fn no_progress_is_drawn_when_stderr_is_not_a_terminal() {
    let (_d, meta) = pool();
    let bin = env!("CARGO_BIN_EXE_thinblk");
    let check = Command::new(bin).arg("check").arg(&meta).output().unwrap();
    assert!(check.status.success());
    let err = String::from_utf8_lossy(&check.stderr);
    assert!(err.contains("examining superblock"), "{err}");
    assert!(!err.contains('\x1b') && !err.contains('\r'), "{err:?}");
    let dump = Command::new(bin).arg("dump").arg(&meta).output().unwrap();
    assert!(dump.status.success());
    assert!(
        dump.stderr.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&dump.stderr)
    );
}

#[test]
fn check_draws_a_bar_on_a_terminal_and_still_prints_its_findings() {
    let (_d, meta) = pool();
    // `script` (util-linux) runs the command on a pseudo-terminal.
    let cmd = format!("{} check {}", env!("CARGO_BIN_EXE_thinblk"), meta.display());
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .expect("script (util-linux) is needed to give the tool a terminal");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("metadata blocks"), "{text:?}");
    assert!(text.contains("examining superblock"), "{text:?}");
    assert!(text.contains("TRANSACTION_ID="), "{text:?}");
}
