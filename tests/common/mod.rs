//! Shared pieces of the integration tests: a thinblk daemon in a child process and a blkio
//! client (libblkio's Rust core, driver virtio-blk-vhost-user) talking to it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// A `thinblk serve` child process, stopped with SIGTERM when dropped.
pub struct Daemon {
    child: Child,
}

impl Daemon {
    /// Starts `thinblk serve ARGS...` and waits until every socket in `sockets` accepts.
    pub fn start(args: &[String], sockets: &[&Path]) -> Daemon {
        let child = Command::new(env!("CARGO_BIN_EXE_thinblk"))
            .arg("serve")
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn thinblk");
        let mut d = Daemon { child };
        let deadline = Instant::now() + Duration::from_secs(20);
        for s in sockets {
            while std::os::unix::net::UnixStream::connect(s).is_err() {
                if let Ok(Some(status)) = d.child.try_wait() {
                    panic!("thinblk exited early: {status}");
                }
                assert!(
                    Instant::now() < deadline,
                    "socket {} never appeared",
                    s.display()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // The probing connections above each occupied the export once; give it a moment to
        // see them close before a real client connects.
        std::thread::sleep(Duration::from_millis(50));
        d
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, then reap: the daemon gets no chance to flush or commit anything.
    pub fn kill9(mut self) {
        // SAFETY: kill with a pid we own (not yet reaped) and a valid signal has no memory
        // effects.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }

    /// Peak resident memory of the daemon (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmHWM in /proc/PID/status")
            * 1024
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: kill with a pid we own (still running, not reaped) and a valid signal
            // number has no memory effects.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        }
        let _ = self.child.wait();
    }
}

/// A scratch directory holding a sparse backing file and a socket path.
pub struct Scratch {
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
    pub socket: PathBuf,
}

pub fn scratch(size: u64) -> Scratch {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(size)
        .unwrap();
    let socket = dir.path().join("disk.sock");
    Scratch { dir, image, socket }
}

pub fn raw_export(s: &Scratch, extra: &str) -> Vec<String> {
    vec![
        "--export".into(),
        format!(
            "raw={},socket={}{}",
            s.image.display(),
            s.socket.display(),
            extra
        ),
    ]
}

/// A connected and started blkio instance with one buffer region mapped.
pub struct Client {
    pub blkio: Blkio,
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
}

pub const REGION_LEN: usize = 4 << 20;

impl Client {
    pub fn connect(socket: &Path, num_queues: i32) -> Client {
        Self::try_connect(socket, num_queues).expect("blkio connect")
    }

    pub fn try_connect(socket: &Path, num_queues: i32) -> blkio::Result<Client> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
        blkio.set_str("path", socket.to_str().unwrap())?;
        blkio.connect()?;
        blkio.set_i32("num-queues", num_queues)?;
        let queues = blkio.start()?.queues;
        let region = blkio.alloc_mem_region(REGION_LEN)?;
        blkio.map_mem_region(&region)?;
        Ok(Client {
            blkio,
            queues,
            region,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").unwrap()
    }

    /// The mapped buffer region as a byte slice.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is REGION_LEN bytes mapped by blkio for the client's lifetime, and
        // no request is in flight while the slice is used.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    pub fn buf_ptr(&self, at: usize) -> *mut u8 {
        (self.region.addr + at) as *mut u8
    }
}

/// Waits for one completion on `q` and returns its result (0 or a negative errno).
pub fn wait_one(q: &mut Blkioq) -> i32 {
    let mut c = [MaybeUninit::<Completion>::uninit()];
    let mut timeout = Duration::from_secs(30);
    let n = q.do_io(&mut c, 1, Some(&mut timeout), None).expect("do_io");
    assert_eq!(n, 1, "no completion within 30 s");
    // SAFETY: do_io reported one completion written into the first slot.
    unsafe { c[0].assume_init_ref() }.ret
}

pub fn read(q: &mut Blkioq, buf: *mut u8, offset: u64, len: usize) -> i32 {
    q.read(offset, buf, len, 0, ReqFlags::empty());
    wait_one(q)
}

pub fn write(q: &mut Blkioq, buf: *const u8, offset: u64, len: usize) -> i32 {
    q.write(offset, buf, len, 0, ReqFlags::empty());
    wait_one(q)
}

/// Writes `data` at `offset` through the client's first queue, from the start of its buffer.
pub fn write_at(c: &mut Client, offset: u64, data: &[u8]) -> i32 {
    c.buf()[..data.len()].copy_from_slice(data);
    let p = c.buf_ptr(0);
    write(&mut c.queues[0], p, offset, data.len())
}

/// Reads `len` bytes at `offset` through the client's first queue; the read must succeed.
pub fn read_at(c: &mut Client, offset: u64, len: usize) -> Vec<u8> {
    let p = c.buf_ptr(0);
    assert_eq!(
        read(&mut c.queues[0], p, offset, len),
        0,
        "read at {offset}"
    );
    c.buf()[..len].to_vec()
}

/// Flushes through the client's first queue; returns the result.
pub fn flush(c: &mut Client) -> i32 {
    c.queues[0].flush(0, ReqFlags::empty());
    wait_one(&mut c.queues[0])
}

/// A deterministic byte pattern that differs per offset and per seed.
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (offset + i).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ seed.wrapping_mul(0xD6E8_FEB8_6659_FD93);
            (x >> 29) as u8
        })
        .collect()
}

/// A negotiated QMP connection that keeps the events it sees while waiting for replies.
pub struct Qmp {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
    events: Vec<serde_json::Value>,
}

impl Qmp {
    pub fn connect(path: &Path) -> Qmp {
        let writer = std::os::unix::net::UnixStream::connect(path).unwrap();
        writer
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let reader = std::io::BufReader::new(writer.try_clone().unwrap());
        let mut q = Qmp {
            reader,
            writer,
            events: Vec::new(),
        };
        q.line(); // greeting
        q.ok("qmp_capabilities", serde_json::json!({}));
        q
    }

    fn line(&mut self) -> serde_json::Value {
        use std::io::BufRead;
        let mut s = String::new();
        if let Err(e) = self.reader.read_line(&mut s) {
            panic!("no QMP message ({e}); events so far {:?}", self.events);
        }
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("not JSON ({e}): {s:?}"))
    }

    /// The reply to `cmd` (`{"return": ...}` or `{"error": ...}`); events that come first are
    /// kept for `event`.
    pub fn exec(&mut self, cmd: &str, args: serde_json::Value) -> serde_json::Value {
        use std::io::Write;
        let msg = serde_json::json!({"execute": cmd, "arguments": args});
        self.writer
            .write_all(serde_json::to_string(&msg).unwrap().as_bytes())
            .unwrap();
        loop {
            let v = self.line();
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    /// The return value of `cmd`; panics on an error reply.
    pub fn ok(&mut self, cmd: &str, args: serde_json::Value) -> serde_json::Value {
        let r = self.exec(cmd, args.clone());
        r.get("return")
            .cloned()
            .unwrap_or_else(|| panic!("{cmd} {args} failed: {r}"))
    }

    /// The data of the next event called `name`, waiting (up to the read timeout) if it has
    /// not come yet.
    pub fn event(&mut self, name: &str) -> serde_json::Value {
        loop {
            if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
                return self.events.remove(i)["data"].clone();
            }
            let v = self.line();
            assert!(v.get("event").is_some(), "unexpected reply {v}");
            self.events.push(v);
        }
    }

    /// How many events called `name` have come and not been taken.
    pub fn count(&self, name: &str) -> usize {
        self.events.iter().filter(|e| e["event"] == name).count()
    }

    /// Forgets the events seen so far.
    pub fn clear_events(&mut self) {
        self.events.clear();
    }
}
