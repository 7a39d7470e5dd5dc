//! Wakes queue workers whose throttled requests may go: one thread for the whole daemon
//! (started by the first throttled request) writes to the queue's completion eventfd at the
//! time a request was told to wait until. The worker then reaps as for a completion, and the
//! queue submits what its limits now allow. No thread per export, and nothing added to the
//! worker's epoll.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

use log::warn;
use parking_lot::{Condvar, Mutex};

/// A queue's eventfd (a duplicate of it, so the queue's own stays its own) and whether this
/// timer wrote to it since the queue last looked.
pub struct Waker {
    fd: OwnedFd,
    woken: AtomicBool,
}

impl Waker {
    /// Wakes through a duplicate of the eventfd `fd`.
    pub fn new(fd: RawFd) -> std::io::Result<Arc<Waker>> {
        // SAFETY: `fd` is the queue's eventfd, open for as long as the queue that calls this;
        // it is only borrowed to duplicate it.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        Ok(Arc::new(Waker {
            fd: borrowed.try_clone_to_owned()?,
            woken: AtomicBool::new(false),
        }))
    }

    fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to an eventfd this owns.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::WouldBlock {
                warn!("cannot wake a throttled queue: {e}");
            }
        }
        // After the write: a worker that sees the flag always finds the count to clear.
        self.woken.store(true, Ordering::Release);
    }

    /// Clears what this timer wrote, if it wrote since the last call. A queue whose device
    /// never writes its eventfd (completing at submit) would otherwise see it readable
    /// forever.
    pub fn take(&self) {
        if self.woken.swap(false, Ordering::AcqRel) {
            let mut buf = [0u8; 8];
            // SAFETY: reads at most 8 bytes into a live buffer from an eventfd this owns; the
            // eventfd is non-blocking (the queues create theirs so), so this never waits.
            let _ = unsafe {
                libc::read(
                    self.fd.as_fd().as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
        }
    }
}

struct Entry {
    at: Instant,
    seq: u64,
    waker: Weak<Waker>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

#[derive(Default)]
struct Timer {
    due: Mutex<(BinaryHeap<Reverse<Entry>>, u64)>,
    changed: Condvar,
}

impl Timer {
    fn run(&self) {
        let mut due = self.due.lock();
        loop {
            let next = due.0.peek().map(|Reverse(e)| e.at);
            match next {
                None => self.changed.wait(&mut due),
                Some(at) if at > Instant::now() => {
                    self.changed.wait_until(&mut due, at);
                }
                Some(_) => {
                    if let Some(Reverse(e)) = due.0.pop() {
                        if let Some(w) = e.waker.upgrade() {
                            w.wake();
                        }
                    }
                }
            }
        }
    }
}

fn timer() -> Option<&'static Timer> {
    static TIMER: OnceLock<Option<&'static Timer>> = OnceLock::new();
    *TIMER.get_or_init(|| {
        let t: &'static Timer = Box::leak(Box::default());
        match std::thread::Builder::new()
            .name("throttle-timer".into())
            .spawn(move || t.run())
        {
            Ok(_) => Some(t),
            Err(e) => {
                warn!("cannot start the throttle timer ({e}); throttled requests wait for the next completion or kick");
                None
            }
        }
    })
}

/// Wakes `waker` at `at`.
pub fn wake_at(at: Instant, waker: &Arc<Waker>) {
    let Some(t) = timer() else { return };
    let mut due = t.due.lock();
    due.1 += 1;
    let seq = due.1;
    let earliest = due.0.peek().is_none_or(|Reverse(e)| at < e.at);
    due.0.push(Reverse(Entry {
        at,
        seq,
        waker: Arc::downgrade(waker),
    }));
    if earliest {
        t.changed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn a_waker_fires_at_its_time_and_take_clears_it() {
        let efd = EventFd::new(EFD_NONBLOCK).unwrap();
        let w = Waker::new(efd.as_raw_fd()).unwrap();
        let start = Instant::now();
        wake_at(start + Duration::from_millis(30), &w);
        wake_at(start + Duration::from_millis(10), &w);
        // Polls until the first wake.
        while efd.read().is_err() {
            assert!(start.elapsed() < Duration::from_secs(5), "never woken");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(start.elapsed() >= Duration::from_millis(10));
        std::thread::sleep(Duration::from_millis(60));
        w.take();
        assert!(efd.read().is_err(), "take cleared the second wake");
    }
}
