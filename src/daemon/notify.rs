//! systemd's service notification protocol (`Type=notify`): state lines such as `READY=1`
//! sent as one datagram to the unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` for
//! the abstract namespace). Without that variable nothing is sent. A few lines over a
//! datagram socket, so no libsystemd and no crate.

use std::io;
use std::os::unix::net::UnixDatagram;

use log::{debug, warn};

/// Sends `state` (newline-separated `KEY=VALUE` lines) to the service manager, if there is
/// one. Failures are logged, never fatal: a daemon runs the same with or without systemd.
pub fn notify(state: &str) {
    match send(state) {
        Ok(true) => debug!("told the service manager {}", state.replace('\n', " ")),
        Ok(false) => {}
        Err(e) => warn!("cannot notify the service manager ({state}): {e}"),
    }
}

/// `Ok(false)` when `$NOTIFY_SOCKET` is unset or empty.
fn send(state: &str) -> io::Result<bool> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET").filter(|t| !t.is_empty()) else {
        return Ok(false);
    };
    let sock = UnixDatagram::unbound()?;
    let bytes = target.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?
    } else {
        sock.send_to(state.as_bytes(), &target)?
    };
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short datagram to NOTIFY_SOCKET",
        ));
    }
    Ok(true)
}

/// Everything listens: the manager may start what depends on us.
pub fn ready(exports: usize) {
    notify(&format!(
        "READY=1\nMAINPID={}\nSTATUS=serving {exports} export(s)",
        std::process::id()
    ));
}

/// Shutdown has begun.
pub fn stopping() {
    notify("STOPPING=1\nSTATUS=stopping");
}

/// A configuration reload has begun; `ready` follows when it is done.
pub fn reloading() {
    notify("RELOADING=1\nSTATUS=reloading the configuration");
}
