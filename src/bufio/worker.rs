//! The background thread that runs asynchronous write-back and prefetch, so neither blocks
//! the thread that asked for it. Started on first use; stopped when the cache is dropped.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use super::core::Inner;

pub(super) enum Job {
    WriteDirty,
    Prefetch(Vec<u64>),
}

pub(super) struct Worker {
    tx: Option<Sender<Job>>,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    pub fn spawn(inner: Arc<Inner>) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let handle = thread::Builder::new()
            .name("bufio-worker".into())
            .spawn(move || run(&inner, &rx))?;
        Ok(Worker {
            tx: Some(tx),
            handle: Some(handle),
        })
    }

    /// Queues a job; false if the thread has gone.
    pub fn send(&self, job: Job) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.send(job).is_ok())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop once it finishes its current job.
        self.tx = None;
        if let Some(handle) = self.handle.take() {
            if handle.join().is_err() {
                log::error!("bufio worker thread panicked");
            }
        }
    }
}

fn run(inner: &Inner, rx: &Receiver<Job>) {
    while let Ok(job) = rx.recv() {
        if inner.shutting_down.load(Ordering::Acquire) {
            break;
        }
        match job {
            Job::WriteDirty => inner.write_dirty_in_background(),
            Job::Prefetch(blocks) => inner.prefetch_now(&blocks),
        }
    }
}
