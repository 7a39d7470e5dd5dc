//! Inputs the fuzzers crashed or hung on (`fuzz/regressions/<target>/`), and the seed corpora
//! (`fuzz/corpus/<target>/`), replayed through the fuzz targets' own code without libFuzzer:
//! a fixed crash stays fixed, and the targets keep building on stable.

#[path = "../fuzz/src/lib.rs"]
mod harness;

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

/// Longer than any input should take, even in a debug build.
const HANG: Duration = Duration::from_secs(30);

/// Feeds every file in `fuzz/<dir>/<target>/` to the target; each must return, in time.
fn replay(dir: &str, target: &str) -> usize {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(dir)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&path) else {
        return 0;
    };
    let mut files: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    files.sort();
    for file in &files {
        let data = std::fs::read(file).expect("read fuzz input");
        let (tx, rx) = mpsc::channel();
        let name = target.to_string();
        // A thread, so a regressed hang fails the test instead of stalling the suite.
        std::thread::spawn(move || {
            assert!(harness::run(&name, &data), "no fuzz target {name}");
            let _ = tx.send(());
        });
        match rx.recv_timeout(HANG) {
            Ok(()) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("{} did not return within {HANG:?}", file.display())
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{} panicked", file.display()),
        }
    }
    files.len()
}

fn replay_all(target: &str) {
    let seeds = replay("corpus", target);
    assert!(seeds > 0, "no seed corpus for {target}");
    replay("regressions", target);
}

#[test]
fn virtio_request_inputs_frame_and_run_without_panics() {
    replay_all("virtio_request");
}

#[test]
fn virtio_queue_inputs_return_even_on_broken_rings() {
    replay_all("virtio_queue");
}

#[test]
fn nbd_handshakes_and_requests_are_judged_without_panics() {
    replay_all("nbd");
}

#[test]
fn nbd_client_replies_complete_each_request_once() {
    replay_all("nbd_client");
}

#[test]
fn qmp_streams_are_answered_without_panics() {
    replay_all("qmp");
}

#[test]
fn pdata_blocks_decode_or_fail_cleanly() {
    replay_all("pdata_blocks");
}

#[test]
fn pdata_images_are_checked_without_panics_or_endless_walks() {
    replay_all("pdata_image");
}

#[test]
fn xml_documents_restore_cleanly_or_are_refused_with_an_error() {
    replay_all("xml_restore");
}

#[test]
fn vhost_user_message_streams_end_their_session_without_panics() {
    replay_all("vhost_user");
}

/// A session written with the seed writer's encoder (every kind of descriptor, a kick, a
/// memory write, a header that lies about its size) runs and ends.
#[test]
fn vhost_user_sessions_built_by_the_encoder_end() {
    use harness::vhost_user::{encode, run, FdKind, Op};
    let kinds = [
        FdKind::Memfd(1),
        FdKind::EventFd,
        FdKind::PipeRead,
        FdKind::PipeWrite,
        FdKind::Socket,
        FdKind::DevNull,
    ];
    for k in kinds {
        assert_eq!(FdKind::from_byte(k.to_byte()), k);
    }
    let ops = [
        Op::Message {
            code: 3,
            need_reply: true,
            payload: vec![],
            fds: kinds.to_vec(),
        },
        Op::Kick(0),
        Op::Fill {
            memfd: 0,
            offset: 7,
            bytes: vec![1, 2, 3],
        },
        Op::Message {
            code: 5,
            need_reply: false,
            payload: vec![0xff; 400],
            fds: vec![FdKind::Memfd(0)],
        },
    ];
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        run(&encode(0, &ops));
        let _ = tx.send(());
    });
    rx.recv_timeout(HANG).expect("the session ended");
}

#[test]
fn every_target_has_a_name_the_replay_knows() {
    for (name, _) in harness::TARGETS {
        assert!(Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(name)
            .is_dir());
    }
}
