//! `--suite`: thinblk and qemu-storage-daemon side by side on the same files, same client, same
//! machine, one after the other for every job, with fio on the file as the device's limit.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::client::Client;
use crate::fio;
use crate::images::{self, CLUSTER};
use crate::job::{Job, Op, Pattern};
use crate::server::{cpu_seconds, peak_rss_kib, qsd_file_node, Server};
use crate::stats::{cost, ratio, show, Cell};
use crate::{mapped, pause};

/// Parts of the suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// thinblk raw vs qsd file vs fio on the file.
    Raw,
    /// thinblk null vs qsd null-co.
    Null,
    /// thin devices vs thinblk raw and qcow2.
    Thin,
    /// Only this build vs `--baseline` (which runs with any section).
    Builds,
    /// thinblk null, raw and thin with 1, 2 and 4 queues.
    Queues,
    /// Cost per export: 1, 50, 500 idle exports (threads, descriptors, memory, start time).
    Scale,
    /// Dirty logging (live migration) off vs on, through a vhost frontend (dirty_log.rs).
    Dirtylog,
    /// thinblk rbd= vs qsd's rbd driver on one image (THINBLK_CEPH_CONF; `--features rbd`).
    Rbd,
}

pub struct Settings {
    pub dir: PathBuf,
    pub file_size: u64,
    pub null_size: u64,
    pub warmup: Duration,
    pub measure: Duration,
    pub jobs: Vec<Job>,
    pub sections: Vec<Section>,
    /// Raw and null rows: how many times each server runs each job, in turn.
    pub rounds: usize,
    /// Another thinblk binary to measure in turn with this build (`--baseline`).
    pub baseline: Option<PathBuf>,
}

/// Runs each of `runs` `rounds` times, in turn, and keeps for each the round with the median
/// IOPS (a failed round counts as none; all failed gives the last error).
pub fn alternate<const N: usize>(rounds: usize, runs: [&dyn Fn() -> Cell; N]) -> [Cell; N] {
    let mut seen: [Vec<Cell>; N] = std::array::from_fn(|_| Vec::new());
    for _ in 0..rounds.max(1) {
        for (run, cells) in runs.iter().zip(seen.iter_mut()) {
            cells.push(run());
        }
    }
    seen.map(median)
}

fn median(cells: Vec<Cell>) -> Cell {
    let mut ok: Vec<_> = cells
        .iter()
        .filter_map(|c| c.as_ref().ok())
        .cloned()
        .collect();
    if ok.is_empty() {
        return cells
            .into_iter()
            .last()
            .unwrap_or_else(|| Err("not run".into()));
    }
    ok.sort_by(|a, b| a.iops.total_cmp(&b.iops));
    Ok(ok.swap_remove(ok.len() / 2))
}

/// Virtual size of the fresh qcow2 images that first writes go to: big enough that a short run
/// keeps finding unallocated clusters.
const FRESH_SIZE: u64 = 16 << 30;
/// Snapshot depths compared.
const DEPTHS: [usize; 3] = [1, 16, 64];

impl Settings {
    pub fn socket(&self) -> PathBuf {
        self.dir.join("bench.sock")
    }

    /// Starts a server with `start`, runs `job` against it over `span` bytes, stops it.
    pub fn measure(
        &self,
        label: &str,
        job: &Job,
        span: u64,
        start: impl FnOnce(&Path) -> Result<Server, String>,
    ) -> Cell {
        eprint!("  {label:<28} {:<22}", job.name);
        let cell = self.measure_inner(job, span, start);
        eprintln!("{}", show(&cell));
        cell
    }

    fn measure_inner(
        &self,
        job: &Job,
        span: u64,
        start: impl FnOnce(&Path) -> Result<Server, String>,
    ) -> Cell {
        let socket = self.socket();
        let server = start(&socket)?;
        let pid = server.pid();
        let tail = |e: String| format!("{e} ({})", server.log_tail());
        let mut client = Client::connect(&socket, job.qd * job.bs).map_err(tail)?;
        let m = client
            .run(job, span, self.warmup, self.measure, &|| cpu_seconds(pid))
            .map_err(tail)?;
        let mut s = m.summary();
        s.peak_rss_kib = peak_rss_kib(pid);
        drop(client);
        Ok(s)
    }

    fn fio(&self, job: &Job, file: &Path) -> Cell {
        eprint!("  {:<28} {:<22}", "fio", job.name);
        let cell = fio::run(job, file, self.file_size, self.warmup, self.measure);
        eprintln!("{}", show(&cell));
        cell
    }
}

/// thinblk's raw export of `file` under `job`.
fn thinblk_raw(s: &Settings, job: &Job, file: &Path) -> Cell {
    let backing = format!("raw={}", file.display());
    s.measure("thinblk raw", job, s.file_size, |sock| {
        Server::thinblk(&backing, sock, &s.dir)
    })
}

fn qsd_raw(file: &Path, dir: &Path) -> impl FnOnce(&Path) -> Result<Server, String> {
    let node = qsd_file_node("f", file);
    let dir = dir.to_path_buf();
    move |sock| Server::qsd(&[node], "f", sock, &dir)
}

/// Runs the chosen sections and returns the report in Markdown.
pub fn run(s: &Settings) -> Result<String, String> {
    std::fs::create_dir_all(&s.dir).map_err(|e| format!("creating {}: {e}", s.dir.display()))?;
    let mut out = String::new();
    let raw = if s.sections.contains(&Section::Raw)
        || s.sections.contains(&Section::Thin)
        || s.sections.contains(&Section::Queues)
        || s.baseline.is_some()
    {
        Some(images::raw_file(&s.dir, s.file_size)?)
    } else {
        None
    };
    if let (true, Some(file)) = (s.sections.contains(&Section::Raw), &raw) {
        raw_section(s, file, &mut out);
    }
    if s.sections.contains(&Section::Null) {
        null_section(s, &mut out);
    }
    if let (Some(baseline), Some(file)) = (&s.baseline, &raw) {
        crate::builds::section(s, file, baseline, &mut out);
    }
    if let (true, Some(file)) = (s.sections.contains(&Section::Thin), &raw) {
        thin_section(s, file, &mut out);
    }
    if let (true, Some(file)) = (s.sections.contains(&Section::Queues), &raw) {
        crate::queues::section(s, file, &mut out);
    }
    if s.sections.contains(&Section::Scale) {
        crate::scale::section(&s.dir, &mut out);
    }
    if s.sections.contains(&Section::Dirtylog) {
        crate::dirty_log::section(s, &mut out);
    }
    if s.sections.contains(&Section::Rbd) {
        crate::rbd::section(s, &mut out);
    }
    Ok(out)
}

fn raw_section(s: &Settings, file: &Path, out: &mut String) {
    eprintln!("raw file {}", file.display());
    out.push_str(&format!(
        "### Raw file ({} MiB, O_DIRECT), one queue\n\n\
         | job | fio on file | thinblk raw | qsd raw | thinblk/qsd | thinblk/fio |\n\
         |---|---|---|---|---|---|\n",
        s.file_size >> 20
    ));
    let mut costs = String::new();
    for job in &s.jobs {
        let [f, t, q] = alternate(
            s.rounds,
            [&|| s.fio(job, file), &|| thinblk_raw(s, job, file), &|| {
                s.measure("qsd raw", job, s.file_size, qsd_raw(file, &s.dir))
            }],
        );
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            job.name,
            show(&f),
            show(&t),
            show(&q),
            ratio(&t, &q),
            ratio(&t, &f)
        ));
        costs.push_str(&format!("| {} | {} | {} |\n", job.name, cost(&t), cost(&q)));
    }
    out.push_str(
        "\nServer cost: CPU time (user + system, all threads) per I/O, and peak RSS (VmHWM).\n\n\
         | job | thinblk raw | qsd raw |\n|---|---|---|\n",
    );
    out.push_str(&costs);
    out.push('\n');
}

fn null_section(s: &Settings, out: &mut String) {
    eprintln!("null devices of {} bytes", s.null_size);
    out.push_str(&format!(
        "### Null device ({} GiB, reads return zeros), one queue\n\n\
         | job | thinblk null | qsd null-co | thinblk/qsd | thinblk cost | qsd cost |\n\
         |---|---|---|---|---|---|\n",
        s.null_size >> 30
    ));
    for job in &s.jobs {
        let backing = format!("null={}", s.null_size);
        let node = format!(
            "driver=null-co,node-name=n,size={},read-zeroes=on",
            s.null_size
        );
        let [t, q] = alternate(
            s.rounds,
            [
                &|| {
                    s.measure("thinblk null", job, s.null_size, |sock| {
                        Server::thinblk(&backing, sock, &s.dir)
                    })
                },
                &|| {
                    s.measure("qsd null-co", job, s.null_size, |sock| {
                        Server::qsd(std::slice::from_ref(&node), "n", sock, &s.dir)
                    })
                },
            ],
        );
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            job.name,
            show(&t),
            show(&q),
            ratio(&t, &q),
            cost(&t),
            cost(&q)
        ));
    }
    out.push('\n');
}

fn thin_row(out: &mut String, what: &str, thin: &Cell, other: &Cell) {
    out.push_str(&format!(
        "| {what} | {} | {} | {} | {} | {} |\n",
        show(thin),
        show(other),
        ratio(thin, other),
        cost(thin),
        cost(other)
    ));
}

/// A thin pool for the suite, made afresh, with the device `full`: every block of `span`
/// provisioned, shared with nothing yet.
pub fn thin_pool(s: &Settings, span: u64) -> Result<PathBuf, String> {
    let pool = s.dir.join("pool");
    let _ = std::fs::remove_dir_all(&pool);
    let sock = s.socket();
    let server = Server::thin(&pool, &format!("name=full,size={span}"), &[], &sock, &s.dir)?;
    let mut c = Client::connect(&sock, 8 << 20)?;
    eprintln!("  provisioning thin disk full ({} MiB)", span >> 20);
    c.fill(span, 1 << 20, 8)
        .map_err(|e| format!("{e} ({})", server.log_tail()))?;
    Ok(pool)
}

/// The snapshot chain `s1` (of `full`) to `s{max}` (each of the one before). From here on
/// every block of `full` is shared, so its own rows must have run before.
fn snapshot_chain(s: &Settings, pool: &Path, max_depth: usize) -> Result<(), String> {
    let chain: Vec<String> = (1..=max_depth)
        .map(|d| {
            let origin = if d == 1 {
                "full".to_string()
            } else {
                format!("s{}", d - 1)
            };
            let sock = s.dir.join(format!("s{d}.sock"));
            format!("name=s{d},snapshot-of={origin},socket={}", sock.display())
        })
        .collect();
    eprintln!("  snapshot chain s1..s{max_depth}");
    Server::thin(pool, "name=full", &chain, &s.socket(), &s.dir).map(drop)
}

/// Thin devices against thinblk raw (the mapping's cost), qcow2 first writes, qcow2 backing
/// chains of the same depth, and the I/O pause of a live snapshot.
fn thin_section(s: &Settings, file: &Path, out: &mut String) {
    eprintln!("thin devices vs raw and qcow2");
    out.push_str(
        "### Thin devices (64 KiB blocks) vs raw and qcow2 (64 KiB clusters), one queue\n\n\
         | row | thin | compared with | thin/other | thin's cost | other's cost |\n\
         |---|---|---|---|---|---|\n",
    );
    let pool = thin_pool(s, s.file_size).map_err(|e| format!("thin pool: {e}"));
    let thin = |name: &str, job: &Job, span: u64| -> Cell {
        let pool = pool.as_ref().map_err(Clone::clone)?;
        s.measure(&format!("thin {name}"), job, span, |sock| {
            Server::thin(pool, &format!("name={name}"), &[], sock, &s.dir)
        })
    };
    // Raw is measured again here, in turn with the thin disk: this machine's disk changes
    // speed over minutes, so a raw figure from the raw section would compare different disks.
    // And two files of one file system can differ 3x in speed (their extents' history), so
    // the thin disk's own limit is fio on the pool's data file over the same bytes: `full`
    // is the pool's only device, provisioned first, so its blocks are the file's first
    // `file_size` bytes.
    let data = pool.as_ref().map(|p| p.join("data")).map_err(Clone::clone);
    for job in &s.jobs {
        let [t, raw, own] = alternate(
            s.rounds,
            [
                &|| thin("full", job, s.file_size),
                &|| thinblk_raw(s, job, file),
                &|| s.fio(job, data.as_ref().map_err(Clone::clone)?),
            ],
        );
        let what = format!("fully provisioned thin vs thinblk raw: {}", job.name);
        thin_row(out, &what, &t, &raw);
        let what = format!(
            "fully provisioned thin vs fio on its data file, same bytes: {}",
            job.name
        );
        thin_row(out, &what, &t, &own);
    }
    first_writes(s, pool.as_ref(), out);

    let max = DEPTHS.iter().copied().max().unwrap_or(1);
    let chain = match &pool {
        Ok(p) => snapshot_chain(s, p, max).map_err(|e| format!("snapshot chain: {e}")),
        Err(e) => Err(e.clone()),
    };
    let snap = |name: &str, job: &Job| -> Cell {
        chain.clone()?;
        thin(name, job, s.file_size)
    };
    let reads = [
        Job::new(Op::Read, Pattern::Random, 4096, 1),
        Job::new(Op::Read, Pattern::Random, 4096, 32),
    ];
    match images::qcow2_chain(&s.dir, file, max) {
        Ok(qcow2) => {
            for depth in DEPTHS {
                let nodes = images::qsd_chain_nodes(&qcow2[..=depth]);
                let top = format!("q{depth}");
                for job in &reads {
                    let t = snap(&format!("s{depth}"), job);
                    let label = format!("qsd qcow2 chain depth {depth}");
                    let q = s.measure(&label, job, s.file_size, |sock| {
                        Server::qsd(&nodes, &top, sock, &s.dir)
                    });
                    let what = format!(
                        "snapshot depth {depth}, thin vs qcow2 backing chain: {}",
                        job.name
                    );
                    thin_row(out, &what, &t, &q);
                }
            }
        }
        Err(e) => {
            let what = "snapshot reads, thin vs qcow2 backing chain";
            thin_row(out, what, &Err("n/a".into()), &Err(e));
        }
    }
    let details = live_snapshot(s, out);
    out.push('\n');
    out.push_str(&details);
}

/// First writes into unprovisioned space: a fresh thin device against a fresh qcow2 image.
fn first_writes(s: &Settings, pool: Result<&PathBuf, &String>, out: &mut String) {
    let first = [
        Job::new(Op::Write, Pattern::FirstWrite { cluster: CLUSTER }, 4096, 1),
        Job::new(
            Op::Write,
            Pattern::FirstWrite { cluster: CLUSTER },
            4096,
            32,
        ),
        Job::new(Op::Write, Pattern::Sequential, 128 << 10, 8),
    ];
    let fresh = s.dir.join("fresh.qcow2");
    for (i, job) in first.iter().enumerate() {
        let t = match pool {
            Ok(pool) => s.measure("thin fresh disk", job, FRESH_SIZE, |sock| {
                Server::thin(
                    pool,
                    &format!("name=fresh{i},size={FRESH_SIZE}"),
                    &[],
                    sock,
                    &s.dir,
                )
            }),
            Err(e) => Err(e.clone()),
        };
        let q = images::qcow2_fresh(&fresh, FRESH_SIZE).and_then(|()| {
            let nodes = vec![
                qsd_file_node("f", &fresh),
                "driver=qcow2,node-name=q,file=f".to_string(),
            ];
            s.measure("qsd fresh qcow2", job, FRESH_SIZE, |sock| {
                Server::qsd(&nodes, "q", sock, &s.dir)
            })
        });
        let what = format!("first writes, thin vs fresh qcow2: {}", job.name);
        thin_row(out, &what, &t, &q);
    }
    let _ = std::fs::remove_file(&fresh);
}

/// The live-snapshot row of the thin table, and its details as a table of their own.
fn live_snapshot(s: &Settings, out: &mut String) -> String {
    eprintln!(
        "live snapshots at {} mapped blocks, {}",
        mapped::MAPPED,
        pause::job().name
    );
    let times = (s.warmup, s.measure);
    let vhost = s.socket();
    let t = mapped::thin_pool(&s.dir.join("mapped-pool")).and_then(|pool| {
        let spec = format!("name={}", mapped::THIN_NAME);
        let server = Server::thin(&pool, &spec, &[], &vhost, &s.dir)?;
        let mut take = pause::thin_snapshot(mapped::THIN_NAME);
        let qmp = pool.join("control.sock");
        pause::measure(&server, &vhost, &qmp, times, pause::SNAPSHOTS, &mut take)
    });
    eprintln!("  {:<28} {}", "thin", pause_cell(&t));
    let image = s.dir.join("mapped.qcow2");
    let q = mapped::qcow2(&image).and_then(|()| {
        let nodes = [
            qsd_file_node("f", &image),
            "driver=qcow2,node-name=q,file=f,l2-cache-size=16777216".to_string(),
        ];
        let qmp = s.dir.join("qsd-qmp.sock");
        let server = Server::qsd_qmp(&nodes, "q", &vhost, Some(&qmp), &s.dir)?;
        let mut take = pause::internal_snapshot("q");
        pause::measure(&server, &vhost, &qmp, times, pause::SNAPSHOTS, &mut take)
    });
    eprintln!("  {:<28} {}", "qsd qcow2", pause_cell(&q));
    let _ = std::fs::remove_dir_all(s.dir.join("mapped-pool"));
    let _ = std::fs::remove_file(&image);

    let stall_ratio = match (&t, &q) {
        (Ok(t), Ok(q)) if !q.longest_stall().is_zero() => format!(
            "{:.2}× stall",
            t.longest_stall().as_secs_f64() / q.longest_stall().as_secs_f64()
        ),
        _ => "-".into(),
    };
    let quiet_cost = |p: &Result<pause::Pause, String>| match p {
        Ok(p) => cost(&Ok(p.quiet.clone())),
        Err(_) => "-".into(),
    };
    out.push_str(&format!(
        "| live snapshot, {} mapped blocks, {} snapshots during {}: thin-snapshot vs qcow2 internal snapshot | {} | {} | {stall_ratio} | {} | {} |\n",
        mapped::MAPPED,
        pause::SNAPSHOTS,
        pause::job().name,
        pause_cell(&t),
        pause_cell(&q),
        quiet_cost(&t),
        quiet_cost(&q)
    ));
    pause_details(&t, &q)
}

fn pause_cell(p: &Result<pause::Pause, String>) -> String {
    match p {
        Ok(p) => p.cell(),
        Err(e) => show(&Err(e.clone())),
    }
}

/// Per-server detail of the live snapshots.
fn pause_details(t: &Result<pause::Pause, String>, q: &Result<pause::Pause, String>) -> String {
    let row = |what: &str, f: &dyn Fn(&pause::Pause) -> String| {
        let cell = |p: &Result<pause::Pause, String>| p.as_ref().map_or("-".into(), f);
        format!("| {what} | {} | {} |\n", cell(t), cell(q))
    };
    let mut out = format!(
        "Live snapshots: {} mapped 64 KiB blocks (clusters), {} snapshots {} ms apart during {}.\n\n\
         | | thinblk `thin-snapshot` | qsd qcow2 `blockdev-snapshot-internal-sync` |\n|---|---|---|\n",
        mapped::MAPPED,
        pause::SNAPSHOTS,
        pause::GAP.as_millis(),
        pause::job().name
    );
    out.push_str(&row("the load without snapshots", &|p| {
        format!("{}, max {}", p.quiet.cell(), pause::dur(p.quiet_max))
    }));
    out.push_str(&row(
        "longest request overlapping a snapshot, p50 / max",
        &|p| pause::spread(&p.stalls),
    ));
    out.push_str(&row("QMP command round trip, p50 / max", &|p| {
        pause::spread(&p.commands)
    }));
    let reported = |pick: fn(&(Duration, Duration)) -> Duration| {
        move |p: &pause::Pause| {
            if p.reported.is_empty() {
                "n/a: not reported".to_string()
            } else {
                let v: Vec<Duration> = p.reported.iter().map(pick).collect();
                pause::spread(&v)
            }
        }
    };
    out.push_str(&row(
        "I/O held, as the server reports it (`pause-us`), p50 / max",
        &reported(|r| r.0),
    ));
    out.push_str(&row(
        "commit after it (`commit-us`), p50 / max",
        &reported(|r| r.1),
    ));
    out.push_str(&row(
        &format!("longest stall under {}", pause::dur(pause::GOAL)),
        &|p| {
            if p.longest_stall() < pause::GOAL {
                "yes".into()
            } else {
                "no".into()
            }
        },
    ));
    out.push('\n');
    out
}
