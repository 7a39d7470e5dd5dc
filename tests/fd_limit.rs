//! The daemon raises its soft descriptor limit to the hard one at start (issue 23: 500
//! exports need more than the usual 1024).

#![allow(clippy::unwrap_used)]

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn max_open_files(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_string();
    let fields: Vec<&str> = line.split_whitespace().collect();
    (fields[3].to_string(), fields[4].to_string())
}

#[test]
fn serve_raises_the_soft_descriptor_limit_to_the_hard_one() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("null.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_thinblk"));
    cmd.arg("serve")
        .arg("--export")
        .arg(format!("null=1G,socket={}", socket.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only async-signal-safe setrlimit between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 256,
                rlim_max: 4096,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "thinblk did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (soft, hard) = max_open_files(child.id());
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(hard, "4096");
    assert_eq!(soft, "4096", "the soft limit was not raised");
}
