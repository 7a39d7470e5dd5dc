//! A daemon with two exports, one for the hostile frontend and one bystander, and the checks
//! run after every hostile case: the daemon lives, both exports serve a write-read-flush round
//! trip, and its descriptor and thread counts are back where they were.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use blkio::ReqFlags;

use crate::common::{pattern, read, scratch, wait_one, write, Client, Daemon, Scratch};

const DISK: u64 = 16 << 20;

pub struct Watched {
    pub daemon: Daemon,
    victim: Scratch,
    bystander: Scratch,
    baseline: (usize, usize),
    round: u64,
}

/// Open descriptors and threads of process `pid`.
pub fn counts(pid: u32) -> (usize, usize) {
    let n = |dir: &str| {
        std::fs::read_dir(format!("/proc/{pid}/{dir}"))
            .unwrap_or_else(|e| panic!("daemon gone? /proc/{pid}/{dir}: {e}"))
            .count()
    };
    (n("fd"), n("task"))
}

impl Watched {
    pub fn start() -> Watched {
        let victim = scratch(DISK);
        let bystander = scratch(DISK);
        let mut args = Vec::new();
        for (id, s) in [("victim", &victim), ("bystander", &bystander)] {
            args.push("--export".to_string());
            args.push(format!(
                "raw={},socket={},id={id},queues=1",
                s.image.display(),
                s.socket.display()
            ));
        }
        let daemon = Daemon::start(&args, &[&victim.socket, &bystander.socket]);
        let mut w = Watched {
            daemon,
            victim,
            bystander,
            baseline: (0, 0),
            round: 0,
        };
        // Whatever is set up once per export (io_uring, buffers) is set up before the count.
        w.round_trips();
        w.baseline = w.settled(None);
        w
    }

    pub fn socket(&self) -> PathBuf {
        self.victim.socket.clone()
    }

    pub fn baseline(&self) -> (usize, usize) {
        self.baseline
    }

    /// The counts once they stop changing (or equal `want`), within 20 s (a busy machine
    /// may take seconds to run the daemon's clean-up).
    pub fn settled(&self, want: Option<(usize, usize)>) -> (usize, usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = counts(self.daemon.pid());
        // Without a target, the same counts for 300 ms: a connection's thread (the daemon
        // starts one per frontend) may take a while to end on a busy machine.
        let mut same = 0;
        loop {
            std::thread::sleep(Duration::from_millis(10));
            let now = counts(self.daemon.pid());
            same = if now == last { same + 1 } else { 0 };
            let done = match want {
                Some(w) => now == w,
                None => same >= 30,
            };
            if done || Instant::now() > deadline {
                return now;
            }
            last = now;
        }
    }

    fn alive(&self, case: &str) {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.daemon.pid()))
            .unwrap_or_else(|e| panic!("{case}: the daemon is gone: {e}"));
        // The state follows the parenthesised command name.
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().next());
        assert!(
            !matches!(state, Some("Z") | Some("X") | None),
            "{case}: the daemon died (state {state:?})"
        );
    }

    fn round_trip(&mut self, socket: &Path, case: &str) {
        self.round += 1;
        let mut c = Client::try_connect(socket, 1)
            .unwrap_or_else(|e| panic!("{case}: {} does not serve: {e:?}", socket.display()));
        let offset = (self.round % 64) * 4096;
        let data = pattern(self.round, offset, 4096);
        c.buf()[..4096].copy_from_slice(&data);
        let p = c.buf_ptr(0);
        assert_eq!(write(&mut c.queues[0], p, offset, 4096), 0, "{case}: write");
        c.buf()[..4096].fill(0);
        assert_eq!(read(&mut c.queues[0], p, offset, 4096), 0, "{case}: read");
        assert!(c.buf()[..4096] == data[..], "{case}: read back other data");
        c.queues[0].flush(0, ReqFlags::empty());
        assert_eq!(wait_one(&mut c.queues[0]), 0, "{case}: flush");
    }

    fn round_trips(&mut self) {
        let (v, b) = (self.victim.socket.clone(), self.bystander.socket.clone());
        self.round_trip(&b, "warm-up");
        self.round_trip(&v, "warm-up");
    }

    /// What the daemon's descriptors are, for a failure message.
    pub fn fd_list(&self) -> String {
        let dir = format!("/proc/{}/fd", self.daemon.pid());
        let mut fds: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .map(|e| {
                        let target = std::fs::read_link(e.path()).unwrap_or_default();
                        format!("{}->{}", e.file_name().to_string_lossy(), target.display())
                    })
                    .collect()
            })
            .unwrap_or_default();
        fds.sort();
        fds.join(" ")
    }

    /// The checks after one hostile case.
    pub fn check(&mut self, case: &str) {
        self.alive(case);
        let after = self.settled(Some(self.baseline));
        assert_eq!(
            after,
            self.baseline,
            "{case}: (descriptors, threads) not back to where they were; fds: {}",
            self.fd_list()
        );
        let (v, b) = (self.victim.socket.clone(), self.bystander.socket.clone());
        self.round_trip(&b, case);
        // The export that was attacked serves the next frontend too.
        self.round_trip(&v, case);
        self.alive(case);
        let after = self.settled(Some(self.baseline));
        assert_eq!(after, self.baseline, "{case}: counts after the round trips");
    }
}
