#![allow(clippy::unwrap_used)]
use std::time::Instant;

use super::*;

type Seen = Arc<Mutex<Vec<(&'static str, Value)>>>;

fn jobs() -> (Jobs, Seen) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let jobs = Jobs::default();
    jobs.set_sink(Arc::new(move |name, data| s.lock().push((name, data))));
    (jobs, seen)
}

/// Waits until an event named `name` has been seen.
fn wait_event(seen: &Seen, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.lock().iter().any(|(n, _)| *n == name) {
        assert!(Instant::now() < deadline, "no {name} in {:?}", seen.lock());
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_gone(jobs: &Jobs, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while jobs.get(id).is_some() {
        assert!(Instant::now() < deadline, "job {id} never ended");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The events seen, as `NAME` or `JOB_STATUS_CHANGE:status`.
fn names(seen: &Seen) -> Vec<String> {
    seen.lock()
        .iter()
        .map(|(n, d)| match d["status"].as_str() {
            Some(s) if *n == "JOB_STATUS_CHANGE" => s.to_string(),
            _ => n.to_string(),
        })
        .collect()
}

/// A job like a mirror: copies, becomes ready, then waits for the user.
fn mirror_like(job: &Arc<Job>) -> Result<Outcome, String> {
    job.set_total(1 << 20);
    job.add_progress(1 << 20);
    job.ready();
    loop {
        match job.wait_request(Duration::from_secs(30)) {
            Request::None => continue,
            Request::Complete | Request::Stop => return Ok(Outcome::Completed),
            Request::Cancel => return Ok(Outcome::Cancelled),
        }
    }
}

#[test]
fn a_job_goes_ready_and_completes_with_qemus_events() {
    let (jobs, seen) = jobs();
    let job = jobs
        .start("m0", "mirror", |j| {
            // Complete is refused until the job is ready.
            std::thread::sleep(Duration::from_millis(20));
            mirror_like(j)
        })
        .unwrap();
    assert!(matches!(
        jobs.complete("m0"),
        Err(JobError::Verb {
            verb: "complete",
            ..
        })
    ));
    wait_event(&seen, "BLOCK_JOB_READY");
    assert_eq!(job.status(), JobStatus::Ready);
    let q = jobs.query_jobs();
    assert_eq!(q[0]["id"], "m0");
    assert_eq!(q[0]["type"], "mirror");
    assert_eq!(q[0]["status"], "ready");
    assert_eq!(q[0]["current-progress"], 1 << 20);
    assert_eq!(q[0]["total-progress"], 1 << 20);
    let b = jobs.query_block_jobs();
    assert_eq!(b[0]["device"], "m0");
    assert_eq!(b[0]["ready"], true);
    assert_eq!(b[0]["len"], 1 << 20);
    assert_eq!(b[0]["offset"], 1 << 20);
    jobs.complete("m0").unwrap();
    wait_gone(&jobs, "m0");
    assert_eq!(
        names(&seen),
        [
            "created",
            "running",
            "ready",
            "BLOCK_JOB_READY",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
    let done = seen.lock()[6].1.clone();
    assert_eq!(done["device"], "m0");
    assert!(done.get("error").is_none());
    assert_eq!(jobs.query_jobs(), json!([]));
    // The id is free again.
    jobs.start("m0", "mirror", |_| Ok(Outcome::Completed))
        .unwrap();
}

#[test]
fn job_cancel_cancels_and_block_job_cancel_of_a_ready_job_completes() {
    let (jobs, seen) = jobs();
    jobs.start("a", "mirror", mirror_like).unwrap();
    wait_event(&seen, "BLOCK_JOB_READY");
    jobs.cancel("a", true).unwrap();
    wait_gone(&jobs, "a");
    let n = names(&seen);
    assert!(n.contains(&"BLOCK_JOB_CANCELLED".into()), "{n:?}");
    assert!(n.contains(&"aborting".into()), "{n:?}");
    assert!(!n.contains(&"BLOCK_JOB_COMPLETED".into()), "{n:?}");

    let (jobs, seen) = self::jobs();
    jobs.start("b", "mirror", mirror_like).unwrap();
    wait_event(&seen, "BLOCK_JOB_READY");
    jobs.cancel("b", false).unwrap();
    wait_gone(&jobs, "b");
    let n = names(&seen);
    assert!(n.contains(&"BLOCK_JOB_COMPLETED".into()), "{n:?}");
    assert!(!n.contains(&"BLOCK_JOB_CANCELLED".into()), "{n:?}");
}

#[test]
fn a_failing_or_panicking_job_ends_with_its_error() {
    let (jobs, seen) = jobs();
    jobs.start("e", "mirror", |_| Err("target went away".into()))
        .unwrap();
    wait_gone(&jobs, "e");
    jobs.start("p", "mirror", |_| panic!("bug")).unwrap();
    wait_gone(&jobs, "p");
    let ev = seen.lock();
    let errors: Vec<&Value> = ev
        .iter()
        .filter(|(n, _)| *n == "BLOCK_JOB_COMPLETED")
        .map(|(_, d)| &d["error"])
        .collect();
    assert_eq!(errors.len(), 2);
    assert_eq!(errors[0], "target went away");
    assert!(errors[1].is_string());
}

#[test]
fn ids_are_checked_and_unique() {
    let (jobs, _seen) = jobs();
    for bad in ["", "1a", "a b", "a/b"] {
        assert!(matches!(
            jobs.start(bad, "mirror", |_| Ok(Outcome::Completed)),
            Err(JobError::BadId(_))
        ));
    }
    jobs.start("x", "mirror", mirror_like).unwrap();
    assert_eq!(
        jobs.start("x", "mirror", mirror_like).err(),
        Some(JobError::InUse("x".into()))
    );
    assert_eq!(jobs.cancel("y", true), Err(JobError::NotFound("y".into())));
    assert_eq!(jobs.complete("y"), Err(JobError::NotFound("y".into())));
    jobs.cancel_all();
    assert!(jobs.get("x").is_none());
}

#[test]
fn a_cancel_runs_the_jobs_cancel_hook() {
    let (jobs, _seen) = jobs();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let tx = Mutex::new(tx);
    jobs.start("h", "mirror", move |j| {
        // A body stuck on I/O only the hook can end.
        let (unblock, blocked) = std::sync::mpsc::channel::<()>();
        let unblock = Mutex::new(unblock);
        j.set_on_cancel(Box::new(move || {
            let _ = unblock.lock().send(());
        }));
        let _ = tx.lock().send(());
        blocked.recv().map_err(|e| e.to_string())?;
        Ok(Outcome::Cancelled)
    })
    .unwrap();
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    jobs.cancel("h", true).unwrap();
    wait_gone(&jobs, "h");
}
