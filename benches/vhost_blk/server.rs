//! The servers under test as child processes (thinblk, qemu-storage-daemon), and what /proc says
//! about their cost.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running server, stopped with SIGTERM when dropped.
pub struct Server {
    child: Child,
    log: PathBuf,
}

/// Data file size of the thin pools the suite makes (`--data-size`): 2^20 blocks of 64 KiB.
pub const THIN_DATA_SIZE: u64 = 64 << 30;

/// Block-device options of qemu-storage-daemon for a raw file with O_DIRECT and io_uring.
pub fn qsd_file_node(node: &str, file: &Path) -> String {
    format!(
        "driver=file,node-name={node},filename={},cache.direct=on,aio=io_uring",
        file.display()
    )
}

/// The thinblk binary cargo built with this benchmark.
pub fn this_build() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_thinblk"))
}

impl Server {
    /// `thinblk serve --export SPEC,socket=SOCKET,queues=1`.
    pub fn thinblk(backing: &str, socket: &Path, dir: &Path) -> Result<Server, String> {
        Server::thinblk_of(&this_build(), backing, socket, dir)
    }

    /// [`Server::thinblk`] with the thinblk binary `bin`.
    pub fn thinblk_of(
        bin: &Path,
        backing: &str,
        socket: &Path,
        dir: &Path,
    ) -> Result<Server, String> {
        Server::thinblk_queues(bin, backing, socket, dir, 1)
    }

    /// [`Server::thinblk_of`] with `queues` queues.
    pub fn thinblk_queues(
        bin: &Path,
        backing: &str,
        socket: &Path,
        dir: &Path,
        queues: usize,
    ) -> Result<Server, String> {
        let mut cmd = Command::new(bin);
        cmd.arg("serve").arg("--export").arg(format!(
            "{backing},socket={},queues={queues}",
            socket.display()
        ));
        cmd.env("RUST_LOG", "warn");
        Server::spawn("thinblk", cmd, socket, dir)
    }

    /// [`Server::thinblk`] run by `valgrind --tool=callgrind`, which counts instructions
    /// (`callgrind_control` zeroes and dumps them into `dir`).
    pub fn thinblk_callgrind(backing: &str, socket: &Path, dir: &Path) -> Result<Server, String> {
        let mut cmd = Command::new("valgrind");
        cmd.current_dir(dir)
            .arg("--tool=callgrind")
            .arg(this_build())
            .arg("serve")
            .arg("--export")
            .arg(format!("{backing},socket={},queues=1", socket.display()));
        cmd.env("RUST_LOG", "warn");
        Server::spawn("thinblk-callgrind", cmd, socket, dir)
    }

    /// `thinblk serve --dir POOL --export SPEC,socket=SOCKET,queues=1` plus `extra` exports,
    /// on a pool made on first use (64 KiB blocks).
    pub fn thin(
        pool: &Path,
        spec: &str,
        extra: &[String],
        socket: &Path,
        dir: &Path,
    ) -> Result<Server, String> {
        Server::thin_of(&this_build(), pool, spec, extra, socket, dir)
    }

    /// [`Server::thin`] with the thinblk binary `bin`.
    pub fn thin_of(
        bin: &Path,
        pool: &Path,
        spec: &str,
        extra: &[String],
        socket: &Path,
        dir: &Path,
    ) -> Result<Server, String> {
        Server::thin_queues(bin, pool, spec, extra, socket, dir, 1)
    }

    /// [`Server::thin_of`] with `queues` queues on the measured export.
    pub fn thin_queues(
        bin: &Path,
        pool: &Path,
        spec: &str,
        extra: &[String],
        socket: &Path,
        dir: &Path,
        queues: usize,
    ) -> Result<Server, String> {
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--dir")
            .arg(pool)
            .args(["--metadata-size", "1G", "--data-size"])
            .arg(THIN_DATA_SIZE.to_string())
            .arg("--export")
            .arg(format!(
                "{spec},socket={},queues={queues}",
                socket.display()
            ));
        for e in extra {
            cmd.arg("--export").arg(e);
        }
        cmd.env("RUST_LOG", "warn");
        Server::spawn("thinblk", cmd, socket, dir)
    }

    /// qemu-storage-daemon with `blockdevs` (the last one exported) at `socket`, one queue.
    pub fn qsd(
        blockdevs: &[String],
        node: &str,
        socket: &Path,
        dir: &Path,
    ) -> Result<Server, String> {
        Server::qsd_qmp(blockdevs, node, socket, None, dir)
    }

    /// [`Server::qsd`], with a QMP monitor at `qmp` when given.
    pub fn qsd_qmp(
        blockdevs: &[String],
        node: &str,
        socket: &Path,
        qmp: Option<&Path>,
        dir: &Path,
    ) -> Result<Server, String> {
        let mut cmd = Command::new("qemu-storage-daemon");
        for b in blockdevs {
            cmd.arg("--blockdev").arg(b);
        }
        cmd.arg("--export").arg(format!(
            "type=vhost-user-blk,id=e,node-name={node},addr.type=unix,addr.path={},writable=on,num-queues=1",
            socket.display()
        ));
        if let Some(qmp) = qmp {
            let _ = std::fs::remove_file(qmp);
            cmd.arg("--chardev")
                .arg(format!(
                    "socket,id=qmp,path={},server=on,wait=off",
                    qmp.display()
                ))
                .args(["--monitor", "chardev=qmp"]);
        }
        Server::spawn("qemu-storage-daemon", cmd, socket, dir)
    }

    pub(crate) fn spawn(
        name: &str,
        mut cmd: Command,
        socket: &Path,
        dir: &Path,
    ) -> Result<Server, String> {
        let _ = std::fs::remove_file(socket);
        let log = dir.join(format!("{name}.log"));
        let log_file =
            File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        if let Some(cpu) = crate::placement::server_cpu() {
            use std::os::unix::process::CommandExt;
            // SAFETY: the closure only makes one system call (sched_setaffinity), which is
            // async-signal-safe; pinned before exec, every thread the server makes inherits it.
            unsafe { cmd.pre_exec(move || crate::placement::pin_to(0, cpu)) };
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("{name} did not start: {e}"))?;
        let mut server = Server { child, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!("{name} exited ({status}): {}", server.log_tail()));
            }
            if Instant::now() > deadline {
                return Err(format!("{name}: {} never accepted", socket.display()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // The probe above was a connection too; let the server see it close.
        std::thread::sleep(Duration::from_millis(50));
        Ok(server)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last line the server wrote to stderr.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .last()
            .unwrap_or("no message")
            .trim()
            .to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: sending a signal to our own child has no memory effects.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// User plus system CPU time of every thread of `pid`, from /proc/PID/stat.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces: the first
    // is field 3 (state), so utime (14) and stime (15) are the 12th and 13th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf has no memory effects.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then(|| (utime + stime) as f64 / ticks as f64)
}

/// Peak resident set size (VmHWM) of `pid` in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
