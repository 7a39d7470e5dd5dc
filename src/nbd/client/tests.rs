//! The client against thinblk's own server (in this process, on memory disks) and against
//! a server that breaks the protocol. tests/nbd_client.rs runs it against qemu-nbd.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::*;
use crate::engine::memory::MemoryDevice;
use crate::engine::BlockDevice;
use crate::nbd::proto::*;
use crate::nbd::{NbdAddr, NbdExport, NbdServer};

const SIZE: u64 = 8 << 20;

fn export(server: &NbdServer, name: &str, writable: bool) -> Arc<MemoryDevice> {
    let disk = Arc::new(MemoryDevice::new(SIZE).unwrap());
    let dev: Arc<dyn BlockDevice> = disk.clone();
    server
        .add(NbdExport {
            name: name.into(),
            description: String::new(),
            dev: dev.clone(),
            node: dev,
            writable,
            fast_zero: false,
            bitmap: None,
        })
        .unwrap();
    disk
}

struct Fixture {
    _dir: tempfile::TempDir,
    uri: String,
    server: NbdServer,
}

fn unix_server() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let server = NbdServer::start(NbdAddr::Unix(path.clone())).unwrap();
    Fixture {
        uri: format!("nbd+unix:///d?socket={}", path.display()),
        _dir: dir,
        server,
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 512) as u8))
        .collect()
}

#[test]
fn writes_zeroes_trims_and_flushes_reach_the_export() {
    let f = unix_server();
    let _disk = export(&f.server, "d", true);
    let c = NbdClient::connect_uri(&f.uri, DEFAULT_IN_FLIGHT).unwrap();
    assert_eq!(c.size(), SIZE);
    assert!(c.info().structured);
    assert_eq!(c.info().min_block, 512);
    c.write(4096, &pattern(1, 64 << 10)).unwrap();
    assert_eq!(c.read(4096, 64 << 10).unwrap(), pattern(1, 64 << 10));
    c.write_zeroes(8192, 4096).unwrap();
    c.trim(16384, 8192).unwrap();
    c.flush().unwrap();
    let got = c.read(0, 128 << 10).unwrap();
    let mut want = vec![0u8; 128 << 10];
    want[4096..4096 + (64 << 10)].copy_from_slice(&pattern(1, 64 << 10));
    want[8192..12288].fill(0);
    want[16384..24576].fill(0);
    assert_eq!(got, want);
    c.close().unwrap();
}

#[test]
fn many_requests_are_in_flight_at_once_and_all_complete() {
    let f = unix_server();
    let _disk = export(&f.server, "d", true);
    let c = NbdClient::connect_uri(&f.uri, 8).unwrap();
    let done = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    for i in 0..256u64 {
        let d = done.clone();
        let data = pattern(i as u8, 4096);
        c.submit(
            Command::Write {
                offset: i * 4096,
                data: &data,
                fua: i % 7 == 0,
            },
            Box::new(move |r| {
                r.unwrap();
                d.fetch_add(1, Ordering::SeqCst);
            }),
        )
        .unwrap();
        most.fetch_max(c.in_flight(), Ordering::SeqCst);
        assert!(c.in_flight() <= 8);
    }
    c.drain();
    assert_eq!(done.load(Ordering::SeqCst), 256);
    for i in (0..256u64).step_by(17) {
        assert_eq!(c.read(i * 4096, 4096).unwrap(), pattern(i as u8, 4096));
    }
    // Threads may share one client.
    let c = Arc::new(c);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                for i in 0..32u64 {
                    let off = (t * 32 + i) * 8192;
                    c.write(off, &pattern((t + i) as u8, 8192)).unwrap();
                    assert_eq!(c.read(off, 8192).unwrap(), pattern((t + i) as u8, 8192));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn requests_the_export_cannot_take_are_refused_before_sending() {
    let f = unix_server();
    let _disk = export(&f.server, "d", false);
    let c = NbdClient::connect_uri(&f.uri, 4).unwrap();
    assert!(matches!(
        c.write(0, &[0; 512]),
        Err(ClientError::Unsupported(_))
    ));
    assert!(matches!(c.trim(0, 512), Err(ClientError::Unsupported(_))));
    assert!(matches!(c.read(SIZE, 512), Err(ClientError::Invalid(_))));
    assert!(matches!(
        c.read(u64::MAX - 10, 512),
        Err(ClientError::Invalid(_))
    ));
    assert!(matches!(c.read(0, 0), Err(ClientError::Invalid(_))));
    assert!(matches!(c.read(0, 64 << 20), Err(ClientError::Invalid(_))));
    // What the server refuses comes back as its error: here an unaligned read.
    match c.read(1, 512) {
        Err(ClientError::Reply(ReplyError::Server { errno, .. })) => assert_eq!(errno, EINVAL),
        other => panic!("{other:?}"),
    }
    // The connection is still good.
    assert_eq!(c.read(0, 512).unwrap(), vec![0; 512]);
}

#[test]
fn an_unknown_export_is_refused_with_the_servers_message() {
    let f = unix_server();
    match NbdClient::connect_uri(&f.uri.replace("///d", "///nope"), 4) {
        Err(ClientError::Refused { option, reply, .. }) => {
            assert_eq!((option, reply), ("GO", REP_ERR_UNKNOWN))
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("connected to a missing export"),
    }
}

#[test]
fn tcp_targets_work_too() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = NbdServer::start(NbdAddr::Tcp(format!("127.0.0.1:{port}"))).unwrap();
    let _disk = export(&server, "d", true);
    let c = NbdClient::connect_uri(&format!("nbd://127.0.0.1:{port}/d"), 4).unwrap();
    c.write(0, &pattern(9, 4096)).unwrap();
    assert_eq!(c.read(0, 4096).unwrap(), pattern(9, 4096));
}

/// A server that negotiates properly, then answers the first request with `reply`, its
/// cookie and `after` (an empty `reply`: never answers).
fn broken_server(
    reply: Vec<u8>,
    after: Vec<u8>,
) -> (tempfile::TempDir, String, std::thread::JoinHandle<()>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.sock");
    let l = UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut hello = NBD_MAGIC.to_be_bytes().to_vec();
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        s.write_all(&hello).unwrap();
        let mut flags = [0u8; 4];
        s.read_exact(&mut flags).unwrap();
        loop {
            let mut h = [0u8; 16];
            s.read_exact(&mut h).unwrap();
            let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
            let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let mut d = vec![0u8; len as usize];
            s.read_exact(&mut d).unwrap();
            let rep = |kind: u32, data: &[u8]| {
                let mut m = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
                m.extend_from_slice(&opt.to_be_bytes());
                m.extend_from_slice(&kind.to_be_bytes());
                m.extend_from_slice(&(data.len() as u32).to_be_bytes());
                m.extend_from_slice(data);
                m
            };
            if opt == OPT_GO {
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&(1u64 << 20).to_be_bytes());
                info.extend_from_slice(&(FLAG_HAS_FLAGS | FLAG_SEND_FLUSH).to_be_bytes());
                s.write_all(&rep(REP_INFO, &info)).unwrap();
                s.write_all(&rep(REP_ACK, &[])).unwrap();
                break;
            }
            s.write_all(&rep(REP_ACK, &[])).unwrap();
        }
        let mut req = [0u8; REQUEST_LEN];
        s.read_exact(&mut req).unwrap();
        let cookie = RequestHeader::decode(&req).cookie;
        let silent = reply.is_empty();
        let reply: Vec<u8> = reply
            .iter()
            .copied()
            .chain(cookie.to_be_bytes())
            .chain(after)
            .collect();
        if !silent {
            let _ = s.write_all(&reply);
        }
        // Stay until the client hangs up.
        let _ = s.read(&mut [0u8; 64]);
    });
    let uri = format!("nbd+unix:///x?socket={}", path.display());
    (dir, uri, t)
}

#[test]
fn a_server_that_breaks_the_protocol_loses_the_connection_not_the_client() {
    // A structured chunk header up to its cookie: a data chunk for a flush.
    let mut bad_chunk = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    bad_chunk.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    bad_chunk.extend_from_slice(&REPLY_TYPE_OFFSET_DATA.to_be_bytes());
    let cases: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (0xdead_beefu32.to_be_bytes().to_vec(), vec![]), // bad magic (then the cookie)
        (bad_chunk.clone(), 24u32.to_be_bytes().to_vec()),
        // An error chunk whose message is longer than the chunk.
        (
            [
                &STRUCTURED_REPLY_MAGIC.to_be_bytes()[..],
                &REPLY_FLAG_DONE.to_be_bytes(),
                &REPLY_TYPE_ERROR.to_be_bytes(),
            ]
            .concat(),
            [
                &8u32.to_be_bytes()[..],
                &5u32.to_be_bytes(),
                &100u16.to_be_bytes(),
                b"ab",
            ]
            .concat(),
        ),
    ];
    for (reply, after) in cases {
        let (_dir, uri, t) = broken_server(reply, after);
        let c = NbdClient::connect_uri(&uri, 4).unwrap();
        match c.flush() {
            Err(ClientError::Reply(ReplyError::Lost(_))) => {}
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            c.flush(),
            Err(ClientError::Reply(ReplyError::Lost(_)))
        ));
        drop(c);
        t.join().unwrap();
    }
}

#[test]
fn hanging_up_fails_what_a_silent_server_never_answers() {
    // A server that negotiates, then reads requests and never answers.
    let (_dir, uri, t) = broken_server(Vec::new(), Vec::new());
    let c = Arc::new(NbdClient::connect_uri(&uri, 4).unwrap());
    let waiter = {
        let c = c.clone();
        std::thread::spawn(move || c.flush())
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(!waiter.is_finished(), "the flush was answered");
    c.hang_up_handle().unwrap().hang_up();
    match waiter.join().unwrap() {
        Err(ClientError::Reply(ReplyError::Lost(_))) => {}
        other => panic!("{other:?}"),
    }
    drop(c);
    t.join().unwrap();
}

#[test]
fn a_silent_server_times_out_only_while_it_owes_a_reply() {
    // A server that negotiates, then reads requests and never answers.
    let (_dir, uri, t) = broken_server(Vec::new(), Vec::new());
    let timeout = std::time::Duration::from_millis(300);
    let c = NbdClient::connect_with(&NbdUri::parse(&uri).unwrap(), 4, timeout).unwrap();
    // Idle for several timeouts: nothing is owed, so the connection stays.
    std::thread::sleep(timeout * 3);
    assert_eq!(c.in_flight(), 0);
    let start = std::time::Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    let c = Arc::new(c);
    let c2 = c.clone();
    std::thread::spawn(move || {
        let _ = tx.send(c2.flush());
    });
    let r = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the flush of a silent server never failed");
    match r {
        Err(ClientError::Reply(ReplyError::Lost(why))) => {
            assert!(why.contains("sent nothing"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    let took = start.elapsed();
    assert!(took >= timeout, "failed after {took:?}, before the timeout");
    // Generous: a busy machine may run the reply thread late.
    assert!(took < timeout * 10, "failed only after {took:?}");
    drop(c);
    t.join().unwrap();
}

#[test]
fn a_chunk_offset_that_wraps_around_is_a_violation_not_a_panic() {
    // A data chunk for a read at 0 whose offset plus length passes 2^64.
    let mut reply = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    reply.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    reply.extend_from_slice(&REPLY_TYPE_OFFSET_DATA.to_be_bytes());
    let mut after = (8u32 + 100).to_be_bytes().to_vec();
    after.extend_from_slice(&(u64::MAX - 10).to_be_bytes());
    after.extend_from_slice(&[1u8; 100]);
    let (_dir, uri, t) = broken_server(reply, after);
    let c = Arc::new(NbdClient::connect_uri(&uri, 4).unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    let c2 = c.clone();
    std::thread::spawn(move || {
        let _ = tx.send(c2.read(0, 4096));
    });
    // Before the fix the reply thread panicked and the read waited forever.
    match rx.recv_timeout(std::time::Duration::from_secs(10)) {
        Ok(Err(ClientError::Reply(ReplyError::Lost(_)))) => {}
        other => panic!("{other:?}"),
    }
    drop(c);
    t.join().unwrap();
}
