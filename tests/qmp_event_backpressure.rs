//! A QMP client that stops reading never slows the I/O path: events are queued per client
//! and written by the control side, and a client that falls too far behind is dropped.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use thinblk::control::ControlServer;
use thinblk::daemon::events::QUEUE_CAPACITY;
use thinblk::daemon::state::State;
use thinblk::daemon::watch::{Watched, WriteThreshold};
use thinblk::engine::null::NullDevice;
use thinblk::engine::BlockDevice;

/// Connects and negotiates; returns the stream with the greeting and reply read.
fn negotiated(path: &Path) -> BufReader<UnixStream> {
    let mut stream = UnixStream::connect(path).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
        .write_all(br#"{"execute":"qmp_capabilities"}"#)
        .unwrap();
    let mut r = BufReader::new(stream);
    for _ in 0..2 {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
    }
    r
}

/// Waits until `n` clients listen for events (negotiation completes on the session thread).
fn wait_listeners(state: &State, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while state.events().listeners() < n {
        assert!(Instant::now() < deadline, "clients never subscribed");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_client_that_never_reads_does_not_slow_writes_that_raise_events() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let state = State::new(None);
    let _server = ControlServer::start(&control, state.clone()).unwrap();
    let _stalled = negotiated(&control);
    let mut reader = negotiated(&control);
    wait_listeners(&state, 2);

    let threshold = Arc::new(WriteThreshold::default());
    let dev = Watched::new(
        Arc::new(NullDevice::new(1 << 20)),
        "n",
        threshold.clone(),
        state.write_hook("n"),
        Arc::downgrade(&state),
    );
    // Far more events than fit in the stalled client's socket buffer and queue.
    let events = 4 * QUEUE_CAPACITY;
    // The reading client reads on its own thread, as a real client would.
    let seen = Arc::new(AtomicUsize::new(0));
    let seen_by_reader = seen.clone();
    let counted = std::thread::spawn(move || {
        let mut n = 0;
        let mut line = String::new();
        while n < events {
            line.clear();
            if reader.read_line(&mut line).unwrap() == 0 {
                break;
            }
            let v: Value = serde_json::from_str(&line).unwrap();
            if v["event"] == "BLOCK_WRITE_THRESHOLD" {
                n += 1;
                seen_by_reader.store(n, Ordering::Release);
            }
        }
        n
    });
    let mut slowest = Duration::ZERO;
    let mut over_20ms = 0;
    for i in 0..events {
        // In bursts the reading client can keep up with (a client that keeps reading is never
        // dropped), while the stalled one falls ever further behind.
        if i % (QUEUE_CAPACITY / 4) == 0 {
            let deadline = Instant::now() + Duration::from_secs(20);
            while seen.load(Ordering::Acquire) < i {
                assert!(Instant::now() < deadline, "the reading client fell behind");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        threshold.set(4096);
        let start = Instant::now();
        dev.write_zeroes(0, 8192, false).unwrap();
        let took = start.elapsed();
        slowest = slowest.max(took);
        over_20ms += usize::from(took > Duration::from_millis(20));
    }
    eprintln!("{events} writes raising events: slowest {slowest:?}, {over_20ms} over 20 ms");
    // Each write only queues its event. Before, once the stalled client's socket was full,
    // every write waited up to a second for it; a few slow calls are left to the scheduler
    // of a busy machine (a CI run beside other work).
    assert!(
        over_20ms * 100 <= events,
        "{over_20ms} of {events} writes took over 20 ms"
    );
    assert!(slowest < Duration::from_millis(900), "slowest {slowest:?}");
    assert_eq!(state.events().dropped_listeners(), 1, "the stalled client");
    assert_eq!(counted.join().unwrap(), events, "the reading client");
}

#[test]
fn a_client_dropped_for_falling_behind_sees_its_connection_end() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let state = State::new(None);
    let _server = ControlServer::start(&control, state.clone()).unwrap();
    let mut stalled = negotiated(&control);
    wait_listeners(&state, 1);
    for i in 0..=QUEUE_CAPACITY * 2 {
        state.emit("TEST_EVENT", serde_json::json!({ "n": i }));
    }
    assert_eq!(state.events().dropped_listeners(), 1);
    // Reading now gets what was written before the hang-up, then the end of the stream.
    let mut rest = Vec::new();
    stalled.read_to_end(&mut rest).unwrap();
    let text = String::from_utf8(rest).unwrap();
    let got = text.lines().count();
    assert!(got < QUEUE_CAPACITY * 2, "{got} events arrived");
    assert_eq!(state.events().listeners(), 0);
}
