//! Graceful upgrade of a running `thinblk serve` (SIGUSR2, or QMP `x-thinblk-upgrade`): the
//! process replaces itself with a new binary without a moment where a socket is missing.
//!
//! 1. The new binary is checked first (`BINARY --version` must succeed); if it fails, nothing
//!    changes and the daemon keeps serving.
//! 2. Every export stops serving but keeps its listening socket (`Export::hand_over`): the
//!    frontend's session ends as after a crash, once every request it had in flight completed
//!    and was returned to the guest; no new session starts.
//! 3. The pool commits (what completed is durable for the next process).
//! 4. The listening sockets of the exports and of the control socket are passed through exec,
//!    named in `THINBLK_LISTEN_FDS` (`sockets::inherited`), and the process execs the binary
//!    with its own arguments. A frontend that reconnects meanwhile (QEMU's `reconnect=`) waits
//!    in a socket's backlog and is served by the new process, which resubmits what was in
//!    flight with INFLIGHT_SHMFD (nothing, after a graceful stop).
//!
//! The default binary is the file at the path this process was started from (its
//! `/proc/self/exe` as it was at start), so installing a new build over the old path and
//! sending SIGUSR2 upgrades. If the exec fails after the exports stopped, the old binary is
//! executed again from `/proc/self/exe` (which still reaches it when its file was replaced).
//! Exports added over QMP are not part of the command line, so the new process does not have
//! them (their sockets are closed) until the `ops` state file keeps them.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use parking_lot::Mutex;

use super::state::State;
use crate::control::ControlServer;
use crate::engine::thin::Volumes;
use crate::sockets::inherited;

/// Why an upgrade did not start (the daemon serves on as before).
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("upgrades are only possible in a running thinblk serve")]
    NotServing,
    #[error("{}: cannot run it: {source}", .binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: '--version' failed ({status})", .binary.display())]
    Broken { binary: PathBuf, status: String },
    #[error("{}: '--version' did not finish within 10 s", .binary.display())]
    Hangs { binary: PathBuf },
    #[error("cannot raise SIGUSR2: {0}")]
    Signal(std::io::Error),
}

/// The binary and arguments this process started with.
struct Start {
    binary: PathBuf,
    args: Vec<OsString>,
}

static START: OnceLock<Start> = OnceLock::new();
static ARMED: AtomicBool = AtomicBool::new(false);
/// The binary a QMP client asked for, for the SIGUSR2 it raised.
static REQUESTED: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Called by `serve` first of all: takes over inherited sockets, remembers what to exec.
pub fn at_start() {
    inherited::adopt();
    let binary = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    let _ = START.set(Start {
        binary,
        args: std::env::args_os().skip(1).collect(),
    });
    ARMED.store(true, Ordering::Release);
}

/// Runs `binary --version`: a binary that cannot even say its version is not exec'd.
pub fn check_binary(binary: &Path) -> Result<(), UpgradeError> {
    let mut child = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| UpgradeError::Spawn {
            binary: binary.to_path_buf(),
            source,
        })?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                return Err(UpgradeError::Broken {
                    binary: binary.to_path_buf(),
                    status: status.to_string(),
                })
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(UpgradeError::Hangs {
                    binary: binary.to_path_buf(),
                });
            }
        }
    }
}

/// For QMP: checks `binary` (default: the start binary's path) and asks the serving thread to
/// upgrade to it (SIGUSR2). Returns once the upgrade is under way.
pub fn request(binary: Option<PathBuf>) -> Result<(), UpgradeError> {
    if !ARMED.load(Ordering::Acquire) {
        return Err(UpgradeError::NotServing);
    }
    let binary = match binary {
        Some(b) => b,
        None => START
            .get()
            .map(|s| s.binary.clone())
            .ok_or(UpgradeError::NotServing)?,
    };
    check_binary(&binary)?;
    *REQUESTED.lock() = Some(binary);
    // SAFETY: kill with our own pid and a valid signal; SIGUSR2 is blocked in every thread
    // and taken by the serving thread's sigwait.
    if unsafe { libc::kill(libc::getpid(), libc::SIGUSR2) } != 0 {
        return Err(UpgradeError::Signal(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Upgrades in place (see the module comment). Returns only if the new binary was refused
/// before anything stopped; the daemon then serves on.
pub fn upgrade(
    state: &State,
    thin: Option<&Arc<Volumes>>,
    control: Option<&ControlServer>,
) -> UpgradeError {
    let Some(start) = START.get() else {
        return UpgradeError::NotServing;
    };
    let binary = REQUESTED
        .lock()
        .take()
        .unwrap_or_else(|| start.binary.clone());
    if let Err(e) = check_binary(&binary) {
        return e;
    }
    info!("upgrade to {}: stopping the exports", binary.display());
    let began = Instant::now();
    let mut sockets = state.hand_over_exports();
    if let Some((path, listener)) = control.and_then(ControlServer::listening) {
        if let Ok(l) = listener.try_clone() {
            sockets.push((path.to_path_buf(), l));
        }
    }
    if let Some(thin) = thin {
        thin.pool().close();
    }
    // The new process takes the locks of a pool on RBD as a new owner would.
    super::rbd_pool::release_locks();
    // Duplicates without FD_CLOEXEC: they, and nothing else of ours, survive the exec.
    let mut passed = Vec::new();
    for (path, listener) in &sockets {
        // SAFETY: dup of a listening socket we own; the new fd is ours to pass on.
        let fd: RawFd = unsafe { libc::dup(listener.as_raw_fd()) };
        if fd < 0 {
            warn!(
                "{}: cannot pass the socket on: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
            continue;
        }
        passed.push((fd, path.as_path()));
    }
    let env = OsString::from_vec(inherited::encode(&passed));
    info!(
        "upgrade: exports stopped and pool committed in {} ms; exec {}",
        began.elapsed().as_millis(),
        binary.display()
    );
    let e = Command::new(&binary)
        .args(&start.args)
        .env(inherited::ENV, &env)
        .envs(super::standby::upgrade_env(state))
        .exec();
    error!(
        "upgrade: exec {} failed: {e}; running the old binary again",
        binary.display()
    );
    let e = Command::new("/proc/self/exe")
        .args(&start.args)
        .env(inherited::ENV, &env)
        .envs(super::standby::upgrade_env(state))
        .exec();
    error!("upgrade: exec of the old binary failed too: {e}; exiting");
    std::process::exit(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binary_that_cannot_say_its_version_is_refused() {
        assert!(check_binary(Path::new("/bin/true")).is_ok());
        assert!(matches!(
            check_binary(Path::new("/bin/false")),
            Err(UpgradeError::Broken { .. })
        ));
        assert!(matches!(
            check_binary(Path::new("/nonexistent/thinblk")),
            Err(UpgradeError::Spawn { .. })
        ));
    }
}
