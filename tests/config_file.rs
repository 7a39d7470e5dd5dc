//! `thinblk serve --config FILE`: the file says what flags say, the command line overrides
//! it, and SIGHUP re-reads its exports.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn next_message(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .expect("no notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().mode() & 0o777
}

fn write_config(path: &Path, pool: &Path, exports: &[&str]) {
    let list: Vec<String> = exports.iter().map(|e| format!("  \"{e}\",")).collect();
    let text = format!(
        "dir = \"{}\"\nmetadata-size = \"16M\"\ndata-size = \"64M\"\nsocket-mode = \"0660\"\n\
         export = [\n{}\n  {{ name = \"t\", size = \"1M\" }},\n]\n",
        pool.display(),
        list.join("\n")
    );
    std::fs::write(path, text).unwrap();
}

#[test]
fn the_file_sets_flags_the_command_line_overrides_and_sighup_reloads_exports() {
    let d = tempfile::tempdir().unwrap();
    let pool = d.path().join("pool");
    let conf = d.path().join("thinblk.toml");
    let sock = |n: &str| d.path().join(format!("{n}.sock"));
    let null = |n: &str| format!("null=1M,socket={}", sock(n).display());
    write_config(&conf, &pool, &[&null("a"), &null("b")]);
    let notify_path = d.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_thinblk"))
        .arg("serve")
        .arg("--config")
        .arg(&conf)
        .args(["--socket-mode", "0640", "--export", &null("cli")])
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let ready = next_message(&notify);
    let at_start = ["a", "b", "cli"].map(|n| UnixStream::connect(sock(n)).is_ok());
    let thin_at_start = UnixStream::connect(pool.join("t.sock")).is_ok();
    let mode_at_start = mode(&sock("a"));
    // b changes (a key added), a goes, c comes; t and the command line's export stay.
    write_config(
        &conf,
        &pool,
        &[&format!("{},queues=1", null("b")), &null("c")],
    );
    // SAFETY: kill with a pid we own has no memory effects.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let reloading = next_message(&notify);
    let ready_again = next_message(&notify);
    let after = ["a", "b", "c", "cli"].map(|n| UnixStream::connect(sock(n)).is_ok());
    let thin_after = UnixStream::connect(pool.join("t.sock")).is_ok();
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(ready.contains("READY=1"), "{ready:?}");
    assert_eq!(at_start, [true, true, true]);
    assert!(thin_at_start, "the file's table export did not start");
    assert_eq!(
        mode_at_start, 0o640,
        "the command line's --socket-mode wins"
    );
    assert!(reloading.contains("RELOADING=1"), "{reloading:?}");
    assert!(ready_again.contains("READY=1"), "{ready_again:?}");
    assert_eq!(after, [false, true, true, true], "a b c cli after SIGHUP");
    assert!(thin_after);
    assert!(status.success());
}

#[test]
fn an_unknown_key_is_named_and_nothing_starts() {
    let d = tempfile::tempdir().unwrap();
    let conf = d.path().join("bad.toml");
    std::fs::write(&conf, "colour = \"red\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_thinblk"))
        .current_dir(d.path())
        .args(["serve", "--config"])
        .arg(&conf)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("'colour'"), "{err}");
    assert!(!d.path().join("thinblk-pool").exists());
}

#[test]
fn serve_help_shows_a_configuration_example() {
    let out = Command::new(env!("CARGO_BIN_EXE_thinblk"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--config <FILE>"), "{help}");
    assert!(help.contains("socket-group = \"libvirt-qemu\""), "{help}");
    assert!(help.contains("SIGHUP"), "{help}");
}

#[test]
fn a_saved_export_the_file_stood_in_for_comes_back_when_the_file_drops_it() {
    let d = tempfile::tempdir().unwrap();
    let pool = d.path().join("pool");
    let conf = d.path().join("thinblk.toml");
    let ctl = pool.join("control.sock");
    let write = |exports: &str| {
        let text = format!(
            "dir = \"{}\"\nmetadata-size = \"16M\"\ndata-size = \"64M\"\nexport = [{exports}]\n",
            pool.display()
        );
        std::fs::write(&conf, text).unwrap();
    };
    let notify_path = d.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let start = || {
        let child = Command::new(env!("CARGO_BIN_EXE_thinblk"))
            .arg("serve")
            .arg("--config")
            .arg(&conf)
            .env("NOTIFY_SOCKET", &notify_path)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        assert!(next_message(&notify).contains("READY=1"));
        child
    };
    let stop = |mut child: std::process::Child| {
        // SAFETY: kill with a pid we own has no memory effects.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = next_message(&notify); // STOPPING=1
        assert!(child.wait().unwrap().success());
    };
    // A first run saves an export w made over QMP, at qw.sock.
    write("\"name=vm,size=1M\"");
    let child = start();
    let mut qmp = std::io::BufReader::new(UnixStream::connect(&ctl).unwrap());
    let mut exec = |cmd: &str| {
        use std::io::{BufRead, Write};
        qmp.get_mut().write_all(cmd.as_bytes()).unwrap();
        let mut line = String::new();
        while !line.contains("\"return\"") && !line.contains("\"error\"") {
            line.clear();
            qmp.read_line(&mut line).unwrap();
        }
        assert!(line.contains("\"return\""), "{cmd}: {line}");
    };
    exec(r#"{"execute": "qmp_capabilities"}"#);
    exec(r#"{"execute": "thin-create", "arguments": {"name": "w", "size": 1048576}}"#);
    exec(&format!(
        r#"{{"execute": "block-export-add", "arguments": {{"type": "vhost-user-blk",
            "id": "w", "node-name": "w", "addr": {{"type": "unix", "path": "{}"}}}}}}"#,
        pool.join("qw.sock").display()
    ));
    stop(child);
    // The file now exports w itself: it wins, at w.sock.
    write("\"name=vm,size=1M\", \"name=w\"");
    let child = start();
    let file_wins = (
        UnixStream::connect(pool.join("w.sock")).is_ok(),
        pool.join("qw.sock").exists(),
    );
    // The file drops w: the saved export starts again at qw.sock.
    write("\"name=vm,size=1M\"");
    // SAFETY: kill with a pid we own has no memory effects.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let _ = next_message(&notify); // RELOADING=1
    assert!(next_message(&notify).contains("READY=1"));
    let after = (
        pool.join("w.sock").exists(),
        UnixStream::connect(pool.join("qw.sock")).is_ok(),
    );
    stop(child);
    assert_eq!(file_wins, (true, false));
    assert_eq!(after, (false, true), "(w.sock, qw.sock) after the reload");
    let saved = std::fs::read_to_string(pool.join("exports.json")).unwrap();
    assert!(saved.contains("qw.sock"), "{saved}");
}
