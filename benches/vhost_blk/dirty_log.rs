//! `--sections dirtylog`: what dirty logging (live migration, src/vhost/dirty_log.rs) costs.
//! 4 KiB random reads and writes at QD32 on a thinblk null export, logging off and on in turn
//! (`--rounds` times each, the median kept). libblkio cannot turn logging on, so the export is
//! driven by the tests' virtio-blk driver over the `vhost` crate's frontend (tests/frontend),
//! which turns it on as QEMU does at migration start: SET_LOG_BASE, VHOST_F_LOG_ALL, the used
//! ring logged.
//!
//! Rates on a machine others use too are noisy, so beside them the section gives what does not
//! depend on load: the instructions thinblk's process runs per request, counted by callgrind
//! (a second thinblk under `valgrind --tool=callgrind`; counters zeroed with `callgrind_control
//! -z` before a phase and dumped with `-d` after it, all threads). The driver watches the used
//! index instead of sleeping on the call eventfd (tests/frontend/logging.rs).

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};

use crate::frontend::logging::{qd32, start_logging, MAX_REQUESTS};
use crate::frontend::Vm;
use crate::server::{cpu_seconds, Server};
use crate::suite::Settings;

/// Size of the null export.
const DISK: u64 = 1 << 30;

/// One measured phase.
#[derive(Clone, Debug)]
struct Phase {
    /// A chain was not used within a second: the phase ended there (its figures cover the
    /// batches before).
    stalled: bool,
    iops: f64,
    /// Instructions of thinblk's process per request (the callgrind pass).
    instructions: Option<f64>,
    /// CPU microseconds of thinblk's process per request.
    cpu_us: Option<f64>,
}

type Outcome = Result<Phase, String>;

/// Instructions of a thinblk process run under callgrind, between a zeroing of its counters
/// (`callgrind_control -z`) and a dump (`-d`), read from the dump's totals.
struct Counter {
    pid: u32,
    dir: std::path::PathBuf,
}

fn callgrind_control(args: &[&str], pid: u32) -> bool {
    Command::new("callgrind_control")
        .args(args)
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Counter {
    fn start(pid: u32, dir: &Path) -> Option<Counter> {
        callgrind_control(&["-z"], pid).then(|| Counter {
            pid,
            dir: dir.to_path_buf(),
        })
    }

    /// Dumps the counters; the instructions since `start`.
    fn stop(self) -> Option<u64> {
        if !callgrind_control(&["-d"], self.pid) {
            return None;
        }
        // The newest dump of this process in the directory.
        let newest = std::fs::read_dir(&self.dir)
            .ok()?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("callgrind.out"))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .max()?
            .1;
        let text = std::fs::read_to_string(newest).ok()?;
        text.lines()
            .find_map(|l| {
                l.strip_prefix("totals:")
                    .or_else(|| l.strip_prefix("summary:"))
            })
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    }
}

/// One connection: the driver connects, turns logging on if `logging`, warms up, then runs
/// the measured phase.
fn phase(
    s: &Settings,
    server: &Server,
    socket: &Path,
    (kind, logging): (u32, bool),
    callgrind: Option<&Path>,
) -> Outcome {
    let run = || {
        let mut vm = Vm::connect_with(socket, 1, VhostUserProtocolFeatures::LOG_SHMFD, &mut |_| {});
        let _log = logging.then(|| start_logging(&mut vm));
        qd32(
            &mut vm,
            kind,
            DISK,
            s.warmup.min(Duration::from_millis(500)),
        );
        drop(vm);
        // A fresh connection for the measured phase: one runs at most MAX_REQUESTS.
        let mut vm = Vm::connect_with(socket, 1, VhostUserProtocolFeatures::LOG_SHMFD, &mut |_| {});
        let _log = logging.then(|| start_logging(&mut vm));
        let pid = server.pid();
        let counter = callgrind.and_then(|dir| Counter::start(pid, dir));
        let cpu0 = cpu_seconds(pid);
        let (done, secs, stalled) = qd32(&mut vm, kind, DISK, s.measure);
        let cpu1 = cpu_seconds(pid);
        let instructions = counter.and_then(Counter::stop);
        let per = |x: f64| (done > 0).then(|| x / done as f64);
        Phase {
            stalled,
            iops: done as f64 / secs.max(1e-9),
            instructions: instructions.and_then(|i| per(i as f64)),
            cpu_us: cpu0.zip(cpu1).and_then(|(a, b)| per((b - a) * 1e6)),
        }
    };
    // The driver asserts (a completion that never comes); one phase failing is a cell's error,
    // not the suite's end.
    std::panic::catch_unwind(AssertUnwindSafe(run)).map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the driver panicked".into())
    })
}

fn median(mut phases: Vec<Outcome>) -> Outcome {
    let mut ok: Vec<Phase> = phases
        .iter()
        .filter_map(|p| p.as_ref().ok())
        .cloned()
        .collect();
    if ok.is_empty() {
        return phases.pop().unwrap_or_else(|| Err("not run".into()));
    }
    ok.sort_by(|a, b| a.iops.total_cmp(&b.iops));
    Ok(ok.swap_remove(ok.len() / 2))
}

fn show(o: &Outcome, f: impl Fn(&Phase) -> Option<f64>, digits: usize) -> String {
    match o {
        Ok(p) => f(p).map_or("n/a".into(), |v| format!("{v:.digits$}")),
        Err(e) => format!("error: {}", e.lines().next().unwrap_or("")),
    }
}

fn ratio(on: &Outcome, off: &Outcome, f: impl Fn(&Phase) -> Option<f64>) -> String {
    match (on, off) {
        (Ok(a), Ok(b)) => match (f(a), f(b)) {
            (Some(x), Some(y)) if y > 0.0 => format!("{:.3}x", x / y),
            _ => "n/a".into(),
        },
        _ => "n/a".into(),
    }
}

pub fn section(s: &Settings, out: &mut String) {
    let socket = s.dir.join("dirtylog.sock");
    out.push_str(&format!(
        "### Dirty logging (live migration): off vs on\n\n\
         thinblk null export ({} GiB), one queue, `poll-us=0`; the tests' virtio-blk driver over \
         the `vhost` crate's frontend (libblkio cannot turn logging on), one connection per \
         phase of at most {} s or {MAX_REQUESTS} requests, median of {} rounds, off and on in \
         turn. The machine is shared: IOPS are noisy; instructions per request (all of \
         thinblk's threads, counted by callgrind in a second pass of one round) are not. Goal: \
         on/off >= 0.9x.\n\n\
         | job | IOPS off | IOPS on | on/off | instr/req off | instr/req on | instr off/on | \
         CPU µs/req off | CPU µs/req on |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        DISK >> 30,
        s.measure.as_secs_f64(),
        s.rounds.max(1)
    ));
    let backing = format!("null={DISK},poll-us=0");
    let server = match Server::thinblk(&backing, &socket, &s.dir) {
        Ok(server) => server,
        Err(e) => {
            out.push_str(&format!("| (thinblk did not start: {e}) |\n\n"));
            return;
        }
    };
    // The second thinblk, under callgrind, for the instruction counts.
    let cg_socket = s.dir.join("dirtylog-callgrind.sock");
    let cg_dir = s.dir.join("dirtylog-callgrind");
    let _ = std::fs::remove_dir_all(&cg_dir);
    let counted = std::fs::create_dir_all(&cg_dir)
        .map_err(|e| e.to_string())
        .and_then(|()| Server::thinblk_callgrind(&backing, &cg_socket, &cg_dir))
        .map_err(|e| eprintln!("  dirty log: no instruction counts (callgrind: {e})"))
        .ok()
        .map(|cg| (cg, cg_dir.clone()));
    let mut notes = String::new();
    for (name, kind) in [
        ("randread-4k-qd32", VIRTIO_BLK_T_IN),
        ("randwrite-4k-qd32", VIRTIO_BLK_T_OUT),
    ] {
        let (mut offs, mut ons) = (Vec::new(), Vec::new());
        for _ in 0..s.rounds.max(1) {
            offs.push(phase(s, &server, &socket, (kind, false), None));
            ons.push(phase(s, &server, &socket, (kind, true), None));
        }
        let stalls = offs
            .iter()
            .chain(ons.iter())
            .filter(|p| p.as_ref().is_ok_and(|p| p.stalled))
            .count();
        if stalls > 0 {
            notes.push_str(&format!(
                "{name}: {stalls} of {} phases stalled (a chain never used; the figures cover \
                 the batches before).\n",
                offs.len() + ons.len()
            ));
        }
        let (mut off, mut on) = (median(offs), median(ons));
        if let Some((cg, dir)) = &counted {
            for (cell, logging) in [(&mut off, false), (&mut on, true)] {
                let counted = phase(s, cg, &cg_socket, (kind, logging), Some(dir));
                if let (Ok(p), Ok(c)) = (cell.as_mut(), counted) {
                    p.instructions = c.instructions;
                }
            }
        }
        let iops = |p: &Phase| Some(p.iops);
        let instr = |p: &Phase| p.instructions;
        let cpu = |p: &Phase| p.cpu_us;
        eprintln!(
            "  dirty log {name:<20} off {} on {} ({}); instr/req off {} on {}",
            show(&off, iops, 0),
            show(&on, iops, 0),
            ratio(&on, &off, iops),
            show(&off, instr, 0),
            show(&on, instr, 0)
        );
        out.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            show(&off, iops, 0),
            show(&on, iops, 0),
            ratio(&on, &off, iops),
            show(&off, instr, 0),
            show(&on, instr, 0),
            // Instructions: lower is better, so off/on reads like the IOPS ratio.
            ratio(&off, &on, instr),
            show(&off, cpu, 2),
            show(&on, cpu, 2),
        ));
    }
    if !notes.is_empty() {
        out.push('\n');
        out.push_str(&notes);
    }
    out.push('\n');
}
