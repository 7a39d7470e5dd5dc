//! The daemon's one accept thread: it watches the listening socket of every export, so that
//! an export no frontend is connected to costs no thread, only its socket.
//!
//! An export serves one frontend at a time, and a frontend connecting meanwhile waits in the
//! socket's backlog: the socket is watched one-shot, and the export watches it again
//! ([`Rearm::rearm`]) when its session ended. Dropping the [`Attachment`] stops watching it,
//! waiting for an accept in progress.

use std::io;
use std::os::fd::RawFd;
use std::sync::OnceLock;

use super::event_thread::EventThread;
pub use super::event_thread::{Attachment, Rearm, Run};

static THREAD: OnceLock<Result<&'static EventThread, String>> = OnceLock::new();

/// Calls the callback `make` returns when the listening socket `fd` is readable, once until
/// rearmed through the handle `make` gets (before `fd` is watched: a frontend that waits in
/// the backlog already is accepted only after `make` ran).
pub fn watch(fd: RawFd, make: impl FnOnce(Rearm) -> Run) -> io::Result<Attachment> {
    let thread = THREAD
        .get_or_init(|| EventThread::start("accept".into(), |_| {}).map_err(|e| e.to_string()));
    match thread {
        Ok(thread) => thread.attach_with(fd, 0, true, make),
        Err(e) => Err(io::Error::other(format!(
            "cannot start the accept thread: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn a_socket_is_accepted_from_once_until_rearmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = Arc::new(UnixListener::bind(&path).unwrap());
        listener.set_nonblocking(true).unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (l, a) = (listener.clone(), accepted.clone());
        let rearm = Arc::new(OnceLock::new());
        let r = rearm.clone();
        let watched = watch(listener.as_raw_fd(), |handle| {
            let _ = r.set(handle);
            Box::new(move || {
                if l.accept().is_ok() {
                    a.fetch_add(1, Ordering::SeqCst);
                }
                true
            })
        })
        .unwrap();
        let wait_for = |n: usize| {
            let deadline = Instant::now() + Duration::from_secs(20);
            while accepted.load(Ordering::SeqCst) < n {
                assert!(Instant::now() < deadline, "never accepted {n}");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let _first = UnixStream::connect(&path).unwrap();
        let _second = UnixStream::connect(&path).unwrap();
        wait_for(1);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "accepted before the rearm"
        );
        rearm.get().unwrap().rearm();
        wait_for(2);
        drop(watched);
    }

    /// A frontend that connected and left before the socket was watched (a probe, say) is
    /// accepted at once; the first callback already holds the handle that watches the socket
    /// again, so the frontend waiting behind it is accepted too.
    #[test]
    fn the_first_callback_can_rearm_a_socket_a_frontend_waited_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = Arc::new(UnixListener::bind(&path).unwrap());
        listener.set_nonblocking(true).unwrap();
        drop(UnixStream::connect(&path).unwrap());
        let _waiting = UnixStream::connect(&path).unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (l, a) = (listener.clone(), accepted.clone());
        let watched = watch(listener.as_raw_fd(), |rearm| {
            Box::new(move || {
                if l.accept().is_ok() {
                    a.fetch_add(1, Ordering::SeqCst);
                }
                rearm.rearm();
                true
            })
        })
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while accepted.load(Ordering::SeqCst) < 2 {
            assert!(
                Instant::now() < deadline,
                "the waiting frontend was never accepted"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(watched);
    }
}
