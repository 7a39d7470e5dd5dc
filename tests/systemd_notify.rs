//! `Type=notify`: READY=1 reaches $NOTIFY_SOCKET only once every socket accepts, and
//! STOPPING=1 when SIGTERM stops the daemon. The test plays systemd's part: it binds the
//! datagram socket and reads what the daemon sends.
#![allow(clippy::unwrap_used)]

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::process::{Command, Stdio};
use std::time::Duration;

fn next_message(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .expect("no notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn ready_comes_after_every_socket_listens_and_stopping_at_sigterm() {
    let d = tempfile::tempdir().unwrap();
    let notify_path = d.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let dir = d.path().join("pool");
    let mut child = Command::new(env!("CARGO_BIN_EXE_thinblk"))
        .arg("serve")
        .arg("--dir")
        .arg(&dir)
        .args(["--metadata-size", "16M", "--data-size", "64M"])
        .args(["--export", "name=a,size=1M", "--export", "name=b,size=1M"])
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let first = next_message(&notify);
    // At the moment READY arrives, every socket must already accept.
    let accepting: Vec<bool> = ["a.sock", "b.sock", "control.sock"]
        .iter()
        .map(|s| UnixStream::connect(dir.join(s)).is_ok())
        .collect();
    // SAFETY: kill with a pid we own has no memory effects.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let second = next_message(&notify);
    let status = child.wait().unwrap();
    assert!(first.lines().any(|l| l == "READY=1"), "first: {first:?}");
    assert!(
        first.contains(&format!("MAINPID={}", child.id())),
        "first: {first:?}"
    );
    assert_eq!(
        accepting,
        [true, true, true],
        "READY before the sockets listened"
    );
    assert!(
        second.lines().any(|l| l == "STOPPING=1"),
        "then: {second:?}"
    );
    assert!(status.success());
}

#[test]
fn an_abstract_notify_socket_is_reached_too() {
    use std::os::linux::net::SocketAddrExt;
    let d = tempfile::tempdir().unwrap();
    let name = format!("thinblk-test-notify-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let notify = UnixDatagram::bind_addr(&addr).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_thinblk"))
        .arg("serve")
        .arg("--export")
        .arg(format!(
            "null=1M,socket={}",
            d.path().join("n.sock").display()
        ))
        .env("NOTIFY_SOCKET", format!("@{name}"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let first = next_message(&notify);
    let _ = child.kill();
    let _ = child.wait();
    assert!(first.lines().any(|l| l == "READY=1"), "{first:?}");
}
