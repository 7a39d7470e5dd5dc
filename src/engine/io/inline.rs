//! A queue that runs every request at once on the submitting thread: for devices whose
//! synchronous methods never wait for anything (the null and memory devices), where handing
//! the request to another thread would cost more than the request.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::run::run;
use super::{Completion, IoQueue, IoRequest, QueueOptions};
use crate::engine::{BlockDevice, BlockError};

pub struct InlineQueue {
    dev: Arc<dyn BlockDevice>,
    /// Finished requests in submission order. A Vec, not a VecDeque: it is always emptied
    /// whole, and the worker reaps after every submit, so it mostly holds one.
    ready: Vec<Completion>,
    /// Never written: completions are there as soon as `submit` returns.
    eventfd: EventFd,
    cap: usize,
}

impl InlineQueue {
    pub fn open(dev: Arc<dyn BlockDevice>, opts: &QueueOptions) -> io::Result<Box<dyn IoQueue>> {
        let cap = opts.entries.max(1) as usize;
        Ok(Box::new(InlineQueue {
            dev,
            ready: Vec::with_capacity(cap),
            eventfd: EventFd::new(EFD_NONBLOCK)?,
            cap,
        }))
    }
}

impl IoQueue for InlineQueue {
    fn submit(&mut self, req: IoRequest) {
        let result = if self.ready.len() >= self.cap {
            Err(BlockError::Busy)
        } else {
            run(&*self.dev, &req)
        };
        self.ready.push(Completion {
            tag: req.tag,
            result,
        });
    }

    fn submit_pending(&mut self) {}

    /// Nothing to reset: the eventfd is never written.
    fn acknowledge(&mut self) {}

    fn notifier(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    fn has_completions(&mut self) -> bool {
        !self.ready.is_empty()
    }

    fn reap(&mut self, out: &mut dyn FnMut(Completion)) -> usize {
        let n = self.ready.len();
        // The common case (one request, reaped right after its submit) without a drain.
        if n == 1 {
            if let Some(c) = self.ready.pop() {
                out(c);
            }
            return 1;
        }
        for c in self.ready.drain(..) {
            out(c);
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.ready.len()
    }

    fn drain(&mut self) {}

    fn completes_at_submit(&self) -> bool {
        true
    }
}
