//! The synchronous adapter: a thread of one queue that runs the device's synchronous methods
//! and completes into the queue's eventfd.
//!
//! Whatever may wait runs here, never on the queue worker: a thin pool's commit (a FLUSH, or
//! the flush of a write-through write) waits for a grace period on the I/O the worker's ring
//! has in flight, and only the worker reaps that ring. The thread starts with the first
//! request it gets, so a queue that never needs it costs no thread.

use std::collections::VecDeque;
use std::sync::Arc;

use log::warn;
use parking_lot::{Condvar, Mutex};
use vmm_sys_util::eventfd::EventFd;

use super::run::run;
use super::{Completion, IoRequest};
use crate::engine::BlockDevice;

/// What the thread does with a request.
pub(super) enum Job {
    /// All of it, through the synchronous methods.
    Run(IoRequest),
    /// Its I/O is done (in the ring); only the flush that makes it durable is left.
    MakeDurable(IoRequest),
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    done: Vec<Completion>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a job arrives (for the thread) or one is done (for a draining caller).
    changed: Condvar,
}

pub(super) struct Blocking {
    dev: Arc<dyn BlockDevice>,
    shared: Arc<Shared>,
    notify: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Jobs handed over whose completions have not been collected.
    outstanding: usize,
}

impl Blocking {
    pub fn new(dev: Arc<dyn BlockDevice>, notify: Arc<EventFd>) -> Self {
        Blocking {
            dev,
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
            }),
            notify,
            thread: None,
            outstanding: 0,
        }
    }

    /// Hands `job` to the thread, starting it if need be. Where no thread can start, the job
    /// runs here (better late than never).
    pub fn push(&mut self, job: Job) {
        if self.thread.is_none() {
            let (dev, shared, notify) =
                (self.dev.clone(), self.shared.clone(), self.notify.clone());
            match std::thread::Builder::new()
                .name("io-sync".into())
                .spawn(move || serve(&*dev, &shared, &notify))
            {
                Ok(t) => self.thread = Some(t),
                Err(e) => {
                    warn!("cannot start a synchronous I/O thread: {e}; running inline");
                    let c = execute(&*self.dev, job);
                    self.shared.state.lock().done.push(c);
                    self.outstanding += 1;
                    return;
                }
            }
        }
        self.shared.state.lock().jobs.push_back(job);
        self.shared.changed.notify_all();
        self.outstanding += 1;
    }

    /// Whether completions are waiting.
    pub fn has_done(&self) -> bool {
        self.outstanding > 0 && !self.shared.state.lock().done.is_empty()
    }

    /// Moves finished jobs' completions to `out`.
    pub fn collect(&mut self, out: &mut VecDeque<Completion>) {
        if self.outstanding == 0 {
            return;
        }
        let mut s = self.shared.state.lock();
        self.outstanding -= s.done.len();
        out.extend(s.done.drain(..));
    }

    /// Waits until at least one job is done (if any is outstanding).
    pub fn wait_one(&self) {
        let mut s = self.shared.state.lock();
        while self.outstanding > 0 && s.done.is_empty() {
            self.shared.changed.wait(&mut s);
        }
    }
}

impl Drop for Blocking {
    fn drop(&mut self) {
        self.shared.state.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn execute(dev: &dyn BlockDevice, job: Job) -> Completion {
    match job {
        Job::Run(req) => Completion {
            tag: req.tag,
            result: run(dev, &req),
        },
        Job::MakeDurable(req) => Completion {
            tag: req.tag,
            result: dev.flush(),
        },
    }
}

/// The thread: runs jobs in order until told to stop (after the last one).
fn serve(dev: &dyn BlockDevice, shared: &Shared, notify: &EventFd) {
    let mut s = shared.state.lock();
    loop {
        let Some(job) = s.jobs.pop_front() else {
            if s.stop {
                return;
            }
            shared.changed.wait(&mut s);
            continue;
        };
        drop(s);
        let c = execute(dev, job);
        s = shared.state.lock();
        s.done.push(c);
        shared.changed.notify_all();
        if let Err(e) = notify.write(1) {
            warn!("cannot signal a synchronous completion: {e}");
        }
    }
}
