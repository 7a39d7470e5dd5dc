//! Throughput of `thin-mirror` (issue 15) beside `qemu-img convert` of the same content into
//! the same kind of target, and beside plain sequential writes into that target.
//!
//! ```text
//! cargo bench --bench mirror -- [--size-gib 4] [--mapped-percent 25] [--rounds 5] [--dir DIR]
//! ```
//!
//! Two thinblk daemons (pool A holds the source, pool B the targets; each pool a sparse file
//! under DIR, default target/bench-mirror), NBD on unix sockets. The source is a thin disk
//! of SIZE with MAPPED% of it written (1 MiB runs spread over the whole disk, random bytes);
//! the rest are holes. Each round measures, in an order that rotates from round to round,
//! each into a fresh thin device of pool B over NBD (deleted after the round):
//!
//! - sequential write: the mapped amount written from memory, 4 MiB writes, 16 in flight,
//!   then a flush: the target's write rate (the reference);
//! - thin-mirror, sync full: from the command to the job's end (first pass, ready, then
//!   `block-job-cancel`, which flushes the target);
//! - `qemu-img convert -n` from pool A's NBD export of the source (it reads the allocation
//!   map and zeroes holes, as the mirror does).
//!
//! Then once: thin-mirror of a disk of SIZE with nothing mapped (the cost of holes alone).
//!
//! Rates are of the mapped bytes; a round's ratios are against that round's sequential
//! write, and the summary gives their median and range. The disk's rate varies a lot from
//! one second to the next on a shared machine: ratios taken within a round, over several
//! rounds, are what to compare, not absolute rates.
//! Under `cargo test` (no `--bench` argument) a smoke run: 64 MiB, one round, no qemu-img.
#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "vhost_blk/qmp.rs"]
mod qmp;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use thinblk::nbd::client::{Command as Nbd, NbdClient};

use qmp::Qmp;

const MIB: u64 = 1 << 20;
/// The mirror's request size and window (src/mirror/copy.rs, nbd::client::DEFAULT_IN_FLIGHT).
const CHUNK: u64 = 4 * MIB;
const IN_FLIGHT: usize = 16;

struct Pool {
    child: Child,
    qmp: Qmp,
    nbd: PathBuf,
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_pool(dir: &Path, name: &str, data_size: u64) -> Pool {
    let pool = dir.join(name);
    let (ctl, nbd) = (
        dir.join(format!("{name}.ctl")),
        dir.join(format!("{name}.nbd")),
    );
    let child = Command::new(env!("CARGO_BIN_EXE_thinblk"))
        .arg("serve")
        .arg("--dir")
        .arg(&pool)
        .arg("--data-size")
        .arg(data_size.to_string())
        .arg("--control")
        .arg(&ctl)
        .arg("--nbd")
        .arg(&nbd)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn thinblk");
    let qmp = Qmp::connect(&ctl).expect("QMP");
    Pool { child, qmp, nbd }
}

impl Pool {
    fn ok(&mut self, cmd: &str, args: Value) -> Value {
        self.qmp
            .execute(cmd, args.clone())
            .unwrap_or_else(|e| panic!("{cmd} {args}: {e}"))
    }

    /// A thin device exported over NBD; its URI.
    fn disk(&mut self, name: &str, size: u64, writable: bool) -> String {
        self.ok("thin-create", json!({"name": name, "size": size}));
        self.ok(
            "nbd-server-add",
            json!({"device": name, "name": name, "writable": writable}),
        );
        format!("nbd+unix:///{name}?socket={}", self.nbd.display())
    }

    fn mapped(&mut self, name: &str) -> u64 {
        let devs = self.ok("query-thin-devices", json!({}));
        devs.as_array()
            .and_then(|a| a.iter().find(|d| d["name"] == name))
            .and_then(|d| d["mapped-bytes"].as_u64())
            .unwrap_or(0)
    }
}

/// Whether 1 MiB run `i` of the source is mapped.
fn mapped_run(i: u64, percent: u64) -> bool {
    (i * percent) % 100 < percent
}

fn random_mib(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(MIB as usize);
    while v.len() < MIB as usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

/// Writes `data_at(offset)` pieces of `CHUNK` at the offsets given, 16 in flight, then
/// flushes.
fn write_pieces(c: &NbdClient, offsets: impl Iterator<Item = u64>, data: &dyn Fn(u64) -> Vec<u8>) {
    for off in offsets {
        let buf = data(off);
        c.submit(
            Nbd::Write {
                offset: off,
                data: &buf,
                fua: false,
            },
            Box::new(|r| {
                r.expect("write");
            }),
        )
        .expect("submit");
    }
    c.drain();
    c.flush().expect("flush");
}

/// Runs a mirror of `device` into `target` on pool `a`, stopped as soon as it is ready;
/// the seconds from the command to the job's end.
fn mirror(a: &mut Pool, device: &str, target: &str) -> f64 {
    let start = Instant::now();
    a.ok(
        "thin-mirror",
        json!({"job-id": "bench", "device": device, "target": target, "sync": "full"}),
    );
    let mut stopped = false;
    loop {
        let jobs = a.ok("query-block-jobs", json!({}));
        let Some(job) = jobs.as_array().and_then(|j| j.first()) else {
            break;
        };
        if job["ready"] == true && !stopped {
            a.ok("block-job-cancel", json!({"device": "bench"}));
            stopped = true;
        }
        assert!(start.elapsed() < Duration::from_secs(3600), "mirror hangs");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        stopped,
        "the mirror ended without being ready (see the daemon's log)"
    );
    start.elapsed().as_secs_f64()
}

/// The kinds of copy a round measures, in the order of round 0.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sequential,
    Mirror,
    Convert,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Sequential => "sequential write",
            Kind::Mirror => "thin-mirror",
            Kind::Convert => "qemu-img convert",
        }
    }
}

/// Seconds of each kind in one round (`None`: not measured).
#[derive(Default, Clone, Copy)]
struct Round {
    sequential: f64,
    mirror: f64,
    convert: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn spread(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// A fresh exported thin device of pool B, measured by `f`, checked to map `want` bytes
/// (if given), then deleted so the rounds fit in the pool.
fn on_fresh_target(
    b: &mut Pool,
    name: &str,
    size: u64,
    want: Option<u64>,
    f: impl FnOnce(&str) -> Result<f64, String>,
) -> Result<f64, String> {
    let uri = b.disk(name, size, true);
    let secs = f(&uri)?;
    let mapped = b.mapped(name);
    b.ok("nbd-server-remove", json!({"name": name, "mode": "hard"}));
    b.ok("thin-delete", json!({"name": name, "force": true}));
    match want {
        Some(w) if w != mapped => Err(format!(
            "{name}: the target maps {mapped} bytes, the source {w} (holes must stay holes)"
        )),
        _ => Ok(secs),
    }
}

fn sequential(uri: &str, mapped: u64) -> Result<f64, String> {
    let c = NbdClient::connect_uri(uri, IN_FLIGHT).map_err(|e| e.to_string())?;
    let piece = random_mib(7).repeat((CHUNK / MIB) as usize);
    let start = Instant::now();
    write_pieces(&c, (0..mapped).step_by(CHUNK as usize), &|_| piece.clone());
    Ok(start.elapsed().as_secs_f64())
}

fn convert(src: &str, uri: &str) -> Result<f64, String> {
    let start = Instant::now();
    let out = Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw", src, uri])
        .output()
        .map_err(|e| format!("qemu-img (Debian package qemu-utils): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img convert: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(start.elapsed().as_secs_f64())
}

fn report(rounds: &[Round], mapped: u64, size: u64, percent: u64, holes_secs: f64) -> String {
    let rate = |secs: f64| mapped as f64 / MIB as f64 / secs;
    let mut s = format!(
        "Mirror throughput: a {} MiB thin disk, {}% mapped in 1 MiB runs (pool blocks 64 KiB), \
         pool A to pool B over NBD (unix sockets); {} rounds, the order rotating.\n\n\
         | round | sequential write MiB/s | thin-mirror MiB/s | vs seq | qemu-img convert MiB/s | vs seq |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        size / MIB,
        percent,
        rounds.len()
    );
    for (i, r) in rounds.iter().enumerate() {
        let conv = r.convert.map_or("- | -".to_string(), |c| {
            format!("{:.0} | {:.2}x", rate(c), r.sequential / c)
        });
        s += &format!(
            "| {} | {:.0} | {:.0} | {:.2}x | {} |\n",
            i + 1,
            rate(r.sequential),
            rate(r.mirror),
            r.sequential / r.mirror,
            conv
        );
    }
    let seq: Vec<f64> = rounds.iter().map(|r| rate(r.sequential)).collect();
    let mir: Vec<f64> = rounds.iter().map(|r| r.sequential / r.mirror).collect();
    let conv: Vec<f64> = rounds
        .iter()
        .filter_map(|r| r.convert.map(|c| r.sequential / c))
        .collect();
    let (slo, shi) = spread(&seq);
    let (mlo, mhi) = spread(&mir);
    s += &format!(
        "\nMedians: sequential write {:.0} MiB/s ({slo:.0}-{shi:.0}); thin-mirror {:.2}x \
         ({mlo:.2}-{mhi:.2})",
        median(seq.clone()),
        median(mir.clone()),
    );
    if !conv.is_empty() {
        let (clo, chi) = spread(&conv);
        s += &format!(
            "; qemu-img convert {:.2}x ({clo:.2}-{chi:.2})",
            median(conv.clone())
        );
    }
    s += &format!(
        ".\nThin-mirror of the disk with nothing mapped: {holes_secs:.2} s (its target maps 0 bytes).\n"
    );
    s
}

fn run(
    dir: &Path,
    size: u64,
    percent: u64,
    rounds: usize,
    with_qemu_img: bool,
) -> Result<String, String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let runs = size / MIB;
    let mapped_runs: Vec<u64> = (0..runs).filter(|&i| mapped_run(i, percent)).collect();
    let mapped = mapped_runs.len() as u64 * MIB;
    let mut a = start_pool(dir, "a", size + size / 4 + 64 * MIB);
    // Targets are deleted after each round: room for one round's three at a time.
    let mut b = start_pool(dir, "b", 3 * size + 64 * MIB);

    eprintln!("filling the source: {size} bytes, {mapped} mapped");
    let src = a.disk("src", size, true);
    a.disk("holes", size, true);
    {
        let c = NbdClient::connect_uri(&src, IN_FLIGHT).map_err(|e| e.to_string())?;
        for run in mapped_runs.chunks(64) {
            let bufs: Vec<(u64, Vec<u8>)> = run.iter().map(|&i| (i * MIB, random_mib(i))).collect();
            for (off, buf) in &bufs {
                c.submit(
                    Nbd::Write {
                        offset: *off,
                        data: buf,
                        fua: false,
                    },
                    Box::new(|r| {
                        r.expect("fill");
                    }),
                )
                .map_err(|e| e.to_string())?;
            }
            c.drain();
        }
        c.flush().map_err(|e| e.to_string())?;
    }
    let src_mapped = a.mapped("src");
    if src_mapped != mapped {
        return Err(format!("the source maps {src_mapped} bytes, not {mapped}"));
    }

    let mut kinds = vec![Kind::Sequential, Kind::Mirror];
    if with_qemu_img {
        kinds.push(Kind::Convert);
    }
    let mut results = Vec::new();
    for round in 0..rounds {
        let mut r = Round::default();
        for k in 0..kinds.len() {
            let kind = kinds[(round + k) % kinds.len()];
            let name = format!("{}{round}", kind.label().replace([' ', '-'], ""));
            let secs = match kind {
                Kind::Sequential => {
                    on_fresh_target(&mut b, &name, size, None, |uri| sequential(uri, mapped))?
                }
                Kind::Mirror => on_fresh_target(&mut b, &name, size, Some(mapped), |uri| {
                    Ok(mirror(&mut a, "src", uri))
                })?,
                Kind::Convert => {
                    on_fresh_target(&mut b, &name, size, Some(mapped), |uri| convert(&src, uri))?
                }
            };
            eprintln!("round {}: {} {secs:.2} s", round + 1, kind.label());
            match kind {
                Kind::Sequential => r.sequential = secs,
                Kind::Mirror => r.mirror = secs,
                Kind::Convert => r.convert = Some(secs),
            }
        }
        results.push(r);
    }

    let holes_secs = on_fresh_target(&mut b, "hdst", size, Some(0), |uri| {
        Ok(mirror(&mut a, "holes", uri))
    })?;
    Ok(report(&results, mapped, size, percent, holes_secs))
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target");
    let result = if !args.iter().any(|a| a == "--bench") {
        run(&target.join("bench-mirror-smoke"), 64 * MIB, 25, 1, false)
    } else {
        let size = arg(&args, "--size-gib").map_or(Ok(4), |s| s.parse::<u64>());
        let percent = arg(&args, "--mapped-percent").map_or(Ok(25), |s| s.parse::<u64>());
        let rounds = arg(&args, "--rounds").map_or(Ok(5), |s| s.parse::<usize>());
        match (size, percent, rounds) {
            (Ok(size), Ok(percent), Ok(rounds))
                if size > 0 && (1..=100).contains(&percent) && rounds > 0 =>
            {
                let dir =
                    arg(&args, "--dir").map_or_else(|| target.join("bench-mirror"), PathBuf::from);
                run(&dir, size << 30, percent, rounds, true)
            }
            _ => Err("--size-gib N (> 0) --mapped-percent P (1 to 100) --rounds R (> 0)".into()),
        }
    };
    match result {
        Ok(t) => println!("\n{t}"),
        Err(e) => {
            eprintln!("mirror bench: {e}");
            std::process::exit(1);
        }
    }
}
