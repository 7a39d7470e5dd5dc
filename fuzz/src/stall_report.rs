//! What every thread was doing when a fuzz input ran far longer than any input should: libFuzzer
//! reports a timeout with the stack of one thread only, and a hang in `vhost_user` is between
//! threads (a worker, the session's message thread, the frontend). A watcher thread notices a
//! unit past [`STALLED`] and prints, once per unit, each thread's name, state, kernel wait
//! channel and current system call from /proc, and what the frontend was doing last, before
//! libFuzzer's own timeout (`-timeout=10` in run.sh) ends the process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Far above a normal unit (about a millisecond), well below libFuzzer's timeout.
const STALLED: Duration = Duration::from_secs(5);

/// Milliseconds since [`epoch`] at which the running unit began, 0 when none runs.
static UNIT_BEGAN: AtomicU64 = AtomicU64::new(0);
/// Counts units, so a stalled one is reported once.
static UNIT: AtomicU64 = AtomicU64::new(0);
/// What the frontend did last: an operation's index in the input and its kind.
static LAST_STEP: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// A unit being run; the watcher reports it if it is still alive after [`STALLED`].
pub struct Unit(());

impl Unit {
    pub fn begin() -> Unit {
        static WATCHER: OnceLock<()> = OnceLock::new();
        WATCHER.get_or_init(|| {
            let _ = std::thread::Builder::new()
                .name("fz-stall-watch".into())
                .spawn(watch);
        });
        UNIT.fetch_add(1, Ordering::AcqRel);
        UNIT_BEGAN.store(now_ms(), Ordering::Release);
        Unit(())
    }

    /// Notes the frontend's step `index` of kind `kind` (printed with a report).
    pub fn step(&self, index: usize, kind: u32) {
        let index = u64::try_from(index).unwrap_or(u64::MAX >> 32) & 0xffff_ffff;
        LAST_STEP.store(index << 32 | u64::from(kind), Ordering::Relaxed);
    }
}

impl Drop for Unit {
    fn drop(&mut self) {
        UNIT_BEGAN.store(0, Ordering::Release);
    }
}

fn watch() {
    let mut reported = 0;
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let began = UNIT_BEGAN.load(Ordering::Acquire);
        let unit = UNIT.load(Ordering::Acquire);
        if began == 0 || unit == reported {
            continue;
        }
        let ms = now_ms().saturating_sub(began);
        if ms >= u64::try_from(STALLED.as_millis()).unwrap_or(u64::MAX) {
            reported = unit;
            let step = LAST_STEP.load(Ordering::Relaxed);
            eprintln!(
                "STALL: unit {unit} has run {ms} ms; the frontend's last step: #{} kind {} \
                 (100 + N: a message with request code N; 6: a kick; 7: a guest memory write; \
                 999: the hang-up)",
                step >> 32,
                step & 0xffff_ffff
            );
            eprint!("{}", threads());
        }
    }
}

/// One line per thread of this process: name, state, wait channel, system call.
pub fn threads() -> String {
    let mut out = String::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return "STALL: /proc/self/task is not readable\n".into();
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .map(|s| s.trim().replace('\n', " | "))
                .unwrap_or_else(|e| format!("({e})"))
        };
        let stat = read("stat");
        // The state is the field after the name in parentheses.
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split(' ').next())
            .unwrap_or("?")
            .to_string();
        out.push_str(&format!(
            "STALL: tid {} {:<16} state {state} wchan {} syscall [{}] kernel stack [{}]\n",
            task.file_name().to_string_lossy(),
            read("comm"),
            read("wchan"),
            read("syscall"),
            read("stack"),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_report_names_each_thread_and_what_it_waits_in() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let waiter = std::thread::Builder::new()
            .name("fz-test-waiter".into())
            .spawn(move || rx.recv())
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        let report = super::threads();
        let line = report
            .lines()
            .find(|l| l.contains("fz-test-waiter"))
            .unwrap_or_else(|| panic!("no line for the waiting thread in:\n{report}"));
        // Blocked on the channel: sleeping in a futex wait (system call 202 on x86-64).
        assert!(line.contains("state S"), "{line}");
        assert!(line.contains("syscall [202 "), "{line}");
        drop(tx);
        waiter.join().unwrap().unwrap_err();
    }
}
