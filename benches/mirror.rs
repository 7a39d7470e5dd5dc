//! Throughput of `thin-mirror` (issue 15) beside `qemu-img convert` of the same content into
//! the same kind of target, and beside plain sequential writes into that target.
//!
//! ```text
//! cargo bench --bench mirror -- [--size-gib 4] [--mapped-percent 25] [--rounds 5] [--dir DIR]
//!     [--baseline BIN] [--source-dir DIR]
//! ```
//!
//! Two thinblk daemons (pool A holds the source, pool B the targets; each pool a sparse file
//! under DIR, default target/bench-mirror), NBD on unix sockets. With `--source-dir` pool A
//! lives under that directory instead (e.g. /dev/shm): in a real migration the source and
//! the target are two hosts' disks, while here both pools share one disk, so a copy reads
//! and writes the disk that the sequential-write reference only writes. The source is a thin disk
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
//! - the disk's own copy rate: fio reading the source pool's data file (where the mapped
//!   bytes lie, in the order they were written) and writing as many bytes into a fresh file
//!   beside pool B, at once, 4 MiB requests, 16 in flight each, O_DIRECT: what the disk gives
//!   a copy with no server in the way (an upper bound: fio's reads do not wait for its
//!   writes). Measured when fio is installed.
//!
//! - with `--baseline BIN`: thin-mirror by the daemon BIN (another build) from a third pool
//!   holding the same source, into the same pool B: before and after a change, side by side.
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

fn start_pool(dir: &Path, name: &str, data_size: u64, bin: &Path) -> Pool {
    let pool = dir.join(name);
    let (ctl, nbd) = (
        dir.join(format!("{name}.ctl")),
        dir.join(format!("{name}.nbd")),
    );
    let child = Command::new(bin)
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
    /// thin-mirror by another build's daemon (`--baseline BIN`), from its own pool.
    MirrorBaseline,
    /// fio reading the source's data file while writing a fresh file beside the targets.
    DiskCopy,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Sequential => "sequential write",
            Kind::Mirror => "thin-mirror",
            Kind::Convert => "qemu-img convert",
            Kind::MirrorBaseline => "baseline thin-mirror",
            Kind::DiskCopy => "disk read+write",
        }
    }
}

/// Seconds of each kind in one round (`None`: not measured).
#[derive(Default, Clone, Copy)]
struct Round {
    sequential: f64,
    mirror: f64,
    convert: Option<f64>,
    baseline: Option<f64>,
    disk_copy: Option<f64>,
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

/// Seconds fio takes to read `bytes` from the start of `src` while writing as many into a new
/// file `dst` (removed after): the slower of its two jobs.
fn disk_copy(src: &Path, dst: &Path, bytes: u64) -> Result<f64, String> {
    let job = |name: &str, rw: &str, file: &Path| {
        vec![
            format!("--name={name}"),
            format!("--rw={rw}"),
            format!("--filename={}", file.display()),
            format!("--size={bytes}"),
            "--bs=4M".into(),
            format!("--iodepth={IN_FLIGHT}"),
            "--ioengine=io_uring".into(),
            "--direct=1".into(),
        ]
    };
    let out = Command::new("fio")
        .args(["--output-format=json", "--fallocate=none"])
        .args(job("read", "read", src))
        .args(job("write", "write", dst))
        .output()
        .map_err(|e| format!("fio: {e}"));
    let _ = std::fs::remove_file(dst);
    let out = out?;
    if !out.status.success() {
        return Err(format!("fio: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let v: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("fio's JSON output: {e}"))?;
    let runtime_ms = |job: usize, side: &str| v["jobs"][job][side]["runtime"].as_f64();
    match (runtime_ms(0, "read"), runtime_ms(1, "write")) {
        (Some(r), Some(w)) if r > 0.0 && w > 0.0 => Ok(r.max(w) / 1e3),
        _ => Err("fio's JSON output has no runtime for both jobs".into()),
    }
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
    let with_baseline = rounds.iter().any(|r| r.baseline.is_some());
    let with_disk = rounds.iter().any(|r| r.disk_copy.is_some());
    let mut s = format!(
        "Mirror throughput: a {} MiB thin disk, {}% mapped in 1 MiB runs (pool blocks 64 KiB), \
         pool A to pool B over NBD (unix sockets); {} rounds, the order rotating.\n\n\
         | round | sequential write MiB/s | thin-mirror MiB/s | vs seq | qemu-img convert MiB/s | vs seq |",
        size / MIB,
        percent,
        rounds.len()
    );
    if with_baseline {
        s += " baseline thin-mirror MiB/s | vs seq |";
    }
    if with_disk {
        s += " disk read+write MiB/s | vs seq | thin-mirror vs disk |";
    }
    s += "\n| ---: | ---: | ---: | ---: | ---: | ---: |";
    if with_baseline {
        s += " ---: | ---: |";
    }
    if with_disk {
        s += " ---: | ---: | ---: |";
    }
    s += "\n";
    let cell = |secs: Option<f64>, seq: f64| {
        secs.map_or("- | -".to_string(), |c| {
            format!("{:.0} | {:.2}x", rate(c), seq / c)
        })
    };
    for (i, r) in rounds.iter().enumerate() {
        s += &format!(
            "| {} | {:.0} | {} | {} |",
            i + 1,
            rate(r.sequential),
            cell(Some(r.mirror), r.sequential),
            cell(r.convert, r.sequential),
        );
        if with_baseline {
            s += &format!(" {} |", cell(r.baseline, r.sequential));
        }
        if with_disk {
            s += &format!(" {} |", cell(r.disk_copy, r.sequential));
            s += &r
                .disk_copy
                .map_or(" - |".to_string(), |d| format!(" {:.2}x |", d / r.mirror));
        }
        s += "\n";
    }
    let seq: Vec<f64> = rounds.iter().map(|r| rate(r.sequential)).collect();
    let ratios = |f: &dyn Fn(&Round) -> Option<f64>| -> Vec<f64> {
        rounds
            .iter()
            .filter_map(|r| f(r).map(|c| r.sequential / c))
            .collect()
    };
    let summary = |name: &str, v: Vec<f64>| {
        if v.is_empty() {
            return String::new();
        }
        let (lo, hi) = spread(&v);
        format!("; {name} {:.2}x ({lo:.2}-{hi:.2})", median(v))
    };
    let (slo, shi) = spread(&seq);
    s += &format!(
        "\nMedians: sequential write {:.0} MiB/s ({slo:.0}-{shi:.0})",
        median(seq.clone()),
    );
    s += &summary("thin-mirror", ratios(&|r| Some(r.mirror)));
    s += &summary("qemu-img convert", ratios(&|r| r.convert));
    s += &summary("baseline thin-mirror", ratios(&|r| r.baseline));
    s += &summary("disk read+write", ratios(&|r| r.disk_copy));
    let against_disk: Vec<f64> = rounds
        .iter()
        .filter_map(|r| r.disk_copy.map(|d| d / r.mirror))
        .collect();
    s += &summary("thin-mirror against the disk's read+write", against_disk);
    s += &format!(
        ".\nThin-mirror of the disk with nothing mapped: {holes_secs:.2} s (its target maps 0 bytes).\n"
    );
    s
}

/// Fills `src` of pool `a` (SIZE, the runs of `mapped_runs` written); its NBD URI.
fn fill_source(a: &mut Pool, size: u64, mapped_runs: &[u64]) -> Result<String, String> {
    let src = a.disk("src", size, true);
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
    let src_mapped = a.mapped("src");
    let want = mapped_runs.len() as u64 * MIB;
    if src_mapped != want {
        return Err(format!("the source maps {src_mapped} bytes, not {want}"));
    }
    Ok(src)
}

struct Setup {
    size: u64,
    percent: u64,
    rounds: usize,
    with_qemu_img: bool,
    /// Another build's daemon, whose thin-mirror is measured beside this one's.
    baseline: Option<PathBuf>,
    /// Where the source pools live, if not beside the targets (see `--source-dir`).
    source_dir: Option<PathBuf>,
}

fn run(dir: &Path, setup: &Setup) -> Result<String, String> {
    let (size, percent) = (setup.size, setup.percent);
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let src_dir = match &setup.source_dir {
        Some(d) => {
            let d = d.join("thinblk-bench-mirror-source");
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
            d
        }
        None => dir.to_path_buf(),
    };
    let runs = size / MIB;
    let mapped_runs: Vec<u64> = (0..runs).filter(|&i| mapped_run(i, percent)).collect();
    let mapped = mapped_runs.len() as u64 * MIB;
    let this = PathBuf::from(env!("CARGO_BIN_EXE_thinblk"));
    let source_pool = size + size / 4 + 64 * MIB;
    let mut a = start_pool(&src_dir, "a", source_pool, &this);
    let mut base = setup
        .baseline
        .as_ref()
        .map(|bin| start_pool(&src_dir, "a0", source_pool, bin));
    // Targets are deleted after each measure: room for a few at a time.
    let mut b = start_pool(dir, "b", 3 * size + 64 * MIB, &this);

    eprintln!("filling the source: {size} bytes, {mapped} mapped");
    let src = fill_source(&mut a, size, &mapped_runs)?;
    a.disk("holes", size, true);
    if let Some(base) = &mut base {
        eprintln!("filling the baseline's source");
        fill_source(base, size, &mapped_runs)?;
    }

    let mut kinds = vec![Kind::Sequential, Kind::Mirror];
    if setup.with_qemu_img {
        kinds.push(Kind::Convert);
    }
    if base.is_some() {
        kinds.push(Kind::MirrorBaseline);
    }
    let fio = Command::new("fio").arg("--version").output().is_ok();
    if setup.with_qemu_img && fio {
        kinds.push(Kind::DiskCopy);
    }
    let mut results = Vec::new();
    for round in 0..setup.rounds {
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
                Kind::MirrorBaseline => {
                    let Some(base) = base.as_mut() else {
                        continue;
                    };
                    on_fresh_target(&mut b, &name, size, Some(mapped), |uri| {
                        Ok(mirror(base, "src", uri))
                    })?
                }
                // Pool A's data file holds the mapped bytes first: the fill wrote nothing else.
                Kind::DiskCopy => disk_copy(
                    &src_dir.join("a").join("data"),
                    &dir.join("disk-copy"),
                    mapped,
                )?,
            };
            eprintln!("round {}: {} {secs:.2} s", round + 1, kind.label());
            match kind {
                Kind::Sequential => r.sequential = secs,
                Kind::Mirror => r.mirror = secs,
                Kind::Convert => r.convert = Some(secs),
                Kind::MirrorBaseline => r.baseline = Some(secs),
                Kind::DiskCopy => r.disk_copy = Some(secs),
            }
        }
        results.push(r);
    }

    let holes_secs = on_fresh_target(&mut b, "hdst", size, Some(0), |uri| {
        Ok(mirror(&mut a, "holes", uri))
    })?;
    drop((a, base));
    if setup.source_dir.is_some() {
        let _ = std::fs::remove_dir_all(&src_dir);
    }
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
        let setup = Setup {
            size: 64 * MIB,
            percent: 25,
            rounds: 1,
            with_qemu_img: false,
            baseline: None,
            source_dir: None,
        };
        run(&target.join("bench-mirror-smoke"), &setup)
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
                let setup = Setup {
                    size: size << 30,
                    percent,
                    rounds,
                    with_qemu_img: true,
                    baseline: arg(&args, "--baseline").map(PathBuf::from),
                    source_dir: arg(&args, "--source-dir").map(PathBuf::from),
                };
                run(&dir, &setup)
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
