//! A vhost queue's writes while a mirror tracks its node (`WatchedQueue`, watch.rs): each
//! tracked write's ranges until it completes (`Tracked`), and, once the mirror is
//! write-blocking, the completions of synced writes held until their copy to the target is
//! done (`Held`, see src/mirror/active.rs).

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use smallvec::SmallVec;

use crate::engine::io::{ByteRange, Completion};
use crate::mirror::WriteHook;

/// A tracked write in flight: its ranges, and whether it is synced (`WriteHook`).
pub(super) struct Tracked {
    pub ranges: SmallVec<[ByteRange; 1]>,
    pub synced: bool,
}

/// Completions of synced writes held until their copy to the target is done. The copy
/// thread pushes them and wakes the worker through the queue's eventfd, but only while the
/// queue is open (the eventfd closes with it, and its number could be reused).
pub(super) struct Held {
    pub notifier: RawFd,
    /// Completions held (copying or in `done`): read without the lock on the hot path.
    pub waiting: AtomicUsize,
    pub state: Mutex<HeldState>,
    pub drained: Condvar,
}

pub(super) struct HeldState {
    pub done: Vec<Completion>,
    /// Copies not yet done.
    pub count: usize,
    pub open: bool,
}

impl Held {
    pub fn push(&self, c: Completion) {
        let mut st = self.state.lock();
        st.count -= 1;
        if st.open {
            st.done.push(c);
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live buffer to the queue's eventfd, open while
            // `open` is (the queue clears it under this lock before it closes); an eventfd
            // write of 1 only fails if the counter would overflow (it stays readable).
            unsafe { libc::write(self.notifier, one.as_ptr().cast(), one.len()) };
        }
        drop(st);
        self.drained.notify_all();
    }

    /// Waits until every copy is done.
    pub fn wait(&self) {
        let mut st = self.state.lock();
        while st.count > 0 {
            self.drained.wait(&mut st);
        }
    }
}

/// A tracked write completed: a synced one that succeeded goes to the mirror's target and
/// is handed back (through `held`) once it is there; any other is marked and uncounted, and
/// given back to be completed now.
pub(super) fn write_completed(
    hook: &Arc<WriteHook>,
    held: &Arc<Held>,
    t: Tracked,
    c: Completion,
) -> Option<Completion> {
    if t.synced && c.result.is_ok() {
        if let Some(active) = hook.active_sync() {
            held.state.lock().count += 1;
            held.waiting.fetch_add(1, Ordering::AcqRel);
            let ranges = t.ranges.iter().map(|r| (r.offset, r.len)).collect();
            let (hook, held) = (hook.clone(), held.clone());
            active.copy_later(
                ranges,
                Box::new(move |on_target| {
                    for r in t.ranges {
                        hook.end(r.offset, r.len, on_target);
                        hook.ended();
                    }
                    held.push(c);
                }),
            );
            return None;
        }
    }
    finish(hook, t);
    Some(c)
}

/// A tracked write is over without a copy: marks its ranges, uncounts it.
pub(super) fn finish(hook: &WriteHook, t: Tracked) {
    for r in t.ranges {
        hook.end(r.offset, r.len, false);
        hook.ended();
    }
    hook.finish_write(t.synced);
}
