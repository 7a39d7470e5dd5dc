//! Side-by-side benchmark of vhost-user-blk servers through libblkio.
//!
//! ```text
//! cargo bench --bench vhost_blk -- --socket PATH [--seconds N] [--jobs a,b]   # any server
//! cargo bench --bench vhost_blk -- --suite [--seconds N] [--sections raw,null,thin,queues,scale]
//! cargo bench --bench vhost_blk -- --suite --sections builds --baseline OLD_THINBLK   # before/after
//! cargo bench --bench vhost_blk -- --suite --sections dirtylog [--rounds N]   # logging off/on
//! THINBLK_CEPH_CONF=DIR/ceph.conf cargo bench --features rbd --bench vhost_blk -- --suite --sections rbd
//! ```
//!
//! `--suite` starts thinblk and qemu-storage-daemon itself, one after the other for every job
//! on the same files, runs the same jobs with fio on the file, and prints Markdown tables of
//! throughput, latency percentiles, ratios and server cost. Under `cargo test` (no `--bench`
//! argument) it runs a short smoke test instead: a thinblk null export, and live snapshots of a
//! small thin disk.
#![allow(clippy::expect_used)]

#[path = "vhost_blk/builds.rs"]
mod builds;
#[path = "vhost_blk/client.rs"]
mod client;
#[path = "vhost_blk/dirty_log.rs"]
mod dirty_log;
#[path = "vhost_blk/fio.rs"]
mod fio;
/// The tests' virtio-blk driver over the `vhost` crate's frontend (the dirtylog section).
#[path = "../tests/frontend/mod.rs"]
mod frontend;
#[path = "vhost_blk/images.rs"]
mod images;
#[path = "vhost_blk/job.rs"]
mod job;
#[path = "vhost_blk/mapped.rs"]
mod mapped;
#[path = "vhost_blk/pause.rs"]
mod pause;
#[path = "vhost_blk/placement.rs"]
mod placement;
#[path = "vhost_blk/qmp.rs"]
mod qmp;
#[path = "vhost_blk/queues.rs"]
mod queues;
#[path = "vhost_blk/rbd.rs"]
mod rbd;
#[path = "vhost_blk/scale.rs"]
mod scale;
#[path = "vhost_blk/server.rs"]
mod server;
#[path = "vhost_blk/stats.rs"]
mod stats;
#[path = "vhost_blk/suite.rs"]
mod suite;

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

use client::Client;
use job::Job;
use placement::Placement;
use server::{cpu_seconds, peak_rss_kib};
use stats::{cost, show, Cell};
use suite::{Section, Settings};

/// Benchmarks vhost-user-blk servers through libblkio: 4 KiB random read and write at queue
/// depth 1 and 32, 128 KiB sequential read and write at queue depth 8.
#[derive(Parser, Debug)]
#[command(name = "vhost_blk")]
struct Args {
    /// Drive this vhost-user-blk socket (write jobs overwrite the disk's data).
    #[arg(long, value_name = "PATH", required_unless_present = "suite")]
    socket: Option<PathBuf>,
    /// With --socket: the server's pid, to report its CPU time per I/O and peak RSS.
    #[arg(long, requires = "socket")]
    pid: Option<u32>,
    /// Start thinblk and qemu-storage-daemon and compare them side by side.
    #[arg(long, conflicts_with = "socket")]
    suite: bool,
    /// Measured seconds per job.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Warm-up seconds per job, not measured.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Jobs to run, by name (default: all).
    #[arg(long, value_delimiter = ',')]
    jobs: Vec<String>,
    /// Raw, null and fully provisioned thin rows: rounds of the servers in turn (fio, thinblk,
    /// qsd; then again), each cell the round with the median IOPS. Evens out a disk or a
    /// neighbour that changes speed.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=99))]
    rounds: u32,
    /// Where the client and the servers run (fio runs where the client does).
    #[arg(long, value_enum, default_value = "split")]
    placement: Placement,
    /// Parts of the suite to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "raw,null,thin,queues,scale"
    )]
    sections: Vec<Section>,
    /// Scratch directory for backing files and sockets (default: target/bench).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Size of the raw backing file, written once and reused.
    #[arg(long, default_value = "1G", value_parser = size)]
    file_size: u64,
    /// Size of the null devices.
    #[arg(long, default_value = "16G", value_parser = size)]
    null_size: u64,
    /// With --suite: also measure this other thinblk binary in turn with this build (raw, null,
    /// fully provisioned thin and first writes), for before/after tables of a change.
    #[arg(long, value_name = "PATH", requires = "suite")]
    baseline: Option<PathBuf>,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn size(v: &str) -> Result<u64, String> {
    thinblk::export_spec::parse_size("size", v).map_err(|e| e.to_string())
}

fn seconds(s: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(s).map_err(|e| format!("{s} seconds: {e}"))
}

fn pick_jobs(names: &[String]) -> Result<Vec<Job>, String> {
    let all = job::standard();
    if names.is_empty() {
        return Ok(all);
    }
    names
        .iter()
        .map(|n| {
            all.iter().find(|j| &j.name == n).cloned().ok_or_else(|| {
                let known: Vec<_> = all.iter().map(|j| j.name.as_str()).collect();
                format!("unknown job {n} (known: {})", known.join(", "))
            })
        })
        .collect()
}

/// `--socket`: every job against one server that someone else started.
fn run_socket(args: &Args, socket: &Path) -> Result<String, String> {
    let (warmup, measure) = (seconds(args.warmup)?, seconds(args.seconds)?);
    let mut out = format!(
        "| job | {} | server cost |\n|---|---|---|\n",
        socket.display()
    );
    for job in pick_jobs(&args.jobs)? {
        let pid = args.pid;
        let cell: Cell = Client::connect(socket, job.qd * job.bs).and_then(|mut c| {
            let cpu = || pid.and_then(cpu_seconds);
            let mut s = c.run(&job, u64::MAX, warmup, measure, &cpu)?.summary();
            s.peak_rss_kib = pid.and_then(peak_rss_kib);
            Ok(s)
        });
        eprintln!("  {:<22}{}", job.name, show(&cell));
        out.push_str(&format!(
            "| {} | {} | {} |\n",
            job.name,
            show(&cell),
            cost(&cell)
        ));
    }
    Ok(out)
}

/// `cargo test --benches`: every job for a moment against a thinblk null export, then the
/// live-snapshot measurement with two snapshots.
fn smoke() {
    job::self_test();
    let dir = tempfile::tempdir().expect("temporary directory");
    let socket = dir.path().join("null.sock");
    let server =
        server::Server::thinblk("null=1G", &socket, dir.path()).expect("thinblk null export");
    for job in job::standard() {
        let mut c = Client::connect(&socket, job.qd * job.bs).expect("blkio connect");
        let pid = server.pid();
        let m = c
            .run(
                &job,
                u64::MAX,
                Duration::from_millis(20),
                Duration::from_millis(100),
                &|| cpu_seconds(pid),
            )
            .expect("job runs");
        assert!(m.ios > 0, "{}: no I/O completed", job.name);
        assert!(
            m.server_cpu_seconds.is_some(),
            "{}: no CPU sample",
            job.name
        );
        println!("smoke {}: {}", job.name, m.summary().cell());
    }
    drop(server);
    smoke_live_snapshot(dir.path());
}

/// Two live snapshots of a small thin disk under load: the QMP path of the pause row.
fn smoke_live_snapshot(dir: &Path) {
    let pool = dir.join("pool");
    let socket = dir.join("thin.sock");
    let server = server::Server::thin(&pool, "name=d,size=64M", &[], &socket, dir)
        .expect("thinblk thin export");
    let times = (Duration::from_millis(20), Duration::from_millis(100));
    let mut take = pause::thin_snapshot("d");
    let qmp = pool.join("control.sock");
    let p = pause::measure(&server, &socket, &qmp, times, 2, &mut take).expect("live snapshots");
    assert_eq!(p.stalls.len(), 2, "snapshots not taken");
    assert_eq!(p.reported.len(), 2, "pause not reported");
    assert!(p.quiet.iops > 0.0, "no I/O without snapshots");
    println!("smoke live snapshot: {}", p.cell());
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        smoke();
        return;
    }
    let args = Args::parse();
    let result = match (&args.socket, args.suite) {
        (Some(socket), _) => run_socket(&args, socket),
        (None, _) => seconds(args.warmup)
            .and_then(|warmup| Ok((warmup, seconds(args.seconds)?)))
            .and_then(|(warmup, measure)| {
                let settings = Settings {
                    dir: args.dir.clone().unwrap_or_else(|| {
                        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench")
                    }),
                    file_size: args.file_size,
                    null_size: args.null_size,
                    warmup,
                    measure,
                    jobs: pick_jobs(&args.jobs)?,
                    sections: args.sections.clone(),
                    rounds: args.rounds as usize,
                    baseline: args.baseline.clone(),
                };
                let placed = placement::apply(args.placement)?;
                eprintln!("{placed}");
                suite::run(&settings).map(|report| format!("Placement: {placed}.\n\n{report}"))
            }),
    };
    match result {
        Ok(table) => println!("\n{table}"),
        Err(e) => {
            eprintln!("vhost_blk: {e}");
            std::process::exit(1);
        }
    }
}
