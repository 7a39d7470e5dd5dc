//! `--sections scale`: what many exports cost one daemon (issue 23, "one daemon for every VM on
//! a host"). For 1, 50 and 500 idle exports of null devices, thinblk and qemu-storage-daemon
//! side by side: the time from start until every socket accepts, threads, open descriptors
//! and resident memory, then one write served by each export in turn (a frontend connecting,
//! writing and going away) and the same counts again, which reconnecting clients must not
//! grow. thinblk is also measured with thin volumes of one pool, its usual set-up.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::Client;
use crate::server::{this_build, THIN_DATA_SIZE};

/// Export counts of the rows.
const EXPORTS: [usize; 3] = [1, 50, 500];
/// Size of each null device and thin volume.
const DISK: u64 = 1 << 30;

/// A server with many exports, stopped with SIGTERM when dropped.
struct Many {
    child: Child,
    log: PathBuf,
}

impl Drop for Many {
    fn drop(&mut self) {
        // SAFETY: a signal to our own child, not yet reaped; no memory effects.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Many {
    /// Starts `cmd` and waits until every socket of `sockets` exists and the last accepts;
    /// returns it with the time that took.
    fn start(
        mut cmd: Command,
        sockets: &[PathBuf],
        log: PathBuf,
    ) -> Result<(Many, Duration), String> {
        for s in sockets {
            let _ = std::fs::remove_file(s);
        }
        let log_file =
            std::fs::File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let started = Instant::now();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("{cmd:?} did not start: {e}"))?;
        let mut many = Many { child, log };
        let deadline = started + Duration::from_secs(120);
        let mut waiting = |ready: &dyn Fn() -> bool| -> Result<(), String> {
            while !ready() {
                if let Ok(Some(status)) = many.child.try_wait() {
                    return Err(format!("exited ({status}): {}", many.tail()));
                }
                if Instant::now() > deadline {
                    return Err("not ready within 120 s".into());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(())
        };
        for s in sockets {
            waiting(&|| s.exists())?;
        }
        if let Some(last) = sockets.last() {
            waiting(&|| std::os::unix::net::UnixStream::connect(last).is_ok())?;
        }
        let took = started.elapsed();
        Ok((many, took))
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .last()
            .unwrap_or("no message")
            .trim()
            .to_string()
    }
}

/// Threads, open descriptors and resident memory (VmRSS, KiB) of a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cost {
    threads: usize,
    fds: usize,
    rss_kib: u64,
}

fn cost(pid: u32) -> Result<Cost, String> {
    let count = |what: &str| {
        std::fs::read_dir(format!("/proc/{pid}/{what}"))
            .map(|d| d.count())
            .map_err(|e| format!("/proc/{pid}/{what}: {e}"))
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or("no VmRSS")?;
    Ok(Cost {
        threads: count("task")?,
        fds: count("fd")?,
        rss_kib,
    })
}

/// The cost once the probe connections are closed and their threads joined: the same counts
/// in two samples 200 ms apart (at most 5 s).
fn settled(pid: u32) -> Result<Cost, String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = cost(pid)?;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = cost(pid)?;
        let same = (now.threads, now.fds) == (last.threads, last.fds);
        last = now;
        if same || Instant::now() > deadline {
            return Ok(last);
        }
    }
}

/// One row: start, cost idle, one write through every export, cost again.
struct Row {
    start: Duration,
    idle: Cost,
    served: usize,
    io_time: Duration,
    after: Cost,
}

fn measure(cmd: Command, sockets: &[PathBuf], log: PathBuf) -> Result<Row, String> {
    let (server, start) = Many::start(cmd, sockets, log)?;
    let pid = server.child.id();
    let idle = settled(pid)?;
    let began = Instant::now();
    let mut served = 0;
    let mut first_error = None;
    for s in sockets {
        match Client::connect(s, 4096).and_then(|mut c| c.fill(4096, 4096, 1)) {
            Ok(()) => served += 1,
            Err(e) => {
                first_error.get_or_insert(format!("{}: {e}", s.display()));
            }
        }
    }
    let io_time = began.elapsed();
    let after = settled(pid)?;
    if let Some(e) = first_error {
        eprintln!("    first failure: {e} ({})", server.tail());
    }
    Ok(Row {
        start,
        idle,
        served,
        io_time,
        after,
    })
}

fn sockets(dir: &Path, n: usize) -> Vec<PathBuf> {
    (0..n).map(|i| dir.join(format!("s{i}.sock"))).collect()
}

fn thinblk_null(dir: &Path, n: usize) -> (Command, Vec<PathBuf>) {
    let socks = sockets(dir, n);
    let mut cmd = Command::new(this_build());
    cmd.arg("serve").env("RUST_LOG", "warn");
    for s in &socks {
        cmd.arg("--export")
            .arg(format!("null={DISK},socket={}", s.display()));
    }
    (cmd, socks)
}

/// `n` thin volumes of one pool in `dir` (made by an unmeasured first start).
fn thinblk_thin(dir: &Path, n: usize) -> (Command, Vec<PathBuf>) {
    let pool = dir.join("pool");
    let socks: Vec<PathBuf> = (0..n).map(|i| pool.join(format!("v{i}.sock"))).collect();
    let mut cmd = Command::new(this_build());
    cmd.arg("serve")
        .arg("--dir")
        .arg(&pool)
        .args(["--metadata-size", "1G", "--data-size"])
        .arg(THIN_DATA_SIZE.to_string())
        .env("RUST_LOG", "warn");
    for i in 0..n {
        cmd.arg("--export").arg(format!("name=v{i},size={DISK}"));
    }
    (cmd, socks)
}

fn qsd_null(dir: &Path, n: usize) -> (Command, Vec<PathBuf>) {
    let socks = sockets(dir, n);
    let mut cmd = Command::new("qemu-storage-daemon");
    for (i, s) in socks.iter().enumerate() {
        cmd.arg("--blockdev").arg(format!(
            "driver=null-co,node-name=n{i},size={DISK},read-zeroes=on"
        ));
        cmd.arg("--export").arg(format!(
            "type=vhost-user-blk,id=e{i},node-name=n{i},addr.type=unix,addr.path={},writable=on",
            s.display()
        ));
    }
    (cmd, socks)
}

/// `qemu-storage-daemon --version`'s first line.
pub fn qsd_version() -> String {
    Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "qemu-storage-daemon (version unknown)".into())
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// KiB of RSS each export beyond the first adds, from the same server's 1-export row.
fn per_export(kib: u64, one: Option<u64>, n: usize) -> String {
    match one {
        Some(one) if n > 1 => format!("{:.1}", (kib as f64 - one as f64) / (n - 1) as f64),
        _ => "-".into(),
    }
}

fn cells(r: &Result<Row, String>, n: usize, one: Option<&Row>) -> String {
    match r {
        Ok(r) => format!(
            "{:.0} ms | {} | {} | {} | {} | {}/{n} in {:.1} s | {} / {} / {} | {} |",
            r.start.as_secs_f64() * 1e3,
            r.idle.threads,
            r.idle.fds,
            mib(r.idle.rss_kib),
            per_export(r.idle.rss_kib, one.map(|o| o.idle.rss_kib), n),
            r.served,
            r.io_time.as_secs_f64(),
            r.after.threads,
            r.after.fds,
            mib(r.after.rss_kib),
            per_export(r.after.rss_kib, one.map(|o| o.after.rss_kib), n),
        ),
        Err(e) => format!("{e} | | | | | | | |"),
    }
}

/// Measures every row and appends the table to `out`.
pub fn section(dir: &Path, out: &mut String) {
    let version = qsd_version();
    eprintln!("scale: exports {EXPORTS:?}, thinblk and {version}");
    out.push_str(&format!(
        "### Cost per export (idle exports, defaults; thinblk vs {version})\n\n\
         Start: from the server's start until every socket accepts. Threads, descriptors and \
         RSS (VmRSS) idle, then after one 4 KiB write through every export in turn (a \
         frontend connecting, writing and hanging up). *KiB per more export*: the RSS above \
         the same server's 1-export row, divided by the exports beyond the first.\n\n\
         | exports | server | start | threads | fds | RSS MiB | KiB per more export | I/O served | \
         after: threads / fds / RSS MiB | after: KiB per more export |\n\
         |---|---|---|---|---|---|---|---|---|---|\n"
    ));
    type Setup = fn(&Path, usize) -> (Command, Vec<PathBuf>);
    let servers: [(&str, Setup, bool); 3] = [
        ("thinblk null", thinblk_null, false),
        ("thinblk thin (one pool)", thinblk_thin, true),
        ("qsd null-co", qsd_null, false),
    ];
    let mut ones: Vec<Option<Row>> = servers.iter().map(|_| None).collect();
    for n in EXPORTS {
        for (i, (name, setup, prepare)) in servers.into_iter().enumerate() {
            let here = dir.join(format!(
                "scale-{}-{n}",
                name.split(' ').nth(1).unwrap_or("x")
            ));
            let _ = std::fs::remove_dir_all(&here);
            let made = std::fs::create_dir_all(&here)
                .map_err(|e| format!("creating {}: {e}", here.display()));
            let row = made.and_then(|()| {
                if prepare {
                    // The pool and its volumes are made by a first start, not measured.
                    let (cmd, socks) = setup(&here, n);
                    drop(Many::start(cmd, &socks, here.join("prepare.log"))?);
                }
                let (cmd, socks) = setup(&here, n);
                measure(cmd, &socks, here.join("server.log"))
            });
            let one = ones.get(i).and_then(Option::as_ref);
            let line = format!("| {n} | {name} | {}", cells(&row, n, one));
            eprintln!("  {line}");
            out.push_str(&line);
            out.push('\n');
            let _ = std::fs::remove_dir_all(&here);
            if let (1, Ok(row), Some(slot)) = (n, row, ones.get_mut(i)) {
                *slot = Some(row);
            }
        }
    }
    out.push('\n');
}
