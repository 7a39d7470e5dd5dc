//! Starting and stopping the daemon.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn wait_exit(
    child: &mut std::process::Child,
    within: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn sigterm_stops_the_daemon_even_after_its_socket_was_removed() {
    let s = scratch(1 << 20);
    let mut child = Command::new(env!("CARGO_BIN_EXE_thinblk"))
        .arg("serve")
        .args(raw_export(&s, ""))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !s.socket.exists() {
        assert!(Instant::now() < deadline, "socket never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::remove_file(&s.socket).unwrap();
    // SAFETY: kill with a pid we own has no memory effects.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_exit(&mut child, Duration::from_secs(10));
    if status.is_none() {
        let _ = child.kill();
    }
    assert!(status.expect("thinblk did not exit within 10 s").success());
}

#[test]
fn a_live_socket_is_not_taken_over() {
    let s = scratch(1 << 20);
    let _first = Daemon::start(&raw_export(&s, ""), &[&s.socket]);
    let out = Command::new(env!("CARGO_BIN_EXE_thinblk"))
        .arg("serve")
        .args(raw_export(&s, ""))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "stderr: {err}");
}

#[test]
fn help_explains_every_export_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_thinblk"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for key in [
        "raw=",
        "socket=",
        "id=",
        "queues=",
        "queue-size=",
        "readonly=",
        "direct=",
    ] {
        assert!(help.contains(key), "serve --help does not explain {key}");
    }
}

#[test]
fn sigterm_stops_the_daemon_while_a_frontend_is_connected() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let args: Vec<String> = [
        "--dir",
        dir.path().to_str().unwrap(),
        "--metadata-size",
        "16M",
        "--data-size",
        "64M",
        "--export",
        "name=vm,size=1M",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut child = Command::new(env!("CARGO_BIN_EXE_thinblk"))
        .arg("serve")
        .args(&args)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut client = loop {
        if let Ok(c) = Client::try_connect(&sock, 1) {
            break c;
        }
        assert!(Instant::now() < deadline, "never connected");
        std::thread::sleep(Duration::from_millis(20));
    };
    let p = client.buf_ptr(0);
    assert_eq!(write(&mut client.queues[0], p, 0, 4096), 0);
    // SAFETY: kill with a pid we own has no memory effects.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_exit(&mut child, Duration::from_secs(10));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(
        status
            .expect("thinblk did not exit within 10 s of SIGTERM")
            .success(),
        "thinblk failed to stop cleanly"
    );
    drop(client);
}
