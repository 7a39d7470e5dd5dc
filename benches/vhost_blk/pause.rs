//! Live snapshots during I/O: while the client keeps random reads in flight, snapshots of the
//! disk are taken over QMP, and every request's submission and completion times are kept so
//! that the longest request overlapping each snapshot command (the stall a guest sees) can be
//! set against the latency of the same load without snapshots.
//!
//! Reads, not writes: after a snapshot every first write to a block copies it (64 KiB), a cost
//! of its own that would hide the pause in the stall.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::client::Client;
use crate::job::{Job, Op, Pattern};
use crate::qmp::Qmp;
use crate::server::{cpu_seconds, peak_rss_kib, Server};
use crate::stats::{Measurement, Summary};

/// Snapshots taken per server.
pub const SNAPSHOTS: usize = 20;
/// Quiet time after each snapshot, so that one snapshot's stall is over before the next.
pub const GAP: Duration = Duration::from_millis(100);
/// The goal for the longest stall.
pub const GOAL: Duration = Duration::from_millis(5);

/// The load: 4 KiB random reads, a few in flight so that the pause finds some to hold.
pub fn job() -> Job {
    Job::new(Op::Read, Pattern::Random, 4096, 4)
}

/// The I/O pause and the commit time a server reports for a snapshot, if it reports them.
pub type Reported = Option<(Duration, Duration)>;

/// How a server takes snapshot number `n` over `qmp`.
pub type Take = dyn FnMut(&mut Qmp, usize) -> Result<Reported, String> + Send;

/// What one server did.
pub struct Pause {
    /// The load without snapshots (warm-up excluded), with the server's cost over it.
    pub quiet: Summary,
    pub quiet_max: Duration,
    /// Per snapshot: the longest request that overlapped the QMP command.
    pub stalls: Vec<Duration>,
    /// Per snapshot: the QMP command's round trip.
    pub commands: Vec<Duration>,
    /// Per snapshot, as the server reports it: how long I/O was held, and the commit after.
    pub reported: Vec<(Duration, Duration)>,
}

/// `take`s `count` snapshots through `qmp_path` of the disk served at `vhost`, after `warmup`
/// and a `quiet` window of the load alone.
pub fn measure(
    server: &Server,
    vhost: &Path,
    qmp_path: &Path,
    (warmup, quiet): (Duration, Duration),
    count: usize,
    take: &mut Take,
) -> Result<Pause, String> {
    let job = job();
    let tail = |e: String| format!("{e} ({})", server.log_tail());
    let mut client = Client::connect(vhost, job.qd * job.bs).map_err(tail)?;
    let mut qmp = Qmp::connect(qmp_path).map_err(tail)?;
    let pid = server.pid();
    let quiet_start = Instant::now() + warmup;
    let quiet_end = quiet_start + quiet;
    let stop = AtomicBool::new(false);
    let mut trace: Vec<(Instant, Instant)> = Vec::with_capacity(1 << 20);
    let mut cpu = (None, None);
    let (driven, taken) = std::thread::scope(|scope| {
        let snapshots = scope.spawn(|| {
            let r = snapshots(&mut qmp, take, count, quiet_end);
            stop.store(true, Ordering::Relaxed);
            r
        });
        let driven = client.drive(&job, u64::MAX, &mut |submitted, done| {
            if done >= quiet_start && cpu.0.is_none() {
                cpu.0 = cpu_seconds(pid);
            }
            if done >= quiet_end && cpu.1.is_none() {
                cpu.1 = cpu_seconds(pid);
            }
            trace.push((submitted, done));
            !stop.load(Ordering::Relaxed)
        });
        let taken = snapshots
            .join()
            .unwrap_or_else(|_| Err("the snapshot thread panicked".into()));
        (driven, taken)
    });
    driven.map_err(tail)?;
    let taken = taken.map_err(tail)?;

    let mut lat_ns: Vec<u64> = trace
        .iter()
        .filter(|(_, done)| (quiet_start..quiet_end).contains(done))
        .map(|(s, d)| d.duration_since(*s).as_nanos() as u64)
        .collect();
    let quiet_max = Duration::from_nanos(lat_ns.iter().copied().max().unwrap_or(0));
    lat_ns.shrink_to_fit();
    let ios = lat_ns.len() as u64;
    let mut summary = Measurement {
        ios,
        bytes: ios * job.bs as u64,
        seconds: quiet.as_secs_f64(),
        lat_ns,
        server_cpu_seconds: cpu.0.zip(cpu.1).map(|(a, b)| b - a),
        note: None,
    }
    .summary();
    summary.peak_rss_kib = peak_rss_kib(pid);

    let stalls = taken
        .iter()
        .map(|(from, to, _)| {
            trace
                .iter()
                .filter(|(s, d)| s < to && d > from)
                .map(|(s, d)| d.duration_since(*s))
                .max()
                .unwrap_or_default()
        })
        .collect();
    Ok(Pause {
        quiet: summary,
        quiet_max,
        stalls,
        commands: taken.iter().map(|(a, b, _)| b.duration_since(*a)).collect(),
        reported: taken.iter().filter_map(|(_, _, r)| *r).collect(),
    })
}

type Taken = (Instant, Instant, Reported);

fn snapshots(
    qmp: &mut Qmp,
    take: &mut Take,
    count: usize,
    at: Instant,
) -> Result<Vec<Taken>, String> {
    std::thread::sleep(at.saturating_duration_since(Instant::now()));
    let mut taken = Vec::with_capacity(count);
    for n in 1..=count {
        let from = Instant::now();
        let reported = take(qmp, n)?;
        taken.push((from, Instant::now(), reported));
        std::thread::sleep(GAP);
    }
    Ok(taken)
}

fn us(v: &Value, key: &str) -> Result<Duration, String> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(Duration::from_micros)
        .ok_or_else(|| format!("thin-snapshot replied without {key}: {v}"))
}

/// thinblk's `thin-snapshot` of `device`, which replies with the pause and the commit.
pub fn thin_snapshot(
    device: &str,
) -> impl FnMut(&mut Qmp, usize) -> Result<Reported, String> + Send + '_ {
    move |qmp, n| {
        let r = qmp.execute(
            "thin-snapshot",
            json!({"device": device, "name": format!("live{n}")}),
        )?;
        Ok(Some((us(&r, "pause-us")?, us(&r, "commit-us")?)))
    }
}

/// QEMU's internal snapshot of the qcow2 node `node` (thinblk takes the same command).
pub fn internal_snapshot(
    node: &str,
) -> impl FnMut(&mut Qmp, usize) -> Result<Reported, String> + Send + '_ {
    move |qmp, n| {
        let args = json!({"device": node, "name": format!("live{n}")});
        qmp.execute("blockdev-snapshot-internal-sync", args)?;
        Ok(None)
    }
}

/// `812 µs` below a millisecond, `3.4 ms` above.
pub fn dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 100_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{:.0} ms", us / 1000.0)
    }
}

/// `p50 / max` of `v`.
pub fn spread(v: &[Duration]) -> String {
    let mut v = v.to_vec();
    v.sort_unstable();
    match (v.get(v.len().saturating_sub(1) / 2), v.last()) {
        (Some(mid), Some(max)) => format!("{} / {}", dur(*mid), dur(*max)),
        _ => "-".into(),
    }
}

impl Pause {
    pub fn longest_stall(&self) -> Duration {
        self.stalls.iter().copied().max().unwrap_or_default()
    }

    /// The short form for the thin table: the longest stall, the command's longest round trip.
    pub fn cell(&self) -> String {
        let cmd = self.commands.iter().copied().max().unwrap_or_default();
        format!(
            "longest stall {} (quiet max {}), QMP command up to {}",
            dur(self.longest_stall()),
            dur(self.quiet_max),
            dur(cmd)
        )
    }
}
