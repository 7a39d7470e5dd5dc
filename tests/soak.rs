//! A bounded soak: 8 thin exports x 2 queues of mixed I/O (writes, verified reads, flushes,
//! discards, write-zeroes) through libblkio while QMP creates and deletes snapshots of the
//! disks being written and grows them. Afterwards: no request failed, every read returned
//! what its queue last wrote, `thinblk check` (which compares every data and metadata
//! reference count with what is reachable) and `thin_check` pass, and the daemon's peak RSS
//! stayed within its baseline plus the metadata cache limit plus a fixed cost per queue.
//!
//! `THINBLK_SOAK_SECS` (default 60) sets the duration; `THINBLK_SEED` the seed.
#![allow(clippy::unwrap_used)]

mod common;
mod support;

use std::mem::MaybeUninit;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::{Blkioq, Completion, ReqFlags};
use common::{Client, Daemon, Qmp, REGION_LEN};
use serde_json::json;
use support::*;

const DISKS: usize = 8;
const QUEUES: usize = 2;
const DISK: u64 = 32 << 20;
/// Each queue owns half of its disk.
const SPAN: u64 = DISK / QUEUES as u64;
const SPAN_STAMPS: usize = (SPAN / STAMP as u64) as usize;
const MAX_RUN: usize = 32;
const BS: u64 = 64 << 10;
const METADATA_CACHE: u64 = 256 << 10;
/// What one queue may cost beyond the cache: its io_uring, buffers of synchronous requests
/// (copies and zero-fills of up to 1 MiB), descriptor bookkeeping.
const PER_QUEUE: u64 = 2 << 20;

fn wait(q: &mut Blkioq) -> i32 {
    let mut c = [MaybeUninit::<Completion>::uninit()];
    let mut timeout = Duration::from_secs(60);
    let n = q.do_io(&mut c, 1, Some(&mut timeout), None).unwrap();
    assert_eq!(n, 1, "no completion within 60 s");
    // SAFETY: do_io reported one completion written into the first slot.
    unsafe { c[0].assume_init_ref() }.ret
}

#[derive(Default)]
struct Counts {
    ops: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
}

/// One queue's worker: owns `[base, base + SPAN)` of its disk and half of the client's
/// buffer region, and checks every read against what it wrote.
fn worker(
    mut q: Blkioq,
    buf: usize,
    base: u64,
    tag: u64,
    seed: u64,
    deadline: Instant,
    counts: &Counts,
) -> Blkioq {
    let mut rng = Rng::new(seed);
    let mut model = vec![Content::Zero; SPAN_STAMPS];
    let mut gen = 0u64;
    let region = buf as *mut u8;
    let bytes = |at: usize, len: usize| {
        // SAFETY: this worker alone uses its half of the mapped region, and no request of it
        // is in flight while the slice is alive.
        unsafe { std::slice::from_raw_parts_mut(region.add(at), len) }
    };
    while Instant::now() < deadline {
        let n = 1 + rng.below(MAX_RUN as u64) as usize;
        let first = rng.below((SPAN_STAMPS - n) as u64 + 1) as usize;
        let off = base + (first * STAMP) as u64;
        let len = n * STAMP;
        let ret = match rng.below(100) {
            0..=44 => {
                for i in 0..n {
                    gen += 1;
                    let c = Content::Stamp {
                        tag,
                        block: (first + i) as u64,
                        gen,
                    };
                    bytes(i * STAMP, STAMP).copy_from_slice(&content_bytes(c));
                    model[first + i] = c;
                }
                q.write(off, region, len, 0, ReqFlags::empty());
                wait(&mut q)
            }
            45..=84 => {
                q.read(off, region, len, 0, ReqFlags::empty());
                let ret = wait(&mut q);
                if ret == 0 {
                    for i in 0..n {
                        let got = parse(bytes(i * STAMP, STAMP));
                        assert_eq!(
                            got,
                            model[first + i],
                            "tag {tag}: stamp {} reads back wrong",
                            first + i
                        );
                    }
                }
                ret
            }
            85..=92 => {
                q.flush(0, ReqFlags::empty());
                wait(&mut q)
            }
            93..=96 => {
                // Whole data blocks: a thin device unmaps them and they read as zeros.
                let blocks = 1 + rng.below(4);
                let start = base + rng.below(SPAN / BS - blocks + 1) * BS;
                let first = ((start - base) / STAMP as u64) as usize;
                let stamps = (blocks * BS) as usize / STAMP;
                model[first..first + stamps].fill(Content::Zero);
                q.discard(start, blocks * BS, 0, ReqFlags::empty());
                wait(&mut q)
            }
            _ => {
                model[first..first + n].fill(Content::Zero);
                q.write_zeroes(off, len as u64, 0, ReqFlags::empty());
                wait(&mut q)
            }
        };
        if ret != 0 {
            counts.errors.fetch_add(1, Ordering::Relaxed);
        }
        counts.ops.fetch_add(1, Ordering::Relaxed);
        counts.bytes.fetch_add(len as u64, Ordering::Relaxed);
    }
    q
}

#[derive(Default, Debug)]
struct Churn {
    snapshots: u64,
    deletes: u64,
    resizes: u64,
}

/// Snapshots, deletes and resizes through QMP until `stop`.
fn churn(control: &Path, seed: u64, stop: &AtomicBool) -> Churn {
    let mut rng = Rng::new(seed);
    let mut qmp = Qmp::connect(control);
    let mut live: Vec<String> = Vec::new();
    let mut sizes = [DISK; DISKS];
    let mut done = Churn::default();
    let mut n = 0;
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(50 + rng.below(150)));
        match rng.below(10) {
            0..=4 if live.len() < 12 => {
                n += 1;
                let name = format!("s{n}");
                let device = format!("d{}", rng.below(DISKS as u64));
                qmp.ok("thin-snapshot", json!({"device": device, "name": name}));
                live.push(name);
                done.snapshots += 1;
            }
            0..=7 if !live.is_empty() => {
                let name = live.remove(rng.below(live.len() as u64) as usize);
                qmp.ok("thin-delete", json!({"name": name}));
                done.deletes += 1;
            }
            _ => {
                let i = rng.below(DISKS as u64) as usize;
                sizes[i] += 1 << 20;
                let node = format!("d{i}");
                qmp.ok("block-resize", json!({"node-name": node, "size": sizes[i]}));
                done.resizes += 1;
            }
        }
    }
    let pool = qmp.ok("query-pool", json!({}));
    eprintln!("pool at the end: {pool}");
    done
}

fn rss(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

#[test]
fn eight_disks_two_queues_with_snapshots_and_resizes_lose_nothing_and_leak_nothing() {
    let seed = seed(0x50A4);
    let secs = env_count("SOAK_SECS", 60);
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let control = dir.path().join("control.sock");
    let cache = METADATA_CACHE.to_string();
    let mut args: Vec<String> = [
        "--dir",
        pool.to_str().unwrap(),
        "--metadata-size",
        "64M",
        "--data-size",
        "2G",
        "--metadata-cache",
        &cache,
        "--control",
        control.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for i in 0..DISKS {
        args.push("--export".into());
        args.push(format!("name=d{i},size={DISK},queues={QUEUES}"));
    }
    let sockets: Vec<_> = (0..DISKS)
        .map(|i| pool.join(format!("d{i}.sock")))
        .collect();
    let mut wait_for: Vec<&Path> = sockets.iter().map(|s| s.as_path()).collect();
    wait_for.push(&control);
    let daemon = Daemon::start(&args, &wait_for);
    let mut clients: Vec<Client> = sockets
        .iter()
        .map(|s| Client::connect(s, QUEUES as i32))
        .collect();
    let baseline = daemon.peak_rss();

    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let churner = {
        let stop = stop.clone();
        let control = control.clone();
        std::thread::spawn(move || churn(&control, seed ^ 0xC0FFEE, &stop))
    };
    let mut workers = Vec::new();
    for (d, c) in clients.iter_mut().enumerate() {
        let queues = std::mem::take(&mut c.queues);
        for (qi, q) in queues.into_iter().enumerate() {
            let buf = c.region.addr + qi * (REGION_LEN / QUEUES);
            let counts = counts.clone();
            let tag = (d * QUEUES + qi) as u64 + 1;
            let base = qi as u64 * SPAN;
            let s = seed.wrapping_add(tag * 7919);
            workers.push((
                d,
                std::thread::spawn(move || worker(q, buf, base, tag, s, deadline, &counts)),
            ));
        }
    }
    for (d, w) in workers {
        let q = w.join().unwrap();
        clients[d].queues.push(q);
    }
    stop.store(true, Ordering::Release);
    let churned = churner.join().unwrap();
    let elapsed = started.elapsed();
    let peak = daemon.peak_rss();
    let (anon, shmem) = (
        rss(daemon.pid(), "RssAnon:"),
        rss(daemon.pid(), "RssShmem:"),
    );
    drop(clients);
    drop(daemon);

    let ops = counts.ops.load(Ordering::Relaxed);
    let mib = counts.bytes.load(Ordering::Relaxed) >> 20;
    eprintln!(
        "soak: {:.0} s, {ops} requests ({mib} MiB) on {DISKS} disks x {QUEUES} queues, \
         {churned:?}; peak RSS {} MiB (baseline {} MiB; now anon {} MiB, guest memory {} MiB)",
        elapsed.as_secs_f64(),
        peak >> 20,
        baseline >> 20,
        anon >> 20,
        shmem >> 20
    );
    assert_eq!(counts.errors.load(Ordering::Relaxed), 0, "requests failed");
    assert!(churned.snapshots > 0 && churned.deletes > 0 && churned.resizes > 0);
    assert_checks_pass(
        &pool.join("metadata"),
        &format!("seed {seed}, after the soak"),
    );
    // Guest memory the daemon touched is shared with the clients; what it owns is the cache
    // and its queues.
    let guest_memory = (DISKS * REGION_LEN) as u64;
    let bound = baseline + METADATA_CACHE + (DISKS * QUEUES) as u64 * PER_QUEUE + guest_memory;
    assert!(
        peak <= bound,
        "peak RSS {} MiB exceeds {} MiB (baseline + cache + {} queues + guest memory)",
        peak >> 20,
        bound >> 20,
        DISKS * QUEUES
    );
}
