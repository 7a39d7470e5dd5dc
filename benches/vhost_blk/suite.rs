//! `--suite`: thinblk and qemu-storage-daemon side by side on the same files, same client, same
//! machine, one after the other for every job, with fio on the file as the device's limit.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::client::Client;
use crate::fio;
use crate::images::{self, CLUSTER};
use crate::job::{Job, Op, Pattern};
use crate::server::{cpu_seconds, peak_rss_kib, qsd_file_node, Server};
use crate::stats::{cost, ratio, show, Cell, NOT_BUILT};

/// Parts of the suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// thinblk raw vs qsd file vs fio on the file.
    Raw,
    /// thinblk null vs qsd null-co.
    Null,
    /// thin devices vs thinblk raw and qcow2.
    Thin,
}

pub struct Settings {
    pub dir: PathBuf,
    pub file_size: u64,
    pub null_size: u64,
    pub warmup: Duration,
    pub measure: Duration,
    pub jobs: Vec<Job>,
    pub sections: Vec<Section>,
}

/// Virtual size of the fresh qcow2 images that first writes go to: big enough that a short run
/// keeps finding unallocated clusters.
const FRESH_SIZE: u64 = 16 << 30;
/// Snapshot depths compared.
const DEPTHS: [usize; 3] = [1, 16, 64];

impl Settings {
    fn socket(&self) -> PathBuf {
        self.dir.join("bench.sock")
    }

    /// Starts a server with `start`, runs `job` against it over `span` bytes, stops it.
    fn measure(
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

fn qsd_raw(file: &Path, dir: &Path) -> impl FnOnce(&Path) -> Result<Server, String> {
    let node = qsd_file_node("f", file);
    let dir = dir.to_path_buf();
    move |sock| Server::qsd(&[node], "f", sock, &dir)
}

/// Runs the chosen sections and returns the report in Markdown.
pub fn run(s: &Settings) -> Result<String, String> {
    std::fs::create_dir_all(&s.dir).map_err(|e| format!("creating {}: {e}", s.dir.display()))?;
    let mut out = String::new();
    let raw = if s.sections.contains(&Section::Raw) || s.sections.contains(&Section::Thin) {
        Some(images::raw_file(&s.dir, s.file_size)?)
    } else {
        None
    };
    let mut thinblk_raw = Vec::new();
    if let (true, Some(file)) = (s.sections.contains(&Section::Raw), &raw) {
        thinblk_raw = raw_section(s, file, &mut out);
    }
    if s.sections.contains(&Section::Null) {
        null_section(s, &mut out);
    }
    if let (true, Some(file)) = (s.sections.contains(&Section::Thin), &raw) {
        thin_section(s, file, &thinblk_raw, &mut out)?;
    }
    Ok(out)
}

fn raw_section(s: &Settings, file: &Path, out: &mut String) -> Vec<(String, Cell)> {
    eprintln!("raw file {}", file.display());
    out.push_str(&format!(
        "### Raw file ({} MiB, O_DIRECT), one queue\n\n\
         | job | fio on file | thinblk raw | qsd raw | thinblk/qsd | thinblk/fio |\n\
         |---|---|---|---|---|---|\n",
        s.file_size >> 20
    ));
    let mut costs = String::new();
    let mut thinblk_cells = Vec::new();
    for job in &s.jobs {
        let f = s.fio(job, file);
        let backing = format!("raw={}", file.display());
        let t = s.measure("thinblk raw", job, s.file_size, |sock| {
            Server::thinblk(&backing, sock, &s.dir)
        });
        let q = s.measure("qsd raw", job, s.file_size, qsd_raw(file, &s.dir));
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
        thinblk_cells.push((job.name.clone(), t));
    }
    out.push_str(
        "\nServer cost: CPU time (user + system, all threads) per I/O, and peak RSS (VmHWM).\n\n\
         | job | thinblk raw | qsd raw |\n|---|---|---|\n",
    );
    out.push_str(&costs);
    out.push('\n');
    thinblk_cells
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
        let t = s.measure("thinblk null", job, s.null_size, |sock| {
            Server::thinblk(&backing, sock, &s.dir)
        });
        let node = format!(
            "driver=null-co,node-name=n,size={},read-zeroes=on",
            s.null_size
        );
        let q = s.measure("qsd null-co", job, s.null_size, |sock| {
            Server::qsd(&[node], "n", sock, &s.dir)
        });
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
        "| {what} | {} | {} | {} | {} |\n",
        show(thin),
        show(other),
        ratio(thin, other),
        cost(other)
    ));
}

/// A thin pool for the suite, made afresh: `full` (every block of `span` provisioned), and
/// the snapshot chain `s1` (of `full`) to `s{max}` (each of the one before).
fn thin_pool(s: &Settings, span: u64, max_depth: usize) -> Result<PathBuf, String> {
    let pool = s.dir.join("pool");
    let _ = std::fs::remove_dir_all(&pool);
    let sock = s.socket();
    {
        let server = Server::thin(&pool, &format!("name=full,size={span}"), &[], &sock, &s.dir)?;
        let mut c = Client::connect(&sock, 8 << 20)?;
        eprintln!("  provisioning thin disk full ({} MiB)", span >> 20);
        c.fill(span, 1 << 20, 8)
            .map_err(|e| format!("{e} ({})", server.log_tail()))?;
    }
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
    let server = Server::thin(&pool, "name=full", &chain, &sock, &s.dir)?;
    drop(server);
    Ok(pool)
}

/// Thin devices against thinblk raw (the mapping's cost), qcow2 first writes, and qcow2
/// backing chains of the same depth.
fn thin_section(
    s: &Settings,
    file: &Path,
    thinblk_raw: &[(String, Cell)],
    out: &mut String,
) -> Result<(), String> {
    eprintln!("thin devices vs raw and qcow2");
    out.push_str(
        "### Thin devices (64 KiB blocks) vs raw and qcow2 (64 KiB clusters), one queue\n\n\
         | row | thin | compared with | thin/other | other's cost |\n|---|---|---|---|---|\n",
    );
    let max = DEPTHS.iter().copied().max().unwrap_or(1);
    let pool = match thin_pool(s, s.file_size, max) {
        Ok(p) => Ok(p),
        Err(e) => Err(format!("thin pool: {e}")),
    };
    let thin = |name: &str, job: &Job, span: u64| -> Cell {
        let pool = pool.as_ref().map_err(Clone::clone)?;
        s.measure(&format!("thin {name}"), job, span, |sock| {
            Server::thin(pool, &format!("name={name}"), &[], sock, &s.dir)
        })
    };
    for job in &s.jobs {
        let raw = thinblk_raw
            .iter()
            .find(|(n, _)| n == &job.name)
            .map_or(Err("n/a: raw section not run".into()), |(_, c)| c.clone());
        let t = thin("full", job, s.file_size);
        let what = format!("fully provisioned thin vs thinblk raw: {}", job.name);
        thin_row(out, &what, &t, &raw);
    }

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
        let t = match &pool {
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

    let reads = [
        Job::new(Op::Read, Pattern::Random, 4096, 1),
        Job::new(Op::Read, Pattern::Random, 4096, 32),
    ];
    match images::qcow2_chain(&s.dir, file, max) {
        Ok(chain) => {
            for depth in DEPTHS {
                let nodes = images::qsd_chain_nodes(&chain[..=depth]);
                let top = format!("q{depth}");
                for job in &reads {
                    let t = thin(&format!("s{depth}"), job, s.file_size);
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
    thin_row(
        out,
        "live-snapshot pause (longest I/O stall while snapshotting)",
        &Err(NOT_BUILT.into()),
        &Err("n/a: needs QMP snapshots during I/O".into()),
    );
    out.push('\n');
    Ok(())
}
