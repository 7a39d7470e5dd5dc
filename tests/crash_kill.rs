//! SIGKILL under load: blkio clients write stamped 4 KiB blocks (tag of the disk, block,
//! generation) to thin exports with a FLUSH every few writes, several requests in flight,
//! while the test kills `thinblk serve` at random moments and restarts it. After every kill:
//! - every write acknowledged before a completed FLUSH reads back intact;
//! - a block written since reads back as one of the versions written since (old or new),
//!   never another disk's stamp, never garbage;
//! - `thinblk check` and `thin_check` pass on the metadata.
//!
//! The second test does the same with snapshots in the pool (created at restarts and
//! written to as well), so kills land while shared blocks are being broken, and with live
//! snapshots taken and deleted through QMP while writes are in flight, so the disks reuse
//! freed blocks between kills.
#![allow(clippy::unwrap_used)]

mod common;
mod support;

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use blkio::{Completion, ReqFlags};
use common::{Client, Daemon, Qmp};
use support::*;

const DISK: u64 = 4 << 20;
const STAMPS: usize = (DISK / STAMP as u64) as usize;
/// Requests in flight per disk.
const DEPTH: usize = 8;
const MAX_RUN: usize = 4;
const FLUSH_TAG: usize = usize::MAX;

#[derive(Clone, Debug)]
struct Cell {
    /// What the last completed FLUSH made durable.
    durable: Content,
    /// The last completed write.
    acked: Content,
    /// Everything written since `durable`, completed or not.
    since: Vec<Content>,
}

impl Cell {
    fn exact(c: Content) -> Cell {
        Cell {
            durable: c,
            acked: c,
            since: Vec::new(),
        }
    }
}

fn gen_of(c: Content) -> u64 {
    match c {
        Content::Stamp { gen, .. } => gen,
        _ => 0,
    }
}

struct Disk {
    name: String,
    tag: u64,
    cells: Vec<Cell>,
    client: Option<Client>,
    /// In-flight writes by slot: (first stamp, what each stamp holds).
    writes: HashMap<usize, (usize, Vec<Content>)>,
    busy: Vec<bool>,
    /// A FLUSH in flight, with what each block had acknowledged when it was sent.
    flush: Option<Vec<Content>>,
    writes_since_flush: u64,
    flush_every: u64,
    /// A snapshot of `a` the daemon creates at its next start: it will hold what `a` holds
    /// then.
    fresh: bool,
}

impl Disk {
    fn new(name: &str, tag: u64, cells: Vec<Cell>) -> Disk {
        Disk {
            name: name.into(),
            tag,
            busy: vec![false; STAMPS],
            cells,
            client: None,
            writes: HashMap::new(),
            flush: None,
            writes_since_flush: 0,
            flush_every: 4,
            fresh: false,
        }
    }
}

struct Run {
    dir: tempfile::TempDir,
    rng: Rng,
    gen: u64,
    disks: Vec<Disk>,
    snapshots: Vec<String>,
    /// Snapshots taken and deleted through QMP under load (not exported).
    live: Vec<String>,
    live_made: u64,
    live_deleted: u64,
    writes_acked: u64,
    flushes_done: u64,
}

fn socket(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.sock"))
}

impl Run {
    fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "--dir",
            self.dir.path().to_str().unwrap(),
            "--metadata-size",
            "16M",
            "--data-size",
            "256M",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for d in &self.disks {
            args.push("--export".into());
            let origin = self.snapshots.contains(&d.name);
            args.push(if origin {
                format!("name={},snapshot-of=a,queues=1", d.name)
            } else {
                format!("name={},size={DISK},queues=1", d.name)
            });
        }
        args
    }

    fn start(&mut self) -> Daemon {
        let sockets: Vec<PathBuf> = self
            .disks
            .iter()
            .map(|d| socket(self.dir.path(), &d.name))
            .collect();
        let control = self.dir.path().join("control.sock");
        let mut refs: Vec<&Path> = sockets.iter().map(PathBuf::as_path).collect();
        refs.push(&control);
        let daemon = Daemon::start(&self.args(), &refs);
        for (d, s) in self.disks.iter_mut().zip(&sockets) {
            d.client = Some(Client::connect(s, 1));
        }
        daemon
    }

    /// Sends writes until `DEPTH` are in flight, and a FLUSH every few writes.
    fn top_up(&mut self, i: usize) {
        let d = &mut self.disks[i];
        let client = d.client.as_mut().unwrap();
        for slot in 0..DEPTH {
            if d.writes.contains_key(&slot) {
                continue;
            }
            let n = 1 + self.rng.below(MAX_RUN as u64) as usize;
            let first = self.rng.below((STAMPS - n) as u64 + 1) as usize;
            if d.busy[first..first + n].iter().any(|&b| b) {
                continue;
            }
            let at = slot * MAX_RUN * STAMP;
            let mut contents = Vec::with_capacity(n);
            for k in 0..n {
                self.gen += 1;
                let c = Content::Stamp {
                    tag: d.tag,
                    block: (first + k) as u64,
                    gen: self.gen,
                };
                let bytes = content_bytes(c);
                client.buf()[at + k * STAMP..at + (k + 1) * STAMP].copy_from_slice(&bytes);
                d.cells[first + k].since.push(c);
                d.busy[first + k] = true;
                contents.push(c);
            }
            let ptr = client.buf_ptr(at);
            client.queues[0].write(
                (first * STAMP) as u64,
                ptr,
                n * STAMP,
                slot,
                ReqFlags::empty(),
            );
            d.writes.insert(slot, (first, contents));
        }
        if d.flush.is_none() && d.writes_since_flush >= d.flush_every {
            d.flush = Some(d.cells.iter().map(|c| c.acked).collect());
            d.writes_since_flush = 0;
            d.flush_every = 2 + self.rng.below(8);
            client.queues[0].flush(FLUSH_TAG, ReqFlags::empty());
        }
    }

    /// Submits what is queued and handles completions, waiting for at least `min`.
    fn pump(&mut self, i: usize, min: usize) {
        let d = &mut self.disks[i];
        let client = d.client.as_mut().unwrap();
        let mut done = [const { MaybeUninit::<Completion>::uninit() }; DEPTH + 1];
        let mut timeout = Duration::from_secs(30);
        let n = client.queues[0]
            .do_io(&mut done, min, Some(&mut timeout), None)
            .unwrap();
        assert!(n >= min, "{}: no completion within 30 s", d.name);
        for c in &done[..n] {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_ref() };
            assert_eq!(c.ret, 0, "{}: request {} failed", d.name, c.user_data);
            if c.user_data == FLUSH_TAG {
                let acked = d.flush.take().unwrap();
                for (cell, a) in d.cells.iter_mut().zip(acked) {
                    if gen_of(a) > gen_of(cell.durable) {
                        cell.durable = a;
                        let floor = gen_of(a);
                        cell.since.retain(|s| gen_of(*s) > floor);
                    }
                }
                self.flushes_done += 1;
                continue;
            }
            let (first, contents) = d.writes.remove(&c.user_data).unwrap();
            for (k, content) in contents.into_iter().enumerate() {
                d.cells[first + k].acked = content;
                d.busy[first + k] = false;
            }
            d.writes_since_flush += 1;
            self.writes_acked += 1;
        }
    }

    /// Reads every disk back and checks each block against the model; the model becomes
    /// exactly what was read.
    fn verify(&mut self, kill: u64) {
        for i in 0..self.disks.len() {
            if self.disks[i].fresh {
                // `a` (disk 0) was verified first: the snapshot must hold exactly that.
                self.disks[i].cells = self.disks[0].cells.clone();
                self.disks[i].fresh = false;
            }
            let d = &mut self.disks[i];
            let client = d.client.as_mut().unwrap();
            let chunk = 1 << 20;
            for base in (0..DISK).step_by(chunk) {
                let p = client.buf_ptr(0);
                assert_eq!(common::read(&mut client.queues[0], p, base, chunk), 0);
                let bytes = client.buf()[..chunk].to_vec();
                for (k, block) in bytes.chunks(STAMP).enumerate() {
                    let i = base as usize / STAMP + k;
                    let cell = &mut d.cells[i];
                    let got = parse(block);
                    assert!(
                        got == cell.durable || cell.since.contains(&got),
                        "after kill {kill}: disk {} block {i} holds {got:?}; durable {:?}, \
                         written since {:?}",
                        d.name,
                        cell.durable,
                        cell.since
                    );
                    *cell = Cell::exact(got);
                }
            }
            d.writes.clear();
            d.busy.iter_mut().for_each(|b| *b = false);
            d.flush = None;
            d.writes_since_flush = 0;
        }
    }

    /// Now and then, with writes in flight: a live snapshot of `a` or `b`, or the deletion of
    /// one, whose data blocks the disks then reuse.
    fn churn(&mut self, q: &mut Qmp) {
        match self.rng.below(20) {
            0 | 1 if self.live.len() < 3 => {
                self.live_made += 1;
                let name = format!("q{}", self.live_made);
                let device = if self.rng.chance(50) { "a" } else { "b" };
                q.ok(
                    "thin-snapshot",
                    serde_json::json!({"device": device, "name": name}),
                );
                self.live.push(name);
            }
            0..=2 if !self.live.is_empty() => {
                let name = self.live.remove(0);
                q.ok("thin-delete", serde_json::json!({"name": name}));
                self.live_deleted += 1;
            }
            _ => {}
        }
    }

    /// Adds a snapshot of `a`, created by the daemon at its next start.
    fn add_snapshot(&mut self) {
        let name = format!("s{}", self.snapshots.len() + 1);
        let cells = Vec::new();
        let tag = 100 + self.snapshots.len() as u64;
        self.snapshots.push(name.clone());
        let mut disk = Disk::new(&name, tag, cells);
        disk.fresh = true;
        self.disks.push(disk);
    }
}

fn kill_loop(default_seed: u64, kills: u64, with_snapshots: bool) {
    let seed = seed(default_seed);
    let started = Instant::now();
    let mut run = Run {
        dir: tempfile::tempdir().unwrap(),
        rng: Rng::new(seed),
        gen: 0,
        disks: vec![
            Disk::new("a", 1, vec![Cell::exact(Content::Zero); STAMPS]),
            Disk::new("b", 2, vec![Cell::exact(Content::Zero); STAMPS]),
        ],
        snapshots: Vec::new(),
        live: Vec::new(),
        live_made: 0,
        live_deleted: 0,
        writes_acked: 0,
        flushes_done: 0,
    };
    let meta = run.dir.path().join("metadata");
    for kill in 0..kills {
        if with_snapshots && kill % 4 == 1 && run.snapshots.len() < 3 {
            run.add_snapshot();
        }
        let daemon = run.start();
        run.verify(kill);
        let mut qmp = with_snapshots.then(|| Qmp::connect(&run.dir.path().join("control.sock")));
        let rounds = 1 + run.rng.below(30);
        for _ in 0..rounds {
            for i in 0..run.disks.len() {
                run.top_up(i);
                run.pump(i, 1);
            }
            if let Some(q) = qmp.as_mut() {
                run.churn(q);
            }
        }
        // Send one more batch and kill while the daemon works on it.
        for i in 0..run.disks.len() {
            run.top_up(i);
            run.pump(i, 0);
        }
        let spin = Instant::now();
        let wait = Duration::from_micros(run.rng.below(3000));
        while spin.elapsed() < wait {
            std::hint::spin_loop();
        }
        daemon.kill9();
        for d in &mut run.disks {
            d.client = None;
        }
        if kill % 2 == 1 || kill + 1 == kills {
            assert_checks_pass(&meta, &format!("seed {seed}, after kill {kill}"));
        }
    }
    let daemon = run.start();
    run.verify(kills);
    drop(daemon);
    assert_checks_pass(&meta, &format!("seed {seed}, after a clean stop"));
    eprintln!(
        "{kills} kills survived: {} writes and {} flushes acknowledged on {} disks, \
         {} live snapshots taken and {} deleted under load, in {:.1} s",
        run.writes_acked,
        run.flushes_done,
        run.disks.len(),
        run.live_made,
        run.live_deleted,
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn sigkill_under_load_loses_no_flushed_write_and_shows_no_foreign_data() {
    kill_loop(0x4B11_0001, env_count("KILLS", 60), false);
}

#[test]
fn sigkill_with_snapshots_in_the_pool_keeps_every_snapshot_intact() {
    kill_loop(0x4B11_0002, env_count("SNAPSHOT_KILLS", 30), true);
}
