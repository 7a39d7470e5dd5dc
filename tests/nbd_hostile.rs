//! Clients that break the NBD protocol: lying lengths, requests past the end, huge lengths,
//! unknown commands and options, hanging up mid-request. Each gets an NBD error or a closed
//! connection; the daemon and its other clients go on, and a loop of such connections leaves
//! no descriptor or thread behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Daemon, Qmp};
use serde_json::json;
use thinblk::nbd::proto::*;

const SIZE: u64 = 16 << 20;

struct Setup {
    dir: tempfile::TempDir,
    daemon: Daemon,
    _qmp: Qmp,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let args: Vec<String> = vec![
        "--dir".into(),
        d.display().to_string(),
        "--data-size".into(),
        "256M".into(),
        "--export".into(),
        format!("name=vm,size={SIZE},socket={}", d.join("vm.sock").display()),
        "--nbd".into(),
        d.join("nbd.sock").display().to_string(),
    ];
    let control = d.join("control.sock");
    let daemon = Daemon::start(&args, &[&d.join("nbd.sock"), &control]);
    let mut qmp = Qmp::connect(&control);
    qmp.ok(
        "nbd-server-add",
        json!({"device": "vm", "name": "rw", "writable": true}),
    );
    Setup {
        dir,
        daemon,
        _qmp: qmp,
    }
}

struct Client(UnixStream);

impl Client {
    /// Connected, past the greeting and the client flags.
    fn connect(socket: &Path) -> Client {
        let s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = Client(s);
        let mut hello = [0u8; 18];
        c.0.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], b"NBDMAGIC");
        c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        c
    }

    fn send(&mut self, b: &[u8]) {
        self.0.write_all(b).unwrap();
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.send(&m);
    }

    /// One option reply: (type, data).
    fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.0.read_exact(&mut data).unwrap();
        (kind, data)
    }

    /// NBD_OPT_GO to `name`, up to transmission (simple replies).
    fn go(&mut self, name: &str) {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(OPT_GO, &d);
        loop {
            let (kind, _) = self.option_reply();
            if kind == REP_ACK {
                return;
            }
            assert_eq!(kind, REP_INFO, "GO failed");
        }
    }

    fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        let h = RequestHeader {
            magic: REQUEST_MAGIC,
            flags,
            kind,
            cookie,
            offset,
            len,
        };
        self.send(&h.encode());
    }

    /// A simple reply: (error, cookie).
    fn reply(&mut self) -> (u32, u64) {
        let mut r = [0u8; 16];
        self.0.read_exact(&mut r).unwrap();
        assert_eq!(
            u32::from_be_bytes(r[..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        (
            u32::from_be_bytes(r[4..8].try_into().unwrap()),
            u64::from_be_bytes(r[8..16].try_into().unwrap()),
        )
    }

    /// The server hung up: EOF (or a reset) before any byte.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

/// A client that reads and writes correctly, to show the daemon goes on.
fn still_serves(socket: &Path) {
    let mut c = Client::connect(socket);
    c.go("rw");
    c.request(CMD_WRITE, CMD_FLAG_FUA, 1, 4096, 512);
    c.send(&[0xa5; 512]);
    assert_eq!(c.reply(), (0, 1));
    c.request(CMD_READ, 0, 2, 4096, 512);
    assert_eq!(c.reply(), (0, 2));
    let mut data = [0u8; 512];
    c.0.read_exact(&mut data).unwrap();
    assert_eq!(data, [0xa5; 512]);
    c.request(CMD_DISC, 0, 3, 0, 0);
    assert!(c.closed());
}

#[test]
fn bad_options_get_errors_and_broken_framing_a_closed_connection() {
    let s = setup();
    let sock = s.dir.path().join("nbd.sock");
    let mut c = Client::connect(&sock);
    c.option(999, b"whatever");
    assert_eq!(c.option_reply().0, REP_ERR_UNSUP);
    c.option(OPT_STARTTLS, &[]);
    assert_eq!(c.option_reply().0, REP_ERR_UNSUP);
    c.option(OPT_LIST, b"x");
    assert_eq!(c.option_reply().0, REP_ERR_INVALID);
    // A name length past the option's end.
    let mut d = 4000u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"rw\0\0");
    c.option(OPT_GO, &d);
    assert_eq!(c.option_reply().0, REP_ERR_INVALID);
    // Meta contexts before structured replies.
    c.option(OPT_SET_META_CONTEXT, &[0; 8]);
    assert_eq!(c.option_reply().0, REP_ERR_INVALID);
    let mut d = 7u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"nothere\0\0");
    c.option(OPT_INFO, &d);
    assert_eq!(c.option_reply().0, REP_ERR_UNKNOWN);
    // Still negotiating: GO works after all that.
    c.go("rw");
    drop(c);

    // An option claiming a gigabyte: hung up on, not read.
    let mut c = Client::connect(&sock);
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&(1u32 << 30).to_be_bytes());
    c.send(&m);
    assert!(c.closed());
    // Bad option magic.
    let mut c = Client::connect(&sock);
    c.send(&[0x42; 16]);
    assert!(c.closed());
    // Unknown client flags.
    let s2 = UnixStream::connect(&sock).unwrap();
    let mut c = Client(s2);
    let mut hello = [0u8; 18];
    c.0.read_exact(&mut hello).unwrap();
    c.send(&0x8000_0000u32.to_be_bytes());
    assert!(c.closed());
    still_serves(&sock);
}

#[test]
fn bad_requests_get_nbd_errors_and_the_connection_goes_on() {
    let s = setup();
    let sock = s.dir.path().join("nbd.sock");
    let mut c = Client::connect(&sock);
    c.go("rw");
    c.request(CMD_READ, 0, 1, SIZE, 512);
    assert_eq!(c.reply(), (EINVAL, 1), "read past the end");
    c.request(CMD_READ, 0, 2, u64::MAX - 511, 1024);
    assert_eq!(c.reply(), (EINVAL, 2), "offset + length overflows");
    c.request(CMD_READ, 0, 3, 0, u32::MAX);
    assert_eq!(c.reply(), (EINVAL, 3), "read of 4 GiB");
    c.request(77, 0, 4, 0, 512);
    assert_eq!(c.reply(), (EINVAL, 4), "unknown command");
    c.request(CMD_READ, 1 << 12, 5, 0, 512);
    assert_eq!(c.reply(), (EINVAL, 5), "unknown flag");
    c.request(CMD_READ, 0, 6, 100, 512);
    assert_eq!(c.reply(), (EINVAL, 6), "not whole sectors");
    c.request(CMD_BLOCK_STATUS, 0, 7, 0, 512);
    assert_eq!(c.reply(), (EINVAL, 7), "block status without a context");
    // A write past the end: refused, and its payload skipped, not taken as requests.
    c.request(CMD_WRITE, 0, 8, SIZE, 4096);
    let mut payload = vec![0u8; 4096];
    // Bytes that would look like a request if they were parsed as one.
    payload[..28].copy_from_slice(
        &RequestHeader {
            magic: REQUEST_MAGIC,
            flags: 0,
            kind: CMD_DISC,
            cookie: 99,
            offset: 0,
            len: 0,
        }
        .encode(),
    );
    c.send(&payload);
    assert_eq!(c.reply(), (ENOSPC, 8));
    c.request(CMD_WRITE_ZEROES, 0, 9, SIZE - 512, 1024);
    assert_eq!(c.reply(), (ENOSPC, 9));
    c.request(CMD_FLUSH, 0, 10, 0, 0);
    assert_eq!(c.reply(), (0, 10));
    // A write claiming more than the maximum payload: hung up on.
    c.request(CMD_WRITE, 0, 11, 0, MAX_PAYLOAD + 512);
    assert!(c.closed());
    still_serves(&sock);

    // Read-only exports refuse changes with EPERM.
    let mut c = Client::connect(&sock);
    c.go("vm");
    c.request(CMD_WRITE, 0, 1, 0, 512);
    c.send(&[1; 512]);
    assert_eq!(c.reply(), (EPERM, 1));
    c.request(CMD_TRIM, 0, 2, 0, 512);
    assert_eq!(c.reply(), (EPERM, 2));
}

#[test]
fn many_requests_are_in_flight_on_one_connection() {
    let s = setup();
    let sock = s.dir.path().join("nbd.sock");
    let mut c = Client::connect(&sock);
    c.go("rw");
    // Pipelined: every request sent before any reply is read.
    let n = 48u64;
    let mut batch = Vec::new();
    for i in 0..n {
        batch.extend_from_slice(
            &RequestHeader {
                magic: REQUEST_MAGIC,
                flags: 0,
                kind: CMD_WRITE,
                cookie: 1000 + i,
                offset: i * 65536,
                len: 4096,
            }
            .encode(),
        );
        batch.extend(std::iter::repeat_n(i as u8, 4096));
    }
    c.send(&batch);
    let mut seen: Vec<u64> = (0..n)
        .map(|_| c.reply())
        .map(|(e, k)| {
            assert_eq!(e, 0);
            k
        })
        .collect();
    seen.sort();
    assert_eq!(seen, (1000..1000 + n).collect::<Vec<_>>());
    for i in 0..n {
        c.request(CMD_READ, 0, i, i * 65536, 4096);
    }
    for _ in 0..n {
        let (e, k) = c.reply();
        assert_eq!(e, 0);
        let mut data = vec![0u8; 4096];
        c.0.read_exact(&mut data).unwrap();
        assert!(data.iter().all(|&b| b == k as u8), "read {k}");
    }
}

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn a_loop_of_hostile_connections_leaves_no_descriptor_or_thread_behind() {
    let s = setup();
    let sock = s.dir.path().join("nbd.sock");
    let pid = s.daemon.pid();
    let (fds, tasks) = (format!("/proc/{pid}/fd"), format!("/proc/{pid}/task"));
    still_serves(&sock);
    std::thread::sleep(Duration::from_millis(200));
    let (fds0, tasks0) = (count(&fds), count(&tasks));
    for i in 0..150u32 {
        let mut c = Client::connect(&sock);
        match i % 5 {
            // Gone in the middle of the handshake.
            0 => c.send(&IHAVEOPT.to_be_bytes()[..5]),
            // Gone in the middle of a write's payload, with reads in flight.
            1 => {
                c.go("rw");
                for k in 0..8 {
                    c.request(CMD_READ, 0, k, k * 4096, 65536);
                }
                c.request(CMD_WRITE, 0, 9, 0, 1 << 20);
                c.send(&[7; 1000]);
            }
            // Gone in the middle of a request header.
            2 => {
                c.go("rw");
                c.send(&REQUEST_MAGIC.to_be_bytes());
            }
            // A lying write length (hung up on).
            3 => {
                c.go("rw");
                c.request(CMD_WRITE, 0, 1, 0, u32::MAX);
                assert!(c.closed());
            }
            // Requests that never read their replies, then gone.
            _ => {
                c.go("rw");
                for k in 0..32 {
                    c.request(CMD_READ, 0, k, 0, 1 << 20);
                }
            }
        }
    }
    still_serves(&sock);
    // Connection threads end once their client has gone and their requests finished.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (f, t) = (count(&fds), count(&tasks));
        if f <= fds0 && t <= tasks0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: {f} fds (was {fds0}), {t} threads (was {tasks0})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn removing_an_export_hangs_up_on_its_clients_only_when_asked() {
    let s = setup();
    let sock = s.dir.path().join("nbd.sock");
    let mut qmp = Qmp::connect(&s.dir.path().join("control.sock"));
    qmp.ok("nbd-server-add", json!({"device": "vm", "name": "other"}));
    let listed = qmp.ok("query-block-exports", json!({}));
    let nbd: Vec<&serde_json::Value> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "nbd")
        .collect();
    assert_eq!(nbd.len(), 3, "vm (from --nbd), rw and other: {listed}");
    assert!(nbd
        .iter()
        .any(|e| e["id"] == "other" && e["node-name"] == "vm" && e["writable"] == false));
    let mut c = Client::connect(&sock);
    c.go("other");
    let r = qmp.exec("nbd-server-remove", json!({"name": "other"}));
    assert!(
        r.get("error").is_some(),
        "safe mode refuses while in use: {r}"
    );
    qmp.ok(
        "nbd-server-remove",
        json!({"name": "other", "mode": "hard"}),
    );
    assert!(c.closed());
    still_serves(&sock);
    let r = qmp.exec("nbd-server-remove", json!({"name": "other"}));
    assert_eq!(r["error"]["class"], "DeviceNotFound", "{r}");
    // Stopping the server hangs up on everyone; starting again works.
    let mut c = Client::connect(&sock);
    c.go("rw");
    qmp.ok("nbd-server-stop", json!({}));
    assert!(c.closed());
    let addr = json!({"type": "unix", "data": {"path": sock}});
    qmp.ok("nbd-server-start", json!({"addr": addr}));
    qmp.ok(
        "nbd-server-add",
        json!({"device": "vm", "name": "rw", "writable": true}),
    );
    still_serves(&sock);
}

#[test]
fn writes_over_nbd_pass_the_node_write_threshold() {
    use std::io::BufRead;
    let s = setup();
    let sock = s.dir.path().join("nbd.sock");
    let control = s.dir.path().join("control.sock");
    let mut qmp = Qmp::connect(&control);
    qmp.ok(
        "block-set-write-threshold",
        json!({"node-name": "vm", "write-threshold": 1 << 20}),
    );
    // A listener of its own, reading lines (events) as they come.
    let mut events = UnixStream::connect(&control).unwrap();
    events
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut lines = std::io::BufReader::new(events.try_clone().unwrap()).lines();
    lines.next().unwrap().unwrap();
    events
        .write_all(br#"{"execute": "qmp_capabilities"}"#)
        .unwrap();
    lines.next().unwrap().unwrap();
    let mut c = Client::connect(&sock);
    c.go("rw");
    c.request(CMD_WRITE, 0, 1, 2 << 20, 4096);
    c.send(&[3; 4096]);
    assert_eq!(c.reply(), (0, 1));
    let event = lines
        .map(|l| l.unwrap())
        .find(|l| l.contains("\"event\""))
        .unwrap();
    assert!(event.contains("BLOCK_WRITE_THRESHOLD"), "{event}");
    assert!(event.contains("\"vm\""), "{event}");
}

#[test]
fn a_thin_device_with_an_nbd_export_is_deleted_only_with_force() {
    let s = setup();
    let sock = s.dir.path().join("nbd.sock");
    let mut qmp = Qmp::connect(&s.dir.path().join("control.sock"));
    qmp.ok("thin-create", json!({"name": "t", "size": 1 << 20}));
    qmp.ok("nbd-server-add", json!({"device": "t", "writable": true}));
    let mut c = Client::connect(&sock);
    c.go("t");
    let r = qmp.exec("thin-delete", json!({"name": "t"}));
    assert!(r.get("error").is_some(), "deleted under its export: {r}");
    qmp.ok("thin-delete", json!({"name": "t", "force": true}));
    assert!(c.closed(), "its client is disconnected");
    let listed = qmp.ok("query-block-exports", json!({}));
    assert!(!listed.to_string().contains("\"id\":\"t\""), "{listed}");
    still_serves(&sock);
}

#[test]
fn a_forced_delete_under_nbd_writes_leaves_a_new_device_reading_zeros() {
    let s = setup();
    let sock = s.dir.path().join("nbd.sock");
    let mut qmp = Qmp::connect(&s.dir.path().join("control.sock"));
    for round in 0..5 {
        qmp.ok("thin-create", json!({"name": "t", "size": 8 << 20}));
        qmp.ok("nbd-server-add", json!({"device": "t", "writable": true}));
        let mut c = Client::connect(&sock);
        c.go("t");
        // Writes in flight (never waited for) when the device goes.
        let mut batch = Vec::new();
        for i in 0..32u64 {
            batch.extend_from_slice(
                &RequestHeader {
                    magic: REQUEST_MAGIC,
                    flags: 0,
                    kind: CMD_WRITE,
                    cookie: i,
                    offset: (i * 256) << 10,
                    len: 256 << 10,
                }
                .encode(),
            );
            batch.extend(std::iter::repeat_n(0xee, 256 << 10));
        }
        let mut w = c.0.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let _ = w.write_all(&batch);
        });
        std::thread::sleep(Duration::from_millis(5 * round));
        qmp.ok("thin-delete", json!({"name": "t", "force": true}));
        let _ = writer.join();
        // A new device (which may get the same id) holds nothing of the old one's writes.
        qmp.ok("thin-create", json!({"name": "u", "size": 8 << 20}));
        qmp.ok("nbd-server-add", json!({"device": "u"}));
        let mut r = Client::connect(&sock);
        r.go("u");
        for i in 0..32u64 {
            r.request(CMD_READ, 0, i, (i * 256) << 10, 256 << 10);
            assert_eq!(r.reply(), (0, i));
            let mut data = vec![0u8; 256 << 10];
            r.0.read_exact(&mut data).unwrap();
            assert!(
                data.iter().all(|&b| b == 0),
                "round {round}: old data in u at {i}"
            );
        }
        drop(r);
        qmp.ok("thin-delete", json!({"name": "u", "force": true}));
    }
}
