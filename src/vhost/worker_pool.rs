//! The daemon's queue workers: at most one thread per core (`--workers`), each with one epoll,
//! shared by every queue of every connection of every export, so that a host with hundreds of
//! VMs has as many queue threads as cores, not as queues.
//!
//! A connection attaches each of its event loops (vhost-user-backend's `VringEpollHandler`,
//! whose own epoll holds its queues' kick and completion eventfds) to the worker that serves
//! the fewest queues: the loop's epoll fd goes into the worker's epoll, and when it is readable
//! the worker runs what is ready there. Dropping the [`Attachment`] takes the loop off its
//! worker and returns only once the worker is not inside it and never will be again, so the
//! connection can then drop its memory and descriptors (what joining its own threads
//! guaranteed before).
//!
//! A worker that serves more than one queue is not [`alone`]: its queues take turns (a pass
//! of at most a queue's worth of chains each, `backend.rs`). It still polls after activity
//! (`poll-us` is short and the turn still ends), except for a connection with more queues than
//! workers, whose own queues would otherwise spin against each other.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use log::error;

use super::event_thread::EventThread;
pub use super::event_thread::{Attachment, Run};

/// The daemon's workers, started with the first export ([`start`]) or attachment.
static POOL: OnceLock<Pool> = OnceLock::new();
/// Workers the pool starts with (0: one per core).
static CONFIGURED: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// The queues served by the worker this thread is, if it is one.
    static LOAD: std::cell::Cell<Option<&'static AtomicUsize>> =
        const { std::cell::Cell::new(None) };
}

/// Sets how many workers the pool starts with (0: one per core the process may run on);
/// effective only before the first connection.
pub fn configure(workers: usize) {
    CONFIGURED.store(workers, Ordering::Relaxed);
}

/// How many workers the pool has (or will have once started).
pub fn size() -> usize {
    match POOL.get() {
        Some(pool) => pool.workers.len().max(1),
        None => wanted(),
    }
}

fn wanted() -> usize {
    match CONFIGURED.load(Ordering::Relaxed) {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    }
}

/// Whether the calling thread may give one queue all its time: it is not a pool worker (a
/// test, say), or a worker that serves one queue only.
pub fn alone() -> bool {
    LOAD.with(|l| l.get().is_none_or(|load| load.load(Ordering::Relaxed) <= 1))
}

/// Starts the workers if they are not running yet: an export does so when it starts, so that
/// the first connection does not add threads and descriptors that stay after it (they are the
/// daemon's, as many as cores, whatever the number of exports).
pub fn start() {
    pool();
}

fn pool() -> &'static Pool {
    POOL.get_or_init(|| Pool::start(wanted()))
}

/// Attaches `fd` (an epoll fd, or anything pollable) to the least loaded worker, which calls
/// `run` whenever `fd` is readable (level-triggered: until `run` has taken what made it so).
/// `queues` is what it adds to the worker's load.
pub fn attach(fd: RawFd, queues: usize, run: Run) -> io::Result<Attachment> {
    let worker = pool()
        .workers
        .iter()
        .min_by_key(|w| w.load().load(Ordering::Relaxed))
        .ok_or_else(|| io::Error::other("no queue worker could be started"))?;
    worker.attach(fd, queues, run)
}

struct Pool {
    workers: Vec<&'static EventThread>,
}

impl Pool {
    fn start(n: usize) -> Pool {
        let mut workers = Vec::new();
        for i in 0..n.max(1) {
            match EventThread::start(format!("queue-worker-{i}"), |w| {
                LOAD.with(|l| l.set(Some(w.load())))
            }) {
                Ok(worker) => workers.push(worker),
                Err(e) => error!("cannot start queue worker {i}: {e}"),
            }
        }
        Pool { workers }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_readable_fd_runs_its_loop_until_detached() {
        let ev = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let runs = Arc::new(AtomicUsize::new(0));
        let (e, r) = (ev.clone(), runs.clone());
        let attached = attach(
            ev.as_raw_fd(),
            1,
            Box::new(move || {
                let _ = e.read();
                r.fetch_add(1, Ordering::SeqCst);
                true
            }),
        )
        .unwrap();
        ev.write(1).unwrap();
        wait_for("the first run", || runs.load(Ordering::SeqCst) == 1);
        ev.write(1).unwrap();
        wait_for("the second run", || runs.load(Ordering::SeqCst) == 2);
        drop(attached);
        ev.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(runs.load(Ordering::SeqCst), 2, "ran after the detach");
    }

    #[test]
    fn a_detach_waits_for_the_worker_inside_the_loop_and_drops_it() {
        let ev = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let inside = Arc::new(AtomicBool::new(false));
        let finished = Arc::new(AtomicBool::new(false));
        let held = Arc::new(());
        let (e, i, f, h) = (ev.clone(), inside.clone(), finished.clone(), held.clone());
        let attached = attach(
            ev.as_raw_fd(),
            1,
            Box::new(move || {
                let _ = e.read();
                let _ = &h;
                i.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(200));
                f.store(true, Ordering::SeqCst);
                true
            }),
        )
        .unwrap();
        ev.write(1).unwrap();
        wait_for("the worker to be inside", || inside.load(Ordering::SeqCst));
        drop(attached);
        assert!(
            finished.load(Ordering::SeqCst),
            "the detach returned while the worker was inside the loop"
        );
        assert_eq!(
            Arc::strong_count(&held),
            1,
            "the loop was kept after the detach"
        );
    }

    #[test]
    fn a_failed_loop_is_watched_no_more() {
        let ev = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        // Never reads the eventfd: a loop still watched would run again and again.
        let attached = attach(
            ev.as_raw_fd(),
            1,
            Box::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
                false
            }),
        )
        .unwrap();
        ev.write(1).unwrap();
        wait_for("the run", || runs.load(Ordering::SeqCst) == 1);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        drop(attached);
    }

    #[test]
    fn loops_go_to_the_least_loaded_worker() {
        if size() < 2 {
            return;
        }
        let evs: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let first = attach(evs[0].as_raw_fd(), 1000, Box::new(|| true)).unwrap();
        let second = attach(evs[1].as_raw_fd(), 1, Box::new(|| true)).unwrap();
        assert!(
            !std::ptr::eq(first.thread(), second.thread()),
            "both loops on one worker"
        );
    }
}
