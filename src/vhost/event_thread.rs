//! A thread with one epoll that runs a callback for each attached fd when it is readable: the
//! daemon's queue workers (`worker_pool.rs`) and its one accept thread (`accept_loop.rs`).
//!
//! What makes it safe to share: dropping an [`Attachment`] takes its fd out of the epoll and
//! returns only once the thread is not inside its callback and never will be again (the
//! callback is dropped then, on the dropping thread), so its owner can then close the fd and
//! free what the callback used. The callback runs with its entry's lock held; the detach takes
//! that lock. A callback must therefore never drop its own attachment.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use log::{error, warn};
use parking_lot::Mutex;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// What the thread runs when an attached fd is readable; `false` when the fd is to be watched
/// no more (a loop that failed, as its own thread would have ended).
pub type Run = Box<dyn Fn() -> bool + Send + Sync>;

pub struct EventThread {
    epoll: Epoll,
    /// What is attached, by the id its fd's events carry. Ids are never reused, so an event
    /// read just before its entry was removed finds nothing.
    entries: Mutex<HashMap<u64, Arc<Entry>>>,
    next_id: AtomicU64,
    /// The attachments' `weight`s (the queues a worker serves).
    load: AtomicUsize,
}

/// One attached fd; its lock is held while the thread runs the callback, which the detach
/// takes out.
struct Entry {
    run: Mutex<Option<Run>>,
    fd: RawFd,
}

impl EventThread {
    /// Starts a thread named `name` that lives as long as the process.
    pub fn start(name: String, on_start: fn(&'static EventThread)) -> io::Result<&'static Self> {
        let thread = EventThread {
            epoll: Epoll::new()?,
            entries: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            load: AtomicUsize::new(0),
        };
        let thread: &'static EventThread = Box::leak(Box::new(thread));
        std::thread::Builder::new().name(name).spawn(move || {
            on_start(thread);
            thread.run()
        })?;
        Ok(thread)
    }

    /// The attachments' weights together.
    pub fn load(&self) -> &AtomicUsize {
        &self.load
    }

    /// Runs `run` whenever `fd` is readable (level-triggered: until `run` took what made it
    /// so).
    pub fn attach(&'static self, fd: RawFd, weight: usize, run: Run) -> io::Result<Attachment> {
        self.attach_with(fd, weight, false, |_| run)
    }

    /// Runs the callback `make` returns whenever `fd` is readable; with `once`, only at the
    /// first time, until rearmed through the [`Rearm`] that `make` is given. `make` runs
    /// before `fd` is watched, so the callback can count on what `make` did with the handle
    /// even at its first run (a frontend may already wait on a listening socket then).
    pub fn attach_with(
        &'static self,
        fd: RawFd,
        weight: usize,
        once: bool,
        make: impl FnOnce(Rearm) -> Run,
    ) -> io::Result<Attachment> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let events = if once {
            EventSet::IN | EventSet::ONE_SHOT
        } else {
            EventSet::IN
        };
        let run = make(Rearm {
            thread: self,
            id,
            fd,
            events,
        });
        let entry = Arc::new(Entry {
            run: Mutex::new(Some(run)),
            fd,
        });
        self.entries.lock().insert(id, entry.clone());
        self.load.fetch_add(weight, Ordering::Relaxed);
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, id))
        {
            self.entries.lock().remove(&id);
            self.load.fetch_sub(weight, Ordering::Relaxed);
            return Err(e);
        }
        Ok(Attachment {
            thread: self,
            id,
            weight,
            entry,
        })
    }

    /// Takes `fd` out of the epoll (it stays attached: the detach frees it).
    fn unwatch(&self, fd: RawFd, id: u64) {
        let event = EpollEvent::new(EventSet::IN, id);
        if let Err(e) = self.epoll.ctl(ControlOperation::Delete, fd, event) {
            if e.raw_os_error() != Some(libc::ENOENT) {
                warn!("cannot take an fd off an event thread's epoll: {e}");
            }
        }
    }

    fn run(&'static self) {
        let mut events = [EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Not expected (the epoll fd is ours); back off rather than spin.
                    error!("event thread: epoll_wait failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                }
            };
            for event in events.iter().take(n) {
                let entry = self.entries.lock().get(&event.data()).cloned();
                if let Some(entry) = entry {
                    let run = entry.run.lock();
                    if let Some(run) = run.as_ref() {
                        if !run() {
                            self.unwatch(entry.fd, event.data());
                        }
                    }
                }
            }
        }
    }
}

/// An fd attached to an event thread; dropping it detaches it (see the module's comment).
pub struct Attachment {
    thread: &'static EventThread,
    id: u64,
    weight: usize,
    entry: Arc<Entry>,
}

impl Attachment {
    /// The thread this is attached to.
    pub fn thread(&self) -> &'static EventThread {
        self.thread
    }
}

/// Watches a one-shot attachment's fd again. Call it only while the fd is open (its owner
/// closes it after the detach and after the last rearm): once detached, rearming finds nothing.
#[derive(Clone, Copy)]
pub struct Rearm {
    thread: &'static EventThread,
    id: u64,
    fd: RawFd,
    events: EventSet,
}

impl Rearm {
    pub fn rearm(&self) {
        let event = EpollEvent::new(self.events, self.id);
        if let Err(e) = self
            .thread
            .epoll
            .ctl(ControlOperation::Modify, self.fd, event)
        {
            if e.raw_os_error() != Some(libc::ENOENT) {
                warn!("cannot watch an fd again: {e}");
            }
        }
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.thread.unwatch(self.entry.fd, self.id);
        self.thread.entries.lock().remove(&self.id);
        // Waits for the thread inside the callback; if it found the entry before it was
        // removed and runs it next, it finds nothing to run.
        let run = self.entry.run.lock().take();
        drop(run);
        self.thread.load.fetch_sub(self.weight, Ordering::Relaxed);
    }
}
