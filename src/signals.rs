//! Waiting for SIGINT/SIGTERM (stop), SIGHUP (re-read the configuration) and SIGUSR2
//! (graceful upgrade, `daemon/upgrade.rs`) without async signal handlers: the signals are
//! blocked in every thread (threads inherit the mask) and one thread collects them with
//! sigwait.

use std::io;

pub struct TerminationSignals {
    set: libc::sigset_t,
}

/// Blocks SIGINT, SIGTERM, SIGHUP and SIGUSR2 in this thread and every thread it starts
/// afterwards.
pub fn block_termination() -> io::Result<TerminationSignals> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame; the calls only write to it and to
    // this thread's signal mask.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGUSR2);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(TerminationSignals { set })
}

impl TerminationSignals {
    /// Waits for one of the signals and returns its number.
    pub fn wait(&self) -> io::Result<i32> {
        let mut sig = 0;
        // SAFETY: `self.set` was initialised by block_termination and `sig` is a valid out slot.
        let rc = unsafe { libc::sigwait(&self.set, &mut sig) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(sig)
    }
}
