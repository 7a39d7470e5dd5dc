//! Helpers for the offline tools' tests: fixtures decompressed into temporary files, the
//! transcript of thin-provisioning-tools 0.9.0, and running the built `thinblk` binary.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

pub fn fixture_dir() -> Option<PathBuf> {
    let candidates = [
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/dm-thin"),
        PathBuf::from("/work/shared/fixtures/dm-thin"),
    ];
    let found = candidates.into_iter().find(|p| p.join("pool.xml").exists());
    if found.is_none() {
        eprintln!("skipping: dm-thin fixtures not found");
    }
    found
}

/// A fixture's text (`pool.xml`, `transcript-0.9.0.txt`).
pub fn fixture_text(rel: &str) -> Option<String> {
    std::fs::read_to_string(fixture_dir()?.join(rel)).ok()
}

/// A fixture's path.
pub fn fixture_path(rel: &str) -> Option<PathBuf> {
    Some(fixture_dir()?.join(rel))
}

/// A temporary directory holding the decompressed image `rel` (e.g. `meta.bin.zst`) as
/// `meta.bin`; returns the directory (keep it alive) and the image's path.
pub fn image(rel: &str) -> Option<(TempDir, PathBuf)> {
    let src = fixture_dir()?.join(rel);
    let file = std::fs::File::open(&src).expect("open fixture");
    let mut dec = ruzstd::decoding::StreamingDecoder::new(std::io::BufReader::new(file))
        .expect("zstd header");
    let mut bytes = Vec::new();
    dec.read_to_end(&mut bytes).expect("decompress fixture");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("meta.bin");
    std::fs::write(&path, bytes).expect("write image");
    Some((dir, path))
}

/// The output the transcript records for the command line `cmd` (without `$ `).
pub fn transcript(cmd: &str) -> Option<String> {
    let text = fixture_text("transcript-0.9.0.txt")?;
    let start = text.find(&format!("$ {cmd}\n"))? + cmd.len() + 3;
    let rest = text.get(start..)?;
    let end = rest.find("[exit ")?;
    Some(rest.get(..end)?.to_string())
}

/// An installed thin-provisioning-tools program, or `None` with a message.
pub fn tool(name: &str) -> Option<PathBuf> {
    let p = PathBuf::from("/usr/sbin").join(name);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipping: {name} not installed");
        None
    }
}

pub fn thinblk(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_thinblk"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run thinblk")
}

/// Runs `thinblk` and returns its stdout, failing the test if it fails.
pub fn thinblk_ok(args: &[&str]) -> String {
    let out = thinblk(args);
    assert!(
        out.status.success(),
        "thinblk {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Runs an installed tool and returns (success, stdout, stderr).
pub fn run_tool(exe: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(exe).args(args).output().expect("run tool");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
