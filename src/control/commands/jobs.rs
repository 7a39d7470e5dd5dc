//! QEMU's job commands: `query-jobs`, `query-block-jobs`, `job-cancel`, `job-complete`, and
//! the older `block-job-cancel` / `block-job-complete` (which name a job by `device`, its
//! id, and answer a missing one with DeviceNotActive, as QEMU does).

use serde::Deserialize;
use serde_json::{json, Value};

use super::{args, NoArgs};
use crate::control::protocol::{ErrorClass, QmpError};
use crate::daemon::jobs::JobError;
use crate::daemon::state::State;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Id {
    id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Device {
    device: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockCancel {
    device: String,
    #[serde(default)]
    force: bool,
}

fn job_error(e: JobError) -> QmpError {
    QmpError::generic(e.to_string())
}

/// The block-job commands' error for a missing job.
fn block_job_error(e: JobError) -> QmpError {
    match e {
        JobError::NotFound(id) => QmpError {
            class: ErrorClass::DeviceNotActive,
            desc: format!("Block job '{id}' not found"),
        },
        e => job_error(e),
    }
}

pub(super) fn query_jobs(state: &State, v: Value) -> Result<Value, QmpError> {
    let NoArgs {} = args(v)?;
    Ok(state.jobs().query_jobs())
}

pub(super) fn query_block_jobs(state: &State, v: Value) -> Result<Value, QmpError> {
    let NoArgs {} = args(v)?;
    Ok(state.jobs().query_block_jobs())
}

/// Cancels at once, even a ready job (QEMU's job-cancel is a forced cancel).
pub(super) fn job_cancel(state: &State, v: Value) -> Result<Value, QmpError> {
    let a: Id = args(v)?;
    state.jobs().cancel(&a.id, true).map_err(job_error)?;
    Ok(json!({}))
}

pub(super) fn job_complete(state: &State, v: Value) -> Result<Value, QmpError> {
    let a: Id = args(v)?;
    state.jobs().complete(&a.id).map_err(job_error)?;
    Ok(json!({}))
}

/// Without `force`, a ready mirror stops without switching over and reports completion.
pub(super) fn block_job_cancel(state: &State, v: Value) -> Result<Value, QmpError> {
    let a: BlockCancel = args(v)?;
    state
        .jobs()
        .cancel(&a.device, a.force)
        .map_err(block_job_error)?;
    Ok(json!({}))
}

pub(super) fn block_job_complete(state: &State, v: Value) -> Result<Value, QmpError> {
    let a: Device = args(v)?;
    state.jobs().complete(&a.device).map_err(block_job_error)?;
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::{Duration, Instant};

    use super::*;
    use crate::daemon::events::Next;
    use crate::daemon::jobs::{Outcome, Request};

    fn call(state: &State, name: &str, v: Value) -> Result<Value, QmpError> {
        super::super::find(name).unwrap()(state, v)
    }

    #[test]
    fn jobs_are_listed_completed_and_cancelled_over_qmp_with_events() {
        let state = State::new(None);
        let sub = state.events().subscribe();
        assert_eq!(call(&state, "query-jobs", json!({})).unwrap(), json!([]));
        let e = call(&state, "job-cancel", json!({"id": "m"})).unwrap_err();
        assert_eq!(
            (e.class, e.desc.as_str()),
            (ErrorClass::GenericError, "Job 'm' not found")
        );
        let e = call(&state, "block-job-complete", json!({"device": "m"})).unwrap_err();
        assert_eq!(e.class, ErrorClass::DeviceNotActive);
        assert!(call(&state, "job-complete", json!({"id": "m", "x": 1})).is_err());

        state
            .jobs()
            .start("m", "mirror", |j| {
                j.set_total(4096);
                j.add_progress(4096);
                j.ready();
                loop {
                    match j.wait_request(Duration::from_secs(10)) {
                        Request::None => {}
                        Request::Cancel => return Ok(Outcome::Cancelled),
                        _ => return Ok(Outcome::Completed),
                    }
                }
            })
            .unwrap();
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        let next = |seen: &mut Vec<String>, until: &str| loop {
            assert!(Instant::now() < deadline, "no {until}: {seen:?}");
            if let Next::Event(e) = sub.queue.next(Duration::from_millis(100)) {
                seen.push(e.name.to_string());
                if e.name == until {
                    return e;
                }
            }
        };
        let ready = next(&mut seen, "BLOCK_JOB_READY");
        assert_eq!(ready.data["device"], "m");
        assert_eq!(ready.data["len"], 4096);
        let b = call(&state, "query-block-jobs", json!({})).unwrap();
        assert_eq!(b[0]["ready"], true);
        call(&state, "block-job-complete", json!({"device": "m"})).unwrap();
        let done = next(&mut seen, "BLOCK_JOB_COMPLETED");
        assert_eq!(done.data["offset"], 4096);
        assert!(seen.iter().all(|n| n != "BLOCK_JOB_CANCELLED"));
    }
}
