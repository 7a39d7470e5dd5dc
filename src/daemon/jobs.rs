//! Background jobs, shown as QEMU's job layer shows them (qapi/job.json, block-core.json):
//! `query-jobs` / `query-block-jobs`, `job-cancel` / `job-complete` and their `block-job-*`
//! aliases, the events JOB_STATUS_CHANGE, BLOCK_JOB_READY, BLOCK_JOB_COMPLETED and
//! BLOCK_JOB_CANCELLED, progress in bytes. Every job is auto-finalized and auto-dismissed:
//! it leaves the list when it ends, as QEMU's do by default.
//!
//! A job is a body run on a thread of its own; this module owns its status and events, so
//! a body only does its work: it reports progress, says when it is `ready`, and looks at
//! `request()` (or waits in `wait_request`) to learn whether the user asked it to complete
//! or to stop. It returns how it ended; a panic in it ends the job with an error rather
//! than leaving it listed forever.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{info, warn};
use parking_lot::{Condvar, Mutex};
use serde_json::{json, Value};

/// Where job events go (the daemon's `State::emit`).
pub type Sink = Arc<dyn Fn(&'static str, Value) + Send + Sync>;

/// QEMU's JobStatus, less the states only paused or transactional jobs reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobStatus {
    Created,
    Running,
    Ready,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    Null,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Ready => "ready",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }
}

/// What the user asked of a running job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    None,
    /// `job-complete`: finish (for a mirror: switch over to the target).
    Complete,
    /// `block-job-cancel` of a ready job without `force`: finish without switching over;
    /// the job still counts as completed (QEMU's mirror does the same).
    Stop,
    /// `job-cancel`, or `block-job-cancel` of a job not ready (or with `force`).
    Cancel,
}

/// How a job's body ended without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Cancelled,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("Job '{0}' not found")]
    NotFound(String),
    #[error("Job ID '{0}' already in use")]
    InUse(String),
    #[error("Invalid job ID '{0}'")]
    BadId(String),
    #[error("Job '{id}' in state '{state}' cannot accept command verb '{verb}'")]
    Verb {
        id: String,
        state: &'static str,
        verb: &'static str,
    },
    #[error("starting the job's thread: {0}")]
    Spawn(String),
}

struct Inner {
    status: JobStatus,
    request: Request,
    error: Option<String>,
}

/// One job, shared by the registry and its thread.
pub struct Job {
    id: String,
    /// QEMU's JobType (`mirror`).
    kind: &'static str,
    current: AtomicU64,
    total: AtomicU64,
    inner: Mutex<Inner>,
    wake: Condvar,
    sink: Sink,
    /// Called when a cancel is asked (a body blocked on I/O that may never end unblocks).
    on_cancel: Mutex<Option<Box<dyn Fn() + Send>>>,
}

impl Job {
    /// `f` runs (on the canceller's thread) when the job is asked to cancel, or at once if
    /// it was already.
    /// (It may run twice if the cancel comes while it is being set.)
    pub fn set_on_cancel(&self, f: Box<dyn Fn() + Send>) {
        let mut slot = self.on_cancel.lock();
        // `ask` records a cancel before it looks here: either it finds `f`, or the
        // request is seen below.
        let f = slot.insert(f);
        if self.request() == Request::Cancel {
            f();
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn status(&self) -> JobStatus {
        self.inner.lock().status
    }

    /// Bytes the job expects to move (it may change either way while the job runs).
    pub fn set_total(&self, bytes: u64) {
        self.total.store(bytes, Ordering::Relaxed);
    }

    pub fn add_total(&self, bytes: u64) {
        self.total.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes moved; only ever grows.
    pub fn add_progress(&self, bytes: u64) {
        self.current.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn progress(&self) -> (u64, u64) {
        (
            self.current.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }

    /// What the user asked, if anything.
    pub fn request(&self) -> Request {
        self.inner.lock().request
    }

    /// Waits up to `t` for a request (returns at once if there is one).
    pub fn wait_request(&self, t: Duration) -> Request {
        let mut g = self.inner.lock();
        if g.request == Request::None {
            self.wake.wait_for(&mut g, t);
        }
        g.request
    }

    /// The job caught up and waits for `job-complete`: status `ready` and BLOCK_JOB_READY,
    /// once.
    pub fn ready(&self) {
        if self.set_status_if(JobStatus::Ready, |s| s == JobStatus::Running) {
            (self.sink)("BLOCK_JOB_READY", self.block_event());
        }
    }

    fn set_status(&self, s: JobStatus) {
        self.set_status_if(s, |_| true);
    }

    /// Moves to `s` if the status allows it, with its JOB_STATUS_CHANGE.
    fn set_status_if(&self, s: JobStatus, allowed: impl FnOnce(JobStatus) -> bool) -> bool {
        {
            let mut g = self.inner.lock();
            if g.status == s || !allowed(g.status) {
                return false;
            }
            g.status = s;
        }
        (self.sink)(
            "JOB_STATUS_CHANGE",
            json!({"id": self.id, "status": s.as_str()}),
        );
        true
    }

    /// The data BLOCK_JOB_READY, _COMPLETED and _CANCELLED share.
    fn block_event(&self) -> Value {
        let (offset, len) = self.progress();
        json!({"type": self.kind, "device": self.id, "len": len, "offset": offset, "speed": 0})
    }

    /// QEMU's JobInfo.
    pub fn info(&self) -> Value {
        let (current, total) = self.progress();
        let g = self.inner.lock();
        let mut v = json!({
            "id": self.id,
            "type": self.kind,
            "status": g.status.as_str(),
            "current-progress": current,
            "total-progress": total,
        });
        if let Some(e) = &g.error {
            v["error"] = json!(e);
        }
        v
    }

    /// QEMU's BlockJobInfo (a job's id is its `device`, as for jobs made with a job-id).
    pub fn block_info(&self) -> Value {
        let (offset, len) = self.progress();
        let g = self.inner.lock();
        let mut v = json!({
            "type": self.kind,
            "device": self.id,
            "len": len,
            "offset": offset,
            "busy": matches!(g.status, JobStatus::Running),
            "paused": false,
            "speed": 0,
            "io-status": "ok",
            "ready": g.status == JobStatus::Ready,
            "status": g.status.as_str(),
            "auto-finalize": true,
            "auto-dismiss": true,
        });
        if let Some(e) = &g.error {
            v["error"] = json!(e);
        }
        v
    }

    /// Records `r` unless the status refuses `verb`.
    fn ask(&self, r: Request, verb: &'static str) -> Result<(), JobError> {
        let mut g = self.inner.lock();
        let ok = match r {
            Request::Complete => g.status == JobStatus::Ready && g.request == Request::None,
            _ => !matches!(
                g.status,
                JobStatus::Aborting | JobStatus::Concluded | JobStatus::Null
            ),
        };
        if !ok {
            return Err(JobError::Verb {
                id: self.id.clone(),
                state: g.status.as_str(),
                verb,
            });
        }
        // A cancel overrides a complete not yet acted on; nothing overrides a cancel.
        if g.request != Request::Cancel {
            g.request = r;
        }
        drop(g);
        self.wake.notify_all();
        if r == Request::Cancel {
            if let Some(f) = &*self.on_cancel.lock() {
                f();
            }
        }
        Ok(())
    }
}

struct Entry {
    job: Arc<Job>,
    thread: Option<JoinHandle<()>>,
}

/// The daemon's jobs, by id.
#[derive(Default)]
pub struct Jobs {
    map: Arc<Mutex<BTreeMap<String, Entry>>>,
    sink: OnceLock<Sink>,
}

/// QEMU's rule for ids: a letter, then letters, digits, `-`, `.` and `_`.
fn valid_id(id: &str) -> bool {
    let mut c = id.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic())
        && c.all(|ch| ch.is_ascii_alphanumeric() || "-._".contains(ch))
        && id.len() <= 128
}

impl Jobs {
    /// Where events go from now on (set once, when the daemon's state is made).
    pub fn set_sink(&self, sink: Sink) {
        let _ = self.sink.set(sink);
    }

    fn sink(&self) -> Sink {
        self.sink
            .get()
            .cloned()
            .unwrap_or_else(|| Arc::new(|_, _| {}))
    }

    /// Starts job `id` of type `kind` running `body` on a thread of its own.
    pub fn start<F>(&self, id: &str, kind: &'static str, body: F) -> Result<Arc<Job>, JobError>
    where
        F: FnOnce(&Arc<Job>) -> Result<Outcome, String> + Send + 'static,
    {
        if !valid_id(id) {
            return Err(JobError::BadId(id.to_string()));
        }
        let job = Arc::new(Job {
            id: id.to_string(),
            kind,
            current: AtomicU64::new(0),
            total: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                status: JobStatus::Created,
                request: Request::None,
                error: None,
            }),
            wake: Condvar::new(),
            sink: self.sink(),
            on_cancel: Mutex::new(None),
        });
        let mut map = self.map.lock();
        if map.contains_key(id) {
            return Err(JobError::InUse(id.to_string()));
        }
        (job.sink)(
            "JOB_STATUS_CHANGE",
            json!({"id": id, "status": JobStatus::Created.as_str()}),
        );
        let (j, m) = (job.clone(), self.map.clone());
        // The thread starts with the table locked by us, so it finds its own entry when
        // it ends, even if it ends at once.
        let thread = std::thread::Builder::new()
            .name(format!("job-{id}"))
            .spawn(move || run(&j, body, &m))
            .map_err(|e| JobError::Spawn(e.to_string()))?;
        map.insert(
            id.to_string(),
            Entry {
                job: job.clone(),
                thread: Some(thread),
            },
        );
        Ok(job)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.map.lock().get(id).map(|e| e.job.clone())
    }

    fn find(&self, id: &str) -> Result<Arc<Job>, JobError> {
        self.get(id)
            .ok_or_else(|| JobError::NotFound(id.to_string()))
    }

    /// `job-cancel`, or `block-job-cancel` (`force` false: a ready job stops without
    /// switching over and counts as completed).
    pub fn cancel(&self, id: &str, force: bool) -> Result<(), JobError> {
        let job = self.find(id)?;
        let r = if !force && job.status() == JobStatus::Ready {
            Request::Stop
        } else {
            Request::Cancel
        };
        job.ask(r, "cancel")
    }

    /// `job-complete`: only a ready job may.
    pub fn complete(&self, id: &str) -> Result<(), JobError> {
        self.find(id)?.ask(Request::Complete, "complete")
    }

    pub fn query_jobs(&self) -> Value {
        Value::Array(self.map.lock().values().map(|e| e.job.info()).collect())
    }

    pub fn query_block_jobs(&self) -> Value {
        Value::Array(
            self.map
                .lock()
                .values()
                .map(|e| e.job.block_info())
                .collect(),
        )
    }

    /// Cancels every job and waits for their threads (shutdown).
    pub fn cancel_all(&self) {
        let threads: Vec<JoinHandle<()>> = {
            let mut map = self.map.lock();
            map.values_mut()
                .filter_map(|e| {
                    let _ = e.job.ask(Request::Cancel, "cancel");
                    e.thread.take()
                })
                .collect()
        };
        for t in threads {
            let _ = t.join();
        }
    }
}

/// A job's thread: runs `body`, then walks the job to its end with QEMU's events.
fn run<F>(job: &Arc<Job>, body: F, map: &Mutex<BTreeMap<String, Entry>>)
where
    F: FnOnce(&Arc<Job>) -> Result<Outcome, String>,
{
    job.set_status(JobStatus::Running);
    let ended = catch_unwind(AssertUnwindSafe(|| body(job)))
        .unwrap_or_else(|_| Err("the job failed unexpectedly (a bug: see the log)".into()));
    match ended {
        Ok(Outcome::Completed) => {
            info!("job {} completed", job.id);
            job.set_status(JobStatus::Waiting);
            job.set_status(JobStatus::Pending);
            (job.sink)("BLOCK_JOB_COMPLETED", job.block_event());
        }
        Ok(Outcome::Cancelled) => {
            info!("job {} cancelled", job.id);
            job.set_status(JobStatus::Aborting);
            (job.sink)("BLOCK_JOB_CANCELLED", job.block_event());
        }
        Err(e) => {
            warn!("job {} failed: {e}", job.id);
            job.inner.lock().error = Some(e.clone());
            job.set_status(JobStatus::Aborting);
            let mut data = job.block_event();
            data["error"] = json!(e);
            (job.sink)("BLOCK_JOB_COMPLETED", data);
        }
    }
    job.set_status(JobStatus::Concluded);
    // Auto-dismissed: the id is free again once the client sees `null`.
    let entry = map.lock().remove(&job.id);
    job.set_status(JobStatus::Null);
    // Our own handle: dropping it detaches this thread, which is about to end anyway.
    drop(entry);
}

#[cfg(test)]
#[path = "jobs_tests.rs"]
mod tests;
