#![allow(clippy::unwrap_used)]
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};

use super::*;
use crate::engine::memory::MemoryDevice;
use crate::engine::{BlockDevice, BlockError, Bufs, BufsMut};
use crate::nbd::proto::*;

/// A memory disk whose writes take a while, and that says when one has finished.
struct SlowDisk {
    inner: MemoryDevice,
    wrote: AtomicBool,
}

impl BlockDevice for SlowDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read(&self, offset: u64, bufs: &mut BufsMut<'_>) -> Result<(), BlockError> {
        self.inner.read(offset, bufs)
    }
    fn write(&self, offset: u64, bufs: &Bufs<'_>) -> Result<(), BlockError> {
        std::thread::sleep(Duration::from_millis(300));
        self.inner.write(offset, bufs)?;
        self.wrote.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        self.inner.write_zeroes(offset, len, may_unmap)
    }
}

fn go(s: &mut UnixStream, name: &str) {
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&(d.len() as u32).to_be_bytes());
    m.extend_from_slice(&d);
    s.write_all(&m).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).unwrap();
        if kind == REP_ACK {
            return;
        }
        assert_eq!(kind, REP_INFO);
    }
}

#[test]
fn a_hard_remove_returns_only_after_the_requests_in_flight_finished() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let server = NbdServer::start(NbdAddr::Unix(path.clone())).unwrap();
    let disk = Arc::new(SlowDisk {
        inner: MemoryDevice::new(1 << 20).unwrap(),
        wrote: AtomicBool::new(false),
    });
    let dev: Arc<dyn BlockDevice> = disk.clone();
    server
        .add(NbdExport {
            name: "d".into(),
            description: String::new(),
            dev: dev.clone(),
            node: dev,
            writable: true,
            fast_zero: false,
            bitmap: None,
        })
        .unwrap();
    let mut s = UnixStream::connect(&path).unwrap();
    go(&mut s, "d");
    let h = RequestHeader {
        magic: REQUEST_MAGIC,
        flags: 0,
        kind: CMD_WRITE,
        cookie: 1,
        offset: 0,
        len: 4096,
    };
    s.write_all(&h.encode()).unwrap();
    s.write_all(&[9u8; 4096]).unwrap();
    // The write is in the device (or about to be) when the export goes.
    std::thread::sleep(Duration::from_millis(50));
    server.remove("d", true).unwrap();
    assert!(
        disk.wrote.load(Ordering::SeqCst),
        "remove returned with a write still in flight"
    );
    assert_eq!(server.connections(), 0);
}

#[test]
fn addresses_are_unix_paths_unless_host_and_port() {
    assert_eq!(
        NbdAddr::parse("127.0.0.1:10809"),
        NbdAddr::Tcp("127.0.0.1:10809".into())
    );
    assert_eq!(
        NbdAddr::parse("[::1]:10809"),
        NbdAddr::Tcp("[::1]:10809".into())
    );
    assert_eq!(NbdAddr::parse("nbd.sock"), NbdAddr::Unix("nbd.sock".into()));
    assert_eq!(NbdAddr::parse("/run/a:1"), NbdAddr::Unix("/run/a:1".into()));
    assert_eq!(NbdAddr::parse("host:"), NbdAddr::Unix("host:".into()));
}
