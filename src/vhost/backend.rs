//! The vhost-user backend: features, config space, and the workers that serve the virtqueues.
//!
//! What an export costs while no frontend is connected is only its listening socket (watched
//! by the daemon's one accept thread): the device's I/O queues are opened when a frontend
//! connects ([`BlkBackend::open_queues`]) and closed when it goes
//! ([`BlkBackend::close_queues`]). A connection's queues are split among at most as many event
//! loops as the daemon has queue workers ([`worker_count`]), and those loops run on the
//! daemon's workers (`worker_pool.rs`), shared with every other connection: a host with
//! hundreds of VMs has as many queue threads as cores.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use log::{debug, warn};
use parking_lot::{Mutex, RwLock};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::chain::{frame, DescTable};
use super::config::{self, BlkConfig, SECTOR_SIZE, WRITEBACK_OFFSET};
use super::dirty_log::{self, GuestLog, GuestMemoryMmap, LogSwitch, VringRwLock};
use super::execute::{finish, prepare, ExecuteError, FailureSink, Prepared, Target};
use super::handover::{Member, Waker};
use super::inflight::{self, QueueInflight, Tracker};
use super::poll_window::{PollWindow, Waiting};
use super::request::Op;
use super::request::Request;
use super::worker_pool;
use crate::engine::io::{Completion, IoQueue, QueueOptions};
use crate::engine::BlockDevice;

/// Limits from the virtio-blk and vhost-user specifications that an export may choose within.
pub const MAX_QUEUES: u16 = 16;
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Queues' worth of chains a worker alone with its queue takes in one call before it goes
/// back to its event loop (see `BlkBackend::call_budget`): rarely enough that the extra
/// epoll round trip costs nothing measurable, often enough that an ending connection is seen.
const ALONE_PASSES: usize = 8;

/// How one export presents its disk.
#[derive(Clone, Debug)]
pub struct DeviceSettings {
    /// Returned by GET_ID (at most 20 bytes are used).
    pub serial: String,
    pub num_queues: u16,
    pub queue_size: u16,
    pub read_only: bool,
    /// How long a worker keeps looking at its queue and ring after the last thing it found
    /// there before it sleeps until a kick or a completion wakes it (zero: it never polls).
    pub poll: std::time::Duration,
    /// Requests the device queue hands to the host per system call at most (`QueueOptions`).
    pub submit_batch: u16,
}

/// One vhost-user-blk device over a [`BlockDevice`].
pub struct BlkBackend {
    dev: Arc<dyn BlockDevice>,
    settings: DeviceSettings,
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    /// Bumped after every change of `mem`: a worker compares it for each request instead of
    /// loading the memory table (a lock and a reference count) to see whether it changed.
    mem_generation: AtomicU64,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
    /// The device's I/O queue of each virtqueue and what waits for its completions, while a
    /// frontend is connected; `None` without one, or where the device could not open one
    /// (every request of that queue then fails).
    queues: Vec<Mutex<Option<QueueState>>>,
    /// How the device's queues are opened ([`BlkBackend::open_queues`]).
    queue_options: QueueOptions,
    /// Event loops of a connection ([`worker_count`]): queue `q` is served by loop
    /// `q % workers`, as its `q / workers`-th vring.
    workers: usize,
    /// Some loop serves more than one queue: it takes turns between them (`serve` yields
    /// after a queue's worth of chains) and does not poll (a worker spinning on one queue
    /// keeps its others waiting). A pool worker that serves other connections' queues too
    /// does the same ([`BlkBackend::shared_now`]).
    shared: bool,
    /// Malformed requests seen, for rate-limited logging.
    rejections: AtomicU64,
    /// Told of every failed request.
    on_failure: Option<FailureSink>,
    /// The channel to the current frontend, if it set one up (BACKEND_REQ).
    to_frontend: Mutex<Option<Backend>>,
    /// Whether the current frontend has dirty logging on (live migration).
    dirty_log: LogSwitch,
    /// This export's turn to run its device, among the device's exports (migration).
    handover: Member,
    /// How long a worker keeps looking at its queue and ring after the last thing it found
    /// there, before it sleeps until a kick or a completion wakes it.
    poll: std::time::Duration,
    /// The device's queues complete slowly (`IoQueue::completes_slowly`): its workers do not
    /// poll, whatever `poll` says. Set when the queues open.
    slow_queues: AtomicBool,
    /// Chains taken and not yet returned, in the frontend's inflight region (inflight.rs).
    inflight: Arc<Tracker>,
}

/// What the worker keeps of a request while the device works on it.
struct Pending {
    head: u16,
    op: Op,
    sector: u64,
    status: vm_memory::GuestAddress,
    /// The memory table the request was framed with (see `QueueState::tables`).
    table: u64,
    /// Bytes the request puts in device-writable buffers when it succeeds.
    written: u32,
    /// The buffers the device fills behind vm-memory's back, for the dirty log.
    writes: super::request::Segments,
}

/// One virtqueue's requests in the device's queue.
struct QueueState {
    // Declared first so it is dropped first: dropping a queue waits for what it has in
    // flight, whose buffers lie in the memory `tables` keeps mapped.
    io: Box<dyn IoQueue>,
    /// `io.completes_at_submit()`, asked once: it is fixed for a queue's life, and asking
    /// per request is a virtual call through every wrapper.
    at_submit: bool,
    /// Requests in the device's queue, by the tag they were given (their slot here: a head
    /// index the guest chose may be in flight twice).
    pending: Vec<Option<Pending>>,
    free: Vec<usize>,
    /// The vring the requests came from, for completions reaped outside a pass.
    vring: Option<VringRwLock>,
    /// The memory tables requests in flight were framed with, and how many use each: they
    /// stay mapped until the last of those requests completes (requests carry raw pointers
    /// and no reference counts of their own). The last entry is the newest table.
    tables: smallvec::SmallVec<[MemoryInUse; 2]>,
    next_table: u64,
    /// Completions were reaped since the notifier was last reset: it may be readable for
    /// them, and must be reset before the worker sleeps (or epoll wakes it at once).
    unacked: bool,
    /// How long its worker polls for each thing it can wait for (poll_window.rs); the window
    /// for requests is learnt afresh for every frontend.
    poll: PollWindow,
}

struct MemoryInUse {
    id: u64,
    mem: Arc<GuestMemoryMmap>,
    requests: usize,
}

impl QueueState {
    fn new(io: Box<dyn IoQueue>, poll: std::time::Duration) -> Self {
        QueueState {
            poll: PollWindow::new(poll),
            at_submit: io.completes_at_submit(),
            io,
            pending: Vec::new(),
            free: Vec::new(),
            vring: None,
            tables: smallvec::SmallVec::new(),
            next_table: 0,
            unacked: false,
        }
    }

    /// Counts one more request framed with `mem`; returns the table's id for its `Pending`.
    fn use_table(&mut self, mem: &Arc<GuestMemoryMmap>) -> u64 {
        match self.tables.last_mut() {
            Some(t) if Arc::ptr_eq(&t.mem, mem) => {
                t.requests += 1;
                t.id
            }
            _ => {
                let id = self.next_table;
                self.next_table += 1;
                self.tables.push(MemoryInUse {
                    id,
                    mem: mem.clone(),
                    requests: 1,
                });
                id
            }
        }
    }

    fn insert(&mut self, p: Pending) -> u64 {
        match self.free.pop() {
            Some(i) => {
                if let Some(slot) = self.pending.get_mut(i) {
                    *slot = Some(p);
                }
                i as u64
            }
            None => {
                self.pending.push(Some(p));
                (self.pending.len() - 1) as u64
            }
        }
    }

    /// Completes what the device has finished: status bytes and used ring entries. Returns
    /// whether any chain was used (the caller notifies the guest once).
    fn complete(
        &mut self,
        target: &Target<'_>,
        note: &dyn Fn(&str),
        mut inflight: Option<&mut QueueInflight>,
    ) -> bool {
        let QueueState {
            io,
            pending,
            free,
            vring,
            tables,
            unacked,
            ..
        } = self;
        *unacked = true;
        let Some(vring) = vring.as_ref() else {
            // No requests without a vring (every pass sets it, and it is forgotten only once
            // the queue is drained); this only clears a stale wakeup.
            if io.in_flight() == 0 {
                io.reap(&mut |_| {});
            }
            return false;
        };
        let mut used = false;
        io.reap(&mut |c: Completion| {
            let Ok(index) = usize::try_from(c.tag) else {
                return;
            };
            let Some(p) = pending.get_mut(index).and_then(Option::take) else {
                note(&format!("completion for an unknown request {}", c.tag));
                return;
            };
            free.push(index);
            let result = c.result.map(|()| p.written).map_err(ExecuteError::from);
            let len = match tables.iter().find(|t| t.id == p.table) {
                Some(t) => {
                    // The device filled these through raw iovecs, unseen by vm-memory's log.
                    dirty_log::mark_device_writes(&t.mem, &p.writes);
                    finish(&t.mem, p.op, p.sector, p.status, result, target)
                }
                None => 0,
            };
            release_table(tables, p.table);
            match inflight::add_used(inflight.as_deref_mut(), vring, p.head, len) {
                Ok(()) => used = true,
                Err(e) => note(&format!("cannot return chain {}: {e}", p.head)),
            }
        });
        used
    }
}

/// One request framed with table `id` is done; older tables no request uses are unmapped.
fn release_table(tables: &mut smallvec::SmallVec<[MemoryInUse; 2]>, id: u64) {
    let newest = tables.last().map(|t| t.id);
    if let Some(t) = tables.iter_mut().find(|t| t.id == id) {
        t.requests = t.requests.saturating_sub(1);
        if t.requests == 0 && Some(id) != newest {
            tables.retain(|t| t.requests > 0 || Some(t.id) == newest);
        }
    }
}

/// What one pass over a queue found.
#[derive(Clone, Copy)]
struct Pass {
    /// Chains taken from the available ring.
    taken: usize,
    /// Chains of earlier passes completed at its end.
    completed: bool,
    /// What a worker that found nothing would now wait for.
    waiting: Waiting,
}

/// Why a worker looks at its device queue's completions.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reap {
    /// Its eventfd woke the worker.
    Event,
    /// A polling worker looks, without a system call when nothing is there.
    Poll,
    /// The frontend takes the queue back: wait for everything first.
    Drain,
    /// The worker is about to sleep: reset the notifier if completions were reaped without
    /// it, and reap what came meanwhile.
    Settle,
}

fn queue_error(e: virtio_queue::Error) -> io::Error {
    io::Error::other(format!("virtqueue: {e}"))
}

impl BlkBackend {
    pub fn new(dev: Arc<dyn BlockDevice>, settings: DeviceSettings) -> Self {
        let opts = QueueOptions {
            entries: u32::from(settings.queue_size.max(1)),
            submit_batch: settings.submit_batch,
        };
        let queues = (0..settings.num_queues).map(|_| Mutex::new(None)).collect();
        let workers = worker_count(settings.num_queues, worker_pool::size());
        let shared = workers < usize::from(settings.num_queues);
        BlkBackend {
            queues,
            queue_options: opts,
            workers,
            rejections: AtomicU64::new(0),
            on_failure: None,
            to_frontend: Mutex::new(None),
            dirty_log: LogSwitch::default(),
            handover: Member::default(),
            shared,
            poll: if shared {
                std::time::Duration::ZERO
            } else {
                settings.poll
            },
            inflight: Arc::new(Tracker::new(settings.num_queues)),
            slow_queues: AtomicBool::new(false),
            dev,
            settings,
            mem: RwLock::new(None),
            mem_generation: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            acked_features: AtomicU64::new(0),
        }
    }

    /// Runs requests only in its turn among the exports of `handover`'s device.
    pub fn with_handover(mut self, handover: Member) -> Self {
        self.handover = handover;
        self
    }

    pub fn handover(&self) -> &Member {
        &self.handover
    }

    /// Tells `sink` of every request that fails (after it is logged).
    pub fn with_failure_sink(mut self, sink: FailureSink) -> Self {
        self.on_failure = Some(sink);
        self
    }

    /// Tells the connected frontend that the config space changed (the device's size, read
    /// from the device on every GET_CONFIG), so it reads it again. Returns `Ok(false)` when
    /// the frontend set up no channel to hear it on (it sees the change when it reconnects).
    pub fn notify_config_change(&self) -> io::Result<bool> {
        let Some(channel) = self.to_frontend.lock().clone() else {
            return Ok(false);
        };
        channel.handle_config_change()?;
        Ok(true)
    }

    /// Forgets the channel to a frontend that went away.
    pub fn frontend_gone(&self) {
        *self.to_frontend.lock() = None;
        self.dirty_log.off();
        self.handover.reopen();
    }

    /// The inflight tracking the connection attaches the frontend's region to.
    pub fn inflight(&self) -> &Arc<Tracker> {
        &self.inflight
    }

    /// Whether completed writes may sit in a volatile cache until FLUSH.
    pub fn writeback(&self) -> bool {
        config::flush_negotiated(self.acked_features.load(Ordering::Acquire))
            && self.inflight.cache_mode().writeback()
    }

    fn blk_config(&self) -> BlkConfig {
        BlkConfig {
            capacity_sectors: self.dev.size() / SECTOR_SIZE,
            seg_max: config::seg_max(self.settings.queue_size),
            num_queues: self.settings.num_queues,
            // The cache bit as the guest set it (default on). VMMs read the config before the
            // driver negotiates features, so this must not wait for FLUSH to be acked.
            writeback: self.inflight.cache_mode().writeback(),
        }
    }

    fn target(&self) -> Target<'_> {
        Target {
            dev: self.dev.as_ref(),
            read_only: self.settings.read_only,
            serial: self.settings.serial.as_bytes(),
            writeback: self.writeback(),
            on_failure: self.on_failure.as_deref(),
        }
    }

    /// Logs a malformed request without letting a guest flood the log: the 1st, 2nd, 4th, 8th...
    /// occurrence is a warning, the rest debug messages.
    fn note_rejection(&self, reason: &str) {
        let n = self.rejections.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            warn!("rejected request ({n} so far): {reason}");
        } else {
            debug!("rejected request: {reason}");
        }
    }

    /// Opens the device's I/O queue of every virtqueue that has none, for a frontend that
    /// connected. A queue the device cannot open stays without one: its requests fail.
    pub fn open_queues(&self) {
        for (q, slot) in self.queues.iter().enumerate() {
            let mut slot = slot.lock();
            if slot.is_some() {
                continue;
            }
            match self.dev.clone().open_queue(&self.queue_options) {
                Ok(io) => {
                    if io.completes_slowly() {
                        self.slow_queues.store(true, Ordering::Relaxed);
                    }
                    *slot = Some(QueueState::new(io, self.poll))
                }
                Err(e) => {
                    warn!("queue {q}: cannot open the device's I/O queue ({e}); its requests fail")
                }
            }
        }
    }

    /// Closes every device I/O queue (its ring, eventfd and any thread), once the frontend
    /// went away and its requests were finished (`stop_vring`): an export with no frontend
    /// holds none of them.
    pub fn close_queues(&self) {
        for slot in &self.queues {
            // Taken out first, dropped outside the lock: dropping waits for what is in flight.
            let queue = slot.lock().take();
            drop(queue);
        }
    }

    /// How many worker threads serve a connection's queues.
    pub fn worker_threads(&self) -> usize {
        self.workers
    }

    /// The worker that serves queue `queue` (an index into the handler's workers).
    pub fn worker_of(&self, queue: usize) -> usize {
        queue % self.workers
    }

    /// The epoll event id of queue `queue`'s completion eventfd, in its worker's epoll: above
    /// the ids the vhost-user handler keeps for the vrings and its own events.
    pub fn completion_event(&self, queue: usize) -> u16 {
        let id = usize::from(self.settings.num_queues) + 1 + queue;
        u16::try_from(id).unwrap_or(u16::MAX)
    }

    /// The eventfd that signals completions of queue `queue`'s device I/O, if it has one.
    pub fn completion_fd(&self, queue: usize) -> Option<std::os::fd::RawFd> {
        let state = self.queues.get(queue)?.lock();
        state.as_ref().map(|q| q.io.notifier())
    }

    /// Frames chain `head` of `table`; a rejected one is answered at once and its used length
    /// returned.
    fn frame(&self, mem: &GuestMemoryMmap, table: DescTable, head: u16) -> Result<Request, u32> {
        let limits = config::RequestLimits::for_queue(self.settings.queue_size);
        frame(mem, table, head, &limits).map_err(|rejection| {
            self.note_rejection(rejection.reason);
            match rejection.status {
                Some(addr) => match vm_memory::Bytes::write_obj(mem, rejection.code, addr) {
                    Ok(()) => 1,
                    Err(_) => 0,
                },
                None => 0,
            }
        })
    }

    /// Takes what the available ring has (at most a queue's worth, so a guest that keeps
    /// publishing cannot keep the worker from its completions) and hands it to the device's
    /// queue; completes what the device has finished; notifies the guest once. Returns what
    /// it found.
    fn process_queue(
        &self,
        queue: usize,
        vring: &VringRwLock,
        ring_mem: &Arc<GuestMemoryMmap>,
        generation: u64,
    ) -> io::Result<Pass> {
        let target = self.target();
        let mut guard = self.queues.get(queue).map(|q| q.lock());
        let mut state = guard.as_mut().and_then(|g| g.as_mut());
        if let Some(qs) = state.as_mut() {
            // Kept until `stop_vring` (the queue's vring changes only across a stop): a
            // polling worker passes here constantly, and a clone per pass is two atomic
            // operations on a cache line the frontend's thread touches too.
            if qs.vring.is_none() {
                qs.vring = Some(vring.clone());
            }
        }
        let mut inflight = self.inflight.queue(queue);
        let mut used = false;
        let mut taken = 0usize;
        // Read when the first chain comes, not on every (mostly empty) polling pass.
        let mut table = None;
        while taken < self.pass_limit() {
            let next = inflight::next_head(inflight.as_deref_mut(), vring, ring_mem.as_ref());
            let Some(head) = next else { break };
            let table = *table.get_or_insert_with(|| {
                let state = vring.get_ref();
                let q = state.get_queue();
                DescTable {
                    addr: vm_memory::GuestAddress(q.desc_table()),
                    size: q.size(),
                }
            });
            taken += 1;
            // The memory table as of now, not of when this pass began: the frontend may have
            // added the region this request's buffers are in just before publishing it.
            let newer = (self.mem_generation.load(Ordering::Acquire) != generation)
                .then(|| self.newer_memory(ring_mem))
                .flatten();
            let mem = newer.as_ref().unwrap_or(ring_mem);
            let len = match self.frame(mem, table, head) {
                Err(len) => len,
                // SAFETY: a submitted request's memory table is counted in its queue's
                // `tables` until it completes, and the queue is drained or dropped before
                // them (`QueueState`'s field order).
                Ok(req) => match (unsafe { prepare(mem, &req, &target) }, state.as_mut()) {
                    (Prepared::Submit(mut io, written), Some(qs)) => {
                        let table = qs.use_table(mem);
                        io.tag = qs.insert(Pending {
                            head,
                            op: req.op,
                            sector: req.sector,
                            status: req.status,
                            table,
                            written,
                            writes: dirty_log::device_writes(req.op, req.data),
                        });
                        qs.io.submit(io);
                        // A device that finishes at once (null, memory) goes back to the
                        // guest now, not at the end of the pass: the guest's side can reuse
                        // the chain while this pass goes on.
                        if qs.at_submit {
                            let note = |m: &str| self.note_rejection(m);
                            used |= qs.complete(&target, &note, inflight.as_deref_mut());
                        }
                        continue;
                    }
                    (Prepared::Submit(..), None) => {
                        let err = Err(ExecuteError::NoQueue);
                        finish(mem, req.op, req.sector, req.status, err, &target)
                    }
                    (Prepared::Done(result), _) => {
                        finish(mem, req.op, req.sector, req.status, result, &target)
                    }
                },
            };
            // A head the guest made up cannot be returned; the queue must live on regardless.
            match inflight::add_used(inflight.as_deref_mut(), vring, head, len) {
                Ok(()) => used = true,
                Err(e) => self.note_rejection(&format!("cannot return chain {head}: {e}")),
            }
        }
        let mut completed = false;
        let mut waiting = Waiting::Request;
        if let Some(qs) = state.as_mut() {
            qs.io.submit_pending();
            if qs.io.has_completions() {
                let note = |m: &str| self.note_rejection(m);
                completed = qs.complete(&target, &note, inflight.as_deref_mut());
                used |= completed;
            }
            if qs.io.in_flight() > 0 {
                waiting = Waiting::Completion;
            }
        }
        if used && vring.needs_notification().map_err(queue_error)? {
            vring.signal_used_queue()?;
        }
        Ok(Pass {
            taken,
            completed,
            waiting,
        })
    }

    /// Chains one pass takes at most.
    fn pass_limit(&self) -> usize {
        usize::from(self.settings.queue_size.max(1))
    }

    /// Chains one call of [`Self::serve`] takes at most before it re-arms the queue's kick and
    /// returns to the worker's event loop: a queue's worth when the worker has other queues
    /// (they take turns), [`ALONE_PASSES`] queues' worth when it has only this one. Without a
    /// bound a ring that never runs dry kept the worker in one call for good, where it never
    /// saw its connection end: a ring whose available index lies on its used index refills
    /// itself from the device's own writes, with no guest running at all.
    fn call_budget(&self, shared: bool) -> usize {
        if shared {
            self.pass_limit()
        } else {
            self.pass_limit() * ALONE_PASSES
        }
    }

    /// The guest memory as the frontend last described it, if that is no longer `pass`.
    fn newer_memory(&self, pass: &Arc<GuestMemoryMmap>) -> Option<Arc<GuestMemoryMmap>> {
        let table = self.mem.read();
        let now = table.as_ref()?.memory();
        // Nearly always unchanged, and comparing spares taking (and dropping) a reference
        // for every request.
        (!std::ptr::eq(&*now, pass.as_ref())).then(|| now.into_inner())
    }

    /// Completes what the device has finished, and notifies the guest. Returns whether any
    /// chain was used.
    fn reap(&self, queue: usize, how: Reap) -> io::Result<bool> {
        let Some(slot) = self.queues.get(queue) else {
            return Ok(false);
        };
        let mut guard = slot.lock();
        let Some(qs) = guard.as_mut() else {
            return Ok(false);
        };
        match how {
            Reap::Drain => {
                qs.io.drain();
                qs.io.acknowledge();
            }
            // The eventfd must be reset even when an earlier pass already took what it
            // announced: it stays readable otherwise, and the worker spins.
            Reap::Event => qs.io.acknowledge(),
            Reap::Poll => {
                if qs.io.in_flight() == 0 || !qs.io.has_completions() {
                    return Ok(false);
                }
            }
            Reap::Settle => {
                if !qs.unacked {
                    return Ok(false);
                }
                qs.io.acknowledge();
            }
        }
        let mut inflight = self.inflight.queue(queue);
        let note = |m: &str| self.note_rejection(m);
        let used = qs.complete(&self.target(), &note, inflight.as_deref_mut());
        // Reaped right after a reset: what is left to announce wakes the worker.
        if matches!(how, Reap::Event | Reap::Drain | Reap::Settle) {
            qs.unacked = false;
        }
        if let Some(vring) = qs.vring.as_ref().filter(|_| used) {
            if vring.needs_notification().map_err(queue_error)? {
                vring.signal_used_queue()?;
            }
        }
        Ok(used)
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = GuestLog;
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.settings.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.settings.queue_size)
    }

    fn features(&self) -> u64 {
        config::device_features(self.settings.read_only)
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Release);
        let mem = self.mem.read().as_ref().map(|m| m.memory().into_inner());
        self.dirty_log.set_features(features, mem.as_deref());
        // The write cache stays as the guest set it: QEMU sends SET_FEATURES at every start
        // and dirty-log switch, never the mode again (cache_mode.rs).
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        config::protocol_features()
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        *self.to_frontend.lock() = Some(backend);
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.blk_config().read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        match (offset, buf) {
            (WRITEBACK_OFFSET, [mode @ (0 | 1)]) => {
                self.inflight.cache_mode().set(*mode == 1);
                Ok(())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "config write of {} bytes at {offset} is not allowed",
                    buf.len()
                ),
            )),
        }
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.dirty_log.memory_changed(&mem.memory());
        *self.mem.write() = Some(mem);
        self.mem_generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        let mut masks = vec![0u64; self.workers];
        for q in 0..usize::from(self.settings.num_queues) {
            if let Some(mask) = masks.get_mut(self.worker_of(q)) {
                *mask |= 1u64 << q;
            }
        }
        masks
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // The frontend takes the ring back: everything accepted must complete first. How long
        // that takes is the device's share of a migration's downtime (GET_VRING_BASE at the
        // switchover waits for it).
        let began = std::time::Instant::now();
        self.reap(queue_index as usize, Reap::Drain)?;
        debug!(
            "queue {queue_index}: stopped; requests in flight finished in {:.3} ms",
            began.elapsed().as_secs_f64() * 1e3
        );
        self.inflight.stopped(queue_index as usize);
        // The next start may come with another vring (a new connection).
        if let Some(q) = self.queues.get(queue_index as usize) {
            if let Some(qs) = q.lock().as_mut() {
                qs.vring = None;
                // Nothing is in flight: the memory of the old connection can go.
                if qs.io.in_flight() == 0 {
                    qs.tables.clear();
                }
            }
        }
        self.handover.leave(queue_index as usize);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        // Worker `thread_id` serves queues thread_id, thread_id + workers, ... (see
        // queues_per_thread); its vrings are those, indexed from 0 within the thread, and the
        // vring events are their indexes. Completion events name their queue.
        let event = usize::from(device_event);
        let vq = usize::from(self.settings.num_queues);
        if event > vq {
            let queue = event - vq - 1;
            self.reap(queue, Reap::Event)?;
            // A polling worker looks for the requests its completions will bring.
            return match vrings.get(queue / self.workers) {
                Some(vring) if self.polls() && !self.shared_now() => self.serve(queue, vring),
                _ => Ok(()),
            };
        }
        let vring = vrings
            .get(event)
            .ok_or_else(|| io::Error::other(format!("no queue {device_event}")))?;
        self.serve(thread_id + event * self.workers, vring)
    }
}

impl BlkBackend {
    /// Takes what the queue has, and with EVENT_IDX what arrives until it is quiet again.
    fn serve(&self, queue: usize, vring: &VringRwLock) -> io::Result<()> {
        let started = || vring.get_ref().get_queue().ready();
        // Kicks the queue once the device is free, so this worker comes back to it.
        let wake = || -> Waker {
            let vring = vring.clone();
            Box::new(move || kick(&vring))
        };
        if !self.handover.enter(queue, &started, &wake) {
            return Ok(());
        }
        // Read before the table: a worker that sees this generation sees at least its table.
        let generation = self.mem_generation.load(Ordering::Acquire);
        let Some(atomic) = self.mem.read().clone() else {
            return Ok(());
        };
        let mem = atomic.memory().into_inner();
        if self.event_idx.load(Ordering::Acquire) {
            // With EVENT_IDX the guest kicks once per batch: drain until re-enabling
            // notifications finds nothing new, or a request could be stranded.
            //
            // A pass that takes nothing right after the ring said it had more means the ring
            // is broken (an available index more than a queue ahead, or an entry outside
            // guest memory): nothing can ever be taken, so stop rather than spin. The guest's
            // next kick looks again.
            let mut more_promised = false;
            let mut last_found = std::time::Instant::now();
            let polls = self.polls() && !self.shared;
            // Learnt per queue (poll_window.rs); only the worker serving the queue changes
            // them, so a copy is taken for the call and put back at its end.
            let mut windows = if polls {
                self.poll_window_on_waking(queue, last_found)
            } else {
                PollWindow::new(std::time::Duration::ZERO)
            };
            // What an empty pass since the last activity found the worker waiting for: what
            // comes next was caught by polling.
            let mut polled_for = None;
            // What the worker waits for when it goes to sleep.
            let mut sleeps_for: Option<Waiting>;
            let mut served = 0;
            loop {
                sleeps_for = None;
                // GET_VRING_BASE marks the ring not ready before it drains it: a polling
                // worker must not go on with passes (and re-enable notifications) in a ring
                // the frontend took back.
                if !started() {
                    break;
                }
                vring.disable_notification().map_err(queue_error)?;
                let Pass {
                    taken,
                    completed,
                    waiting,
                } = self.process_queue(queue, vring, &mem, generation)?;
                // Asked on every pass: another connection's queue may have joined this
                // worker meanwhile.
                let shared = self.shared_now();
                served += taken;
                if served >= self.call_budget(shared) {
                    kick(vring);
                    break;
                }
                // A worker that other connections' queues joined polls too: its window is
                // short (`poll-us`, after the last activity) and the call's budget above
                // still ends its turn, while a worker that never polled once anything else
                // was attached to it cost a busy VM beside an idle or throttled one two
                // thirds of its rate (tests/io_throttle.rs). Only a connection with more
                // queues than workers (`self.shared`) keeps its own queues from spinning.
                if polls {
                    // A completion is activity too, wherever it was reaped: the guest's next
                    // request usually follows it within microseconds, and a worker that
                    // counted its window from the submission alone would often be asleep
                    // by then (a wakeup per request at queue depth 1).
                    let reaped = completed || self.reap(queue, Reap::Poll)?;
                    if taken > 0 || reaped {
                        if let Some(what) = polled_for.take() {
                            windows.caught(what);
                        }
                        last_found = std::time::Instant::now();
                        more_promised = false;
                        continue;
                    }
                    polled_for = Some(waiting);
                    if last_found.elapsed() < windows.window(waiting) {
                        std::hint::spin_loop();
                        continue;
                    }
                    sleeps_for = Some(waiting);
                }
                if more_promised && taken == 0 {
                    self.note_rejection("available ring is broken; waiting for the next kick");
                    break;
                }
                if !vring.enable_notification().map_err(queue_error)? {
                    break;
                }
                more_promised = true;
            }
            if polls {
                match sleeps_for {
                    Some(what) => windows.sleep(last_found, what),
                    None => windows.forget(),
                }
                self.put_poll_window(queue, windows);
            }
        } else {
            // A pass stops after a queue's worth of chains: go on until one takes less (or,
            // past the call's budget, come back through the event loop).
            let mut served = 0;
            loop {
                let taken = self.process_queue(queue, vring, &mem, generation)?.taken;
                if taken < self.pass_limit() {
                    break;
                }
                served += taken;
                if served >= self.call_budget(self.shared_now()) {
                    kick(vring);
                    break;
                }
            }
        }
        // Completions reaped while polling left the notifier set: reset it, or the worker's
        // epoll wakes it again at once for nothing.
        self.reap(queue, Reap::Settle)?;
        Ok(())
    }
}

impl BlkBackend {
    /// The worker woke for `queue` at `now`: its polling windows, after learning from the
    /// sleep that ended.
    fn poll_window_on_waking(&self, queue: usize, now: std::time::Instant) -> PollWindow {
        let mut guard = self.queues.get(queue).map(|q| q.lock());
        match guard.as_mut().and_then(|g| g.as_mut()) {
            Some(qs) => {
                qs.poll.woke(now);
                qs.poll
            }
            None => PollWindow::new(self.poll),
        }
    }

    /// The worker leaves `queue` with `windows` as it last saw them.
    fn put_poll_window(&self, queue: usize, windows: PollWindow) {
        let mut guard = self.queues.get(queue).map(|q| q.lock());
        if let Some(qs) = guard.as_mut().and_then(|g| g.as_mut()) {
            qs.poll = windows;
        }
    }

    /// Whether the worker running this serves other queues too (of this connection, or of
    /// others on the same pool worker, `worker_pool.rs`): it takes turns and does not poll.
    fn shared_now(&self) -> bool {
        self.shared || !worker_pool::alone()
    }

    /// Whether the worker keeps looking for work after activity (`poll`), which it does not
    /// where the device's queues complete slowly.
    fn polls(&self) -> bool {
        !self.poll.is_zero() && !self.slow_queues.load(Ordering::Relaxed)
    }
}

/// Makes the worker's epoll report `vring`'s kick again: a worker serving several queues
/// comes back to this one, which may have more, after its other queues had their turn (the
/// guest does not kick for what it published while notifications were off), and a queue
/// that waited for its device's turn (`handover.rs`) is served once the device is free.
fn kick(vring: &VringRwLock) {
    let state = vring.get_ref();
    let Some(kick) = state.get_kick() else {
        return;
    };
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a local buffer to the kick eventfd, which the vring state's
    // read guard keeps open for the duration of the call.
    let n = unsafe { libc::write(kick.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    if n != 8 {
        warn!(
            "cannot re-arm a queue's kick: {}",
            io::Error::last_os_error()
        );
    }
}

/// Worker threads for `queues` virtqueues on a host with `cores` cores: one per queue, at most
/// one per core (more would only take turns on the same cores), at least one.
pub fn worker_count(queues: u16, cores: usize) -> usize {
    usize::from(queues).min(cores).max(1)
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::engine::memory::MemoryDevice;

    fn backend() -> BlkBackend {
        let dev = Arc::new(MemoryDevice::new(1 << 20).unwrap());
        let settings = DeviceSettings {
            serial: "resized".into(),
            num_queues: 1,
            queue_size: 16,
            read_only: false,
            poll: std::time::Duration::ZERO,
            submit_batch: 4,
        };
        BlkBackend::new(dev, settings)
    }

    #[test]
    fn a_config_change_goes_to_the_frontend_channel_as_backend_config_change_msg() {
        let b = backend();
        assert!(!b.notify_config_change().unwrap(), "no channel yet");
        let (ours, mut frontend) = UnixStream::pair().unwrap();
        b.set_backend_req_fd(Backend::from_stream(ours));
        assert!(b.notify_config_change().unwrap());
        // The vhost-user header: request, flags (version 1), payload size; no payload.
        let mut hdr = [0u8; 12];
        frontend.read_exact(&mut hdr).unwrap();
        let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap());
        assert_eq!(word(0), 2, "VHOST_USER_BACKEND_CONFIG_CHANGE_MSG");
        assert_eq!(word(4) & 0x3, 1, "protocol version");
        assert_eq!(word(8), 0, "payload size");
        b.frontend_gone();
        assert!(!b.notify_config_change().unwrap());
    }

    #[test]
    fn a_memory_table_stays_until_its_last_request_completes() {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(1 << 20).unwrap());
        let opts = QueueOptions {
            entries: 8,
            submit_batch: 4,
        };
        let mut qs = QueueState::new(
            crate::engine::io::InlineQueue::open(dev, &opts).unwrap(),
            std::time::Duration::ZERO,
        );
        let old = Arc::new(GuestMemoryMmap::new());
        let new = Arc::new(GuestMemoryMmap::new());
        let a = qs.use_table(&old);
        let b = qs.use_table(&old);
        assert_eq!(a, b, "requests of one table share its entry");
        let c = qs.use_table(&new);
        assert_ne!(a, c);
        assert_eq!(
            Arc::strong_count(&old),
            2,
            "kept while its requests are in flight"
        );
        release_table(&mut qs.tables, a);
        assert_eq!(Arc::strong_count(&old), 2);
        release_table(&mut qs.tables, b);
        assert_eq!(
            Arc::strong_count(&old),
            1,
            "unmapped after its last request"
        );
        release_table(&mut qs.tables, c);
        assert_eq!(
            Arc::strong_count(&new),
            2,
            "the newest table stays for the next requests"
        );
        assert_eq!(qs.use_table(&new), c);
    }

    #[test]
    fn device_queues_exist_only_while_a_frontend_is_connected() {
        let b = backend();
        assert!(b.completion_fd(0).is_none(), "opened before any frontend");
        b.open_queues();
        let fd = b.completion_fd(0).expect("opened for the frontend");
        b.open_queues();
        assert_eq!(b.completion_fd(0), Some(fd), "opened twice");
        b.close_queues();
        assert!(b.completion_fd(0).is_none(), "kept after the frontend went");
    }

    /// A memory disk whose queues say they complete slowly, as RBD's do.
    struct SlowDevice(MemoryDevice);

    impl BlockDevice for SlowDevice {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read(
            &self,
            offset: u64,
            bufs: &mut crate::engine::BufsMut<'_>,
        ) -> Result<(), crate::engine::BlockError> {
            self.0.read(offset, bufs)
        }
        fn write(
            &self,
            offset: u64,
            bufs: &crate::engine::Bufs<'_>,
        ) -> Result<(), crate::engine::BlockError> {
            self.0.write(offset, bufs)
        }
        fn flush(&self) -> Result<(), crate::engine::BlockError> {
            self.0.flush()
        }
        fn discard(&self, offset: u64, len: u64) -> Result<(), crate::engine::BlockError> {
            self.0.discard(offset, len)
        }
        fn write_zeroes(
            &self,
            offset: u64,
            len: u64,
            may_unmap: bool,
        ) -> Result<(), crate::engine::BlockError> {
            self.0.write_zeroes(offset, len, may_unmap)
        }
        fn open_queue(self: Arc<Self>, opts: &QueueOptions) -> io::Result<Box<dyn IoQueue>> {
            let inner = crate::engine::io::InlineQueue::open(self, opts)?;
            Ok(Box::new(SlowQueue(inner)))
        }
    }

    struct SlowQueue(Box<dyn IoQueue>);

    impl IoQueue for SlowQueue {
        fn submit(&mut self, req: crate::engine::io::IoRequest) {
            self.0.submit(req)
        }
        fn submit_pending(&mut self) {
            self.0.submit_pending()
        }
        fn notifier(&self) -> std::os::fd::RawFd {
            self.0.notifier()
        }
        fn acknowledge(&mut self) {
            self.0.acknowledge()
        }
        fn has_completions(&mut self) -> bool {
            self.0.has_completions()
        }
        fn reap(&mut self, out: &mut dyn FnMut(Completion)) -> usize {
            self.0.reap(out)
        }
        fn in_flight(&self) -> usize {
            self.0.in_flight()
        }
        fn drain(&mut self) {
            self.0.drain()
        }
        fn completes_slowly(&self) -> bool {
            true
        }
    }

    #[test]
    fn a_worker_does_not_poll_a_device_whose_queues_complete_slowly() {
        let settings = |poll_us| DeviceSettings {
            serial: "slow".into(),
            num_queues: 1,
            queue_size: 16,
            read_only: false,
            poll: std::time::Duration::from_micros(poll_us),
            submit_batch: 4,
        };
        let fast = BlkBackend::new(Arc::new(MemoryDevice::new(1 << 20).unwrap()), settings(32));
        fast.open_queues();
        assert!(fast.polls(), "a memory disk is polled for poll-us");
        let slow = BlkBackend::new(
            Arc::new(SlowDevice(MemoryDevice::new(1 << 20).unwrap())),
            settings(32),
        );
        slow.open_queues();
        assert!(!slow.polls(), "polled although its queue completes slowly");
    }

    #[test]
    fn a_connection_gets_at_most_one_worker_per_core() {
        assert_eq!(worker_count(16, 2), 2);
        assert_eq!(worker_count(2, 8), 2);
        assert_eq!(worker_count(1, 0), 1);
    }

    #[test]
    fn each_queue_is_served_by_one_worker_as_the_vring_its_events_name() {
        let dev = Arc::new(MemoryDevice::new(1 << 20).unwrap());
        let settings = DeviceSettings {
            serial: "shared".into(),
            num_queues: 5,
            queue_size: 16,
            read_only: false,
            poll: std::time::Duration::ZERO,
            submit_batch: 4,
        };
        let mut b = BlkBackend::new(dev, settings);
        b.workers = 2;
        let masks = b.queues_per_thread();
        assert_eq!(masks, vec![0b10101, 0b01010]);
        for q in 0..5usize {
            let w = b.worker_of(q);
            assert_ne!(masks[w] & (1 << q), 0, "queue {q} not on worker {w}");
            // The handler numbers a worker's vrings by their rank in its mask; handle_event
            // maps (worker, rank) back to the queue.
            let rank = (masks[w] & ((1u64 << q) - 1)).count_ones() as usize;
            assert_eq!(w + rank * b.worker_threads(), q);
            assert_eq!(q / b.worker_threads(), rank);
            assert!(
                usize::from(b.completion_event(q)) > 5,
                "clashes with the handler's ids"
            );
        }
    }

    #[test]
    fn backend_req_is_offered() {
        assert!(backend()
            .protocol_features()
            .contains(VhostUserProtocolFeatures::BACKEND_REQ));
    }
}
