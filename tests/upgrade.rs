//! Graceful upgrade of `thinblk serve` in place (SIGUSR2, QMP `x-thinblk-upgrade`): the same
//! process execs its binary again, the export and control sockets never stop accepting, and a
//! frontend that reconnects finds its data.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod frontend;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Daemon, Qmp};
use frontend::{r, w, Vm};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};

const OK: u8 = VIRTIO_BLK_S_OK as u8;

struct Setup {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    control: PathBuf,
    daemon: Daemon,
}

fn start() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let socket = dir.path().join("disk.sock");
    let control = pool.join("control.sock");
    let args: Vec<String> = vec![
        "--dir".into(),
        pool.display().to_string(),
        "--data-size".into(),
        "64M".into(),
        "--export".into(),
        format!("name=d,size=16M,socket={}", socket.display()),
    ];
    let daemon = Daemon::start(&args, &[&socket, &control]);
    Setup {
        _dir: dir,
        socket,
        control,
        daemon,
    }
}

/// Whether process `pid` has exec'd with handed-over sockets (its environment says so).
fn upgraded(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|env| {
            env.split(|&b| b == 0)
                .any(|v| v.starts_with(b"THINBLK_LISTEN_FDS="))
        })
        .unwrap_or(false)
}

fn wait_upgraded(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !upgraded(pid) {
        assert!(Instant::now() < deadline, "no exec within 30 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Connects to each path every few milliseconds until stopped; counts refusals.
struct Prober {
    stop: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
    tries: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prober {
    fn start(paths: &[&Path]) -> Prober {
        let paths: Vec<PathBuf> = paths.iter().map(|p| p.to_path_buf()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let tries = Arc::new(AtomicU64::new(0));
        let (s, f, t) = (stop.clone(), refused.clone(), tries.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                for p in &paths {
                    t.fetch_add(1, Ordering::Relaxed);
                    if UnixStream::connect(p).is_err() {
                        f.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        let p = Prober {
            stop,
            refused,
            tries,
            thread: Some(thread),
        };
        while p.tries.load(Ordering::Relaxed) < 4 {
            std::thread::sleep(Duration::from_millis(1));
        }
        p
    }

    /// Stops; returns (attempts, refusals).
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Release);
        self.thread.take().unwrap().join().unwrap();
        let tries = self.tries.load(Ordering::Relaxed);
        (tries, self.refused.load(Ordering::Relaxed))
    }
}

/// One request of `kind` at `sector` with one data buffer; returns its status.
fn io(vm: &mut Vm, kind: u32, sector: u64, data: frontend::Desc) -> u8 {
    let h = vm.alloc(16);
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&kind.to_le_bytes());
    header[8..].copy_from_slice(&sector.to_le_bytes());
    vm.put(h, &header);
    let st = vm.alloc(1);
    vm.put(st, &[0xFF]);
    vm.run(0, &[&[r(h, 16), data, w(st, 1)]]);
    vm.get(st, 1)[0]
}

fn write(vm: &mut Vm, sector: u64, bytes: &[u8]) {
    let buf = vm.alloc(bytes.len() as u64);
    vm.put(buf, bytes);
    let status = io(vm, VIRTIO_BLK_T_OUT, sector, r(buf, bytes.len() as u32));
    assert_eq!(status, OK);
}

fn read(vm: &mut Vm, sector: u64, len: u32) -> Vec<u8> {
    let buf = vm.alloc(u64::from(len));
    assert_eq!(io(vm, VIRTIO_BLK_T_IN, sector, w(buf, len)), OK);
    vm.get(buf, len as usize)
}

#[test]
fn sigusr2_upgrades_in_place_and_no_socket_ever_refuses_a_connection() {
    let s = start();
    let inflight = VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    let mut region = None;
    let mut vm = Vm::connect_with(&s.socket, 1, inflight, &mut |fe| {
        use vhost::vhost_user::message::VhostUserInflight;
        use vhost::vhost_user::VhostUserFrontend;
        let (msg, file) = fe
            .get_inflight_fd(&VhostUserInflight::new(0, 0, 1, frontend::QUEUE_SIZE))
            .unwrap();
        fe.set_inflight_fd(&msg, std::os::fd::AsRawFd::as_raw_fd(&file))
            .unwrap();
        region = Some((msg, file));
    });
    let (msg, file) = region.unwrap();
    let before: Vec<u8> = (0..8192).map(|i| (i % 251) as u8).collect();
    write(&mut vm, 0, &before);
    // The guest switches to write-through; QEMU will not say so again after the upgrade.
    {
        use vhost::vhost_user::message::VhostUserConfigFlags;
        use vhost::vhost_user::VhostUserFrontend;
        vm.fe
            .set_config(32, VhostUserConfigFlags::WRITABLE, &[0])
            .unwrap();
    }

    let probe = Prober::start(&[&s.socket, &s.control]);
    let pid = s.daemon.pid();
    // SAFETY: kill with our child's pid and a valid signal.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGUSR2) }, 0);
    wait_upgraded(pid);
    vm.reconnect(&s.socket, inflight, &mut |fe| {
        use vhost::vhost_user::VhostUserFrontend;
        fe.set_inflight_fd(&msg, std::os::fd::AsRawFd::as_raw_fd(&file))
            .unwrap();
    });
    assert_eq!(
        read(&mut vm, 0, 8192),
        before,
        "the data before the upgrade"
    );
    assert_eq!(
        vm.config(32, 1),
        vec![0],
        "write-through, as the guest left it before the upgrade"
    );
    let after = vec![0x5A; 4096];
    write(&mut vm, 64, &after);
    assert_eq!(read(&mut vm, 64, 4096), after);
    let (tries, refused) = probe.finish();
    assert!(tries > 4, "the prober ran on ({tries} connections)");
    assert_eq!(
        refused, 0,
        "{refused} of {tries} connections refused during the upgrade"
    );

    let mut qmp = Qmp::connect(&s.control);
    let exports = qmp.ok("query-block-exports", serde_json::json!({}));
    assert_eq!(exports.as_array().unwrap().len(), 1, "{exports}");
}

#[test]
fn qmp_upgrade_refuses_a_broken_binary_and_then_upgrades_to_a_good_one() {
    let s = start();
    let mut qmp = Qmp::connect(&s.control);
    let r = qmp.exec(
        "x-thinblk-upgrade",
        serde_json::json!({"binary": "/bin/false"}),
    );
    let desc = r["error"]["desc"].as_str().unwrap_or_default().to_string();
    assert!(desc.contains("--version"), "{r}");
    // Nothing stopped: the export still serves.
    let mut vm = Vm::connect(&s.socket, 1);
    write(&mut vm, 8, &[7; 512]);
    drop(vm);

    let pid = s.daemon.pid();
    let r = qmp.exec("x-thinblk-upgrade", serde_json::json!({}));
    assert!(r.get("return").is_some(), "{r}");
    wait_upgraded(pid);
    let mut qmp = Qmp::connect(&s.control);
    qmp.ok("query-block-exports", serde_json::json!({}));
    let mut vm = Vm::connect(&s.socket, 1);
    assert_eq!(read(&mut vm, 8, 512), vec![7; 512]);
}
