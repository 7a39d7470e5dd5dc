//! Throughput of `thin-mirror` (issue 15) beside `qemu-img convert` of the same content into
//! the same kind of target, and beside plain sequential writes into that target.
//!
//! ```text
//! cargo bench --bench mirror -- [--size-gib 4] [--mapped-percent 25] [--dir DIR]
//! ```
//!
//! Two thinblk daemons (pool A holds the source, pool B the targets; each pool a sparse file
//! under DIR, default target/bench-mirror), NBD on unix sockets. The source is a thin disk
//! of SIZE with MAPPED% of it written (1 MiB runs spread over the whole disk, random bytes);
//! the rest are holes. Rows, each into a fresh thin device of pool B over NBD:
//!
//! - sequential write: the mapped amount written from memory, 4 MiB writes, 16 in flight
//!   (the mirror's own request size and window), then a flush: the target's write rate;
//! - thin-mirror, sync full: from the command to the job's end (first pass, ready, then
//!   `block-job-cancel`, which flushes the target);
//! - `qemu-img convert -n` from pool A's NBD export of the source (it reads the allocation
//!   map and zeroes holes, as the mirror does);
//! - thin-mirror of a disk of SIZE with nothing mapped: the cost of holes alone.
//!
//! Rates are of the mapped bytes; the ratio column is against the sequential write. The
//! machine may be shared: the numbers are noisy, the ratios in one run are what to compare.
//! Under `cargo test` (no `--bench` argument) a smoke run: 64 MiB, no qemu-img.
#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "vhost_blk/qmp.rs"]
mod qmp;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
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

struct Row {
    what: String,
    bytes: u64,
    secs: f64,
}

fn table(rows: &[Row], reference: f64) -> String {
    let mut s = String::from(
        "| what | mapped bytes moved | seconds | MiB/s of mapped data | vs sequential write |\n\
         | --- | ---: | ---: | ---: | ---: |\n",
    );
    for r in rows {
        let rate = r.bytes as f64 / MIB as f64 / r.secs;
        let ratio = if r.bytes == 0 {
            "-".to_string()
        } else {
            format!("{:.2}x", rate / reference)
        };
        s += &format!(
            "| {} | {} MiB | {:.2} | {} | {} |\n",
            r.what,
            r.bytes / MIB,
            r.secs,
            if r.bytes == 0 {
                "-".into()
            } else {
                format!("{rate:.0}")
            },
            ratio
        );
    }
    s
}

fn run(dir: &Path, size: u64, percent: u64, with_qemu_img: bool) -> Result<String, String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let runs = size / MIB;
    let mapped_runs: Vec<u64> = (0..runs).filter(|&i| mapped_run(i, percent)).collect();
    let mapped = mapped_runs.len() as u64 * MIB;
    let mut a = start_pool(dir, "a", size + size / 4 + 64 * MIB);
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
    let mut rows = Vec::new();

    // The target's sequential write rate, through the same client and window.
    let seq = b.disk("seq", size, true);
    let c = Arc::new(NbdClient::connect_uri(&seq, IN_FLIGHT).map_err(|e| e.to_string())?);
    let piece = random_mib(7).repeat((CHUNK / MIB) as usize);
    let start = Instant::now();
    write_pieces(&c, (0..mapped).step_by(CHUNK as usize), &|_| piece.clone());
    rows.push(Row {
        what: "sequential write into a thin device of pool B (NBD, 4 MiB, 16 in flight)".into(),
        bytes: mapped,
        secs: start.elapsed().as_secs_f64(),
    });
    drop(c);

    let dst = b.disk("dst", size, true);
    let secs = mirror(&mut a, "src", &dst);
    rows.push(Row {
        what: format!("thin-mirror sync=full, {}% mapped", percent),
        bytes: mapped,
        secs,
    });
    let dst_mapped = b.mapped("dst");

    let mut convert_mapped = None;
    if with_qemu_img {
        let cdst = b.disk("cdst", size, true);
        let start = Instant::now();
        let out = Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw", &src, &cdst])
            .output()
            .map_err(|e| format!("qemu-img (Debian package qemu-utils): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "qemu-img convert: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        rows.push(Row {
            what: "qemu-img convert -n (NBD to NBD)".into(),
            bytes: mapped,
            secs: start.elapsed().as_secs_f64(),
        });
        convert_mapped = Some(b.mapped("cdst"));
    }

    let hdst = b.disk("hdst", size, true);
    let secs = mirror(&mut a, "holes", &hdst);
    rows.push(Row {
        what: "thin-mirror sync=full, nothing mapped".into(),
        bytes: 0,
        secs,
    });
    let hdst_mapped = b.mapped("hdst");

    let reference = mapped as f64 / MIB as f64 / rows[0].secs;
    let mut out = format!(
        "Mirror throughput: a {} MiB thin disk, {}% mapped in 1 MiB runs (pool blocks 64 KiB), \
         pool A to pool B over NBD (unix sockets).\n\n{}",
        size / MIB,
        percent,
        table(&rows, reference)
    );
    out += &format!(
        "\nMapped bytes: source {src_mapped}, mirror target {dst_mapped}{}, \
         empty disk's mirror target {hdst_mapped}.\n",
        convert_mapped.map_or(String::new(), |m| format!(", qemu-img target {m}"))
    );
    if dst_mapped != src_mapped || hdst_mapped != 0 {
        return Err(format!("holes were not kept as holes:\n{out}"));
    }
    Ok(out)
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
        run(&target.join("bench-mirror-smoke"), 64 * MIB, 25, false)
    } else {
        let size = arg(&args, "--size-gib").map_or(Ok(4), |s| s.parse::<u64>());
        let percent = arg(&args, "--mapped-percent").map_or(Ok(25), |s| s.parse::<u64>());
        match (size, percent) {
            (Ok(size), Ok(percent)) if size > 0 && (1..=100).contains(&percent) => {
                let dir =
                    arg(&args, "--dir").map_or_else(|| target.join("bench-mirror"), PathBuf::from);
                run(&dir, size << 30, percent, true)
            }
            _ => Err("--size-gib N (> 0) --mapped-percent P (1 to 100)".into()),
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
