//! What an export costs the daemon (issue 23, "one daemon for every VM on a host"), counted
//! from /proc/PID: an export with no frontend is no thread and at most four descriptors, the
//! queues of every connected frontend are served by the daemon's queue workers (at most one
//! per core) and a connection adds one thread (its vhost-user messages), and connecting and
//! disconnecting leaves the daemon as it was.
//!
//! `THINBLK_BIN=PATH` measures another thinblk build instead of this one (to see what a change
//! did: the counts of a build from before it fail these tests).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// Exports added on top of a daemon with one, to count what one more costs.
const MORE: usize = 20;

fn thinblk() -> PathBuf {
    std::env::var_os("THINBLK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_thinblk")))
}

/// A `thinblk serve` with `args`, once every socket of `sockets` accepts.
struct Serve {
    child: std::process::Child,
}

impl Serve {
    fn start(args: &[String], sockets: &[PathBuf]) -> Serve {
        let child = std::process::Command::new(thinblk())
            .arg("serve")
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn thinblk");
        let mut s = Serve { child };
        let deadline = Instant::now() + Duration::from_secs(30);
        for socket in sockets {
            while !socket.exists() {
                if let Ok(Some(status)) = s.child.try_wait() {
                    panic!("thinblk exited early: {status}");
                }
                assert!(
                    Instant::now() < deadline,
                    "{} never appeared",
                    socket.display()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        s
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        // SAFETY: kill with the pid of our own child, not yet reaped; no memory effects.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Threads and open descriptors of a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cost {
    threads: usize,
    fds: usize,
}

fn cost(pid: u32) -> Cost {
    let count = |what: &str| {
        std::fs::read_dir(format!("/proc/{pid}/{what}"))
            .unwrap_or_else(|e| panic!("/proc/{pid}/{what}: {e}"))
            .count()
    };
    Cost {
        threads: count("task"),
        fds: count("fd"),
    }
}

/// The cost once it stops changing (threads of a closed connection being joined, say): the
/// same in three samples 100 ms apart, within 10 s.
fn settled(pid: u32) -> Cost {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = cost(pid);
    let mut same = 0;
    while same < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = cost(pid);
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    last
}

/// Waits up to 10 s for the cost to come back to `want`; returns the last count.
fn back_to(pid: u32, want: Cost) -> Cost {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = cost(pid);
        if now == want || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `n` raw exports of small sparse files in `dir`, default settings (two queues); their
/// sockets.
fn raw_exports(dir: &Path, n: usize) -> (Vec<String>, Vec<PathBuf>) {
    let mut args = Vec::new();
    let mut sockets = Vec::new();
    for i in 0..n {
        let image = dir.join(format!("d{i}.raw"));
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(16 << 20))
            .expect("sparse image");
        let socket = dir.join(format!("d{i}.sock"));
        args.push("--export".into());
        args.push(format!(
            "raw={},socket={}",
            image.display(),
            socket.display()
        ));
        sockets.push(socket);
    }
    (args, sockets)
}

/// `n` thin volumes of one pool in `dir`, default settings; their sockets.
fn thin_exports(dir: &Path, n: usize) -> (Vec<String>, Vec<PathBuf>) {
    let mut args: Vec<String> = vec![
        "--dir".into(),
        dir.display().to_string(),
        "--metadata-size".into(),
        "16M".into(),
        "--data-size".into(),
        "256M".into(),
    ];
    let mut sockets = Vec::new();
    for i in 0..n {
        args.push("--export".into());
        args.push(format!("name=v{i},size=16M"));
        sockets.push(dir.join(format!("v{i}.sock")));
    }
    (args, sockets)
}

/// What one more idle export costs: a daemon with 1 + MORE exports against one with 1.
/// Makes `n` exports in a directory: the daemon's arguments and the sockets.
type Exports = fn(&Path, usize) -> (Vec<String>, Vec<PathBuf>);

fn per_idle_export(exports: Exports) -> (f64, f64) {
    let measure = |n: usize| {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (args, sockets) = exports(dir.path(), n);
        let daemon = Serve::start(&args, &sockets);
        settled(daemon.pid())
    };
    let one = measure(1);
    let many = measure(1 + MORE);
    let per = |a: usize, b: usize| (b as f64 - a as f64) / MORE as f64;
    let threads = per(one.threads, many.threads);
    let fds = per(one.fds, many.fds);
    eprintln!("1 export: {one:?}; {} exports: {many:?}", 1 + MORE);
    (threads, fds)
}

#[test]
fn an_idle_raw_export_costs_no_thread_and_at_most_four_descriptors() {
    let (threads, fds) = per_idle_export(raw_exports);
    assert!(threads <= 0.0, "{threads} threads per idle raw export");
    assert!(fds <= 4.0, "{fds} descriptors per idle raw export");
}

#[test]
fn an_idle_thin_volume_costs_no_thread_and_at_most_four_descriptors() {
    let (threads, fds) = per_idle_export(thin_exports);
    assert!(threads <= 0.0, "{threads} threads per idle thin export");
    assert!(fds <= 4.0, "{fds} descriptors per idle thin export");
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

#[test]
fn connecting_and_disconnecting_leaves_threads_and_descriptors_flat() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (args, sockets) = raw_exports(dir.path(), 1);
    let daemon = Serve::start(&args, &sockets);
    let idle = settled(daemon.pid());
    for cycle in 0..20 {
        let mut c = Client::connect(&sockets[0], 2);
        let p = c.buf_ptr(0);
        assert_eq!(read(&mut c.queues[1], p, 4096, 4096), 0, "cycle {cycle}");
        let connected = cost(daemon.pid());
        assert!(
            connected.threads <= idle.threads + 2.min(cores()) + 2,
            "cycle {cycle}: {connected:?} connected, {idle:?} idle"
        );
        drop(c);
        let after = back_to(daemon.pid(), idle);
        assert_eq!(after, idle, "cycle {cycle}: the connection left something");
    }
}

#[test]
fn a_frontends_queues_share_at_most_one_worker_per_core() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let socket = dir.path().join("d.sock");
    // The null device completes on the worker itself: no I/O threads besides the workers.
    let args = vec![
        "--export".to_string(),
        format!("null=16M,socket={},queues=8", socket.display()),
    ];
    let daemon = Serve::start(&args, std::slice::from_ref(&socket));
    let idle = settled(daemon.pid());
    let mut c = Client::connect(&socket, 8);
    // Every queue busy at once, more requests than a pass takes on each: a worker that serves
    // several queues must come back to each of them.
    let p = c.buf_ptr(0);
    for round in 0..4u64 {
        for (q, queue) in c.queues.iter_mut().enumerate() {
            for i in 0..64u64 {
                let offset = 4096 * ((q as u64 * 64 + i + round) % 4096);
                queue.read(offset, p, 4096, 0, blkio::ReqFlags::empty());
            }
        }
        for (q, queue) in c.queues.iter_mut().enumerate() {
            for i in 0..64 {
                assert_eq!(wait_one(queue), 0, "round {round}, queue {q}, request {i}");
            }
        }
    }
    let busy = settled(daemon.pid());
    assert!(
        busy.threads <= idle.threads + 8.min(cores()),
        "8 queues on {} cores: {} threads connected, {} idle",
        cores(),
        busy.threads,
        idle.threads
    );
    drop(c);
    assert_eq!(back_to(daemon.pid(), idle), idle);
}

/// The names of a process's threads.
fn thread_names(pid: u32) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/PID/task");
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

#[test]
fn busy_queues_of_many_frontends_share_the_daemons_workers() {
    const FRONTENDS: usize = 20;
    let dir = tempfile::tempdir().expect("temporary directory");
    // Null devices complete on the queue worker: no I/O threads of a device (io_uring's
    // kernel workers, say) blur the count.
    let mut args = Vec::new();
    let mut sockets = Vec::new();
    for i in 0..FRONTENDS {
        let socket = dir.path().join(format!("n{i}.sock"));
        args.push("--export".to_string());
        args.push(format!("null=16M,socket={},queues=2", socket.display()));
        sockets.push(socket);
    }
    let daemon = Serve::start(&args, &sockets);
    let idle = settled(daemon.pid());
    let workers = |pid: u32| {
        thread_names(pid)
            .iter()
            .filter(|n| n.starts_with("queue-worker"))
            .count()
    };
    let mut clients: Vec<Client> = sockets.iter().map(|s| Client::connect(s, 2)).collect();
    // Every queue of every frontend has requests in flight at once (half a ring each): every
    // worker serves many queues and must come back to each of them.
    for round in 0..3u64 {
        for c in clients.iter_mut() {
            let p = c.buf_ptr(0);
            for queue in c.queues.iter_mut() {
                for i in 0..128u64 {
                    queue.read(
                        4096 * ((i + round) % 4096),
                        p,
                        4096,
                        0,
                        blkio::ReqFlags::empty(),
                    );
                }
            }
        }
        for (f, c) in clients.iter_mut().enumerate() {
            for (q, queue) in c.queues.iter_mut().enumerate() {
                for i in 0..128 {
                    assert_eq!(
                        wait_one(queue),
                        0,
                        "round {round}, frontend {f}, queue {q}, request {i}"
                    );
                }
            }
        }
    }
    let busy = cost(daemon.pid());
    eprintln!("{FRONTENDS} frontends with 2 busy queues each: {busy:?}; idle: {idle:?}");
    // Each connection adds its own thread for its vhost-user messages, and nothing else (no
    // thread per queue): the queue workers are the daemon's, as many as cores, idle or busy.
    assert!(
        busy.threads <= idle.threads + FRONTENDS,
        "{} threads with {FRONTENDS} frontends connected, {} idle ({} cores)",
        busy.threads,
        idle.threads,
        cores()
    );
    assert_eq!(workers(daemon.pid()), cores(), "queue workers while busy");
    drop(clients);
    assert_eq!(
        back_to(daemon.pid(), idle),
        idle,
        "after every frontend hung up"
    );
}
