//! Helpers for the offline tools' tests: fixtures decompressed into temporary files, the
//! transcript of thin-provisioning-tools 0.9.0, and running the built `thinblk` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

#[path = "../external/mod.rs"]
mod external;

use external::fixture_bytes;
// Not every test uses every one.
#[allow(unused_imports)]
pub use external::{fixture_dir, fixture_path, fixture_text, tool};

/// A temporary directory holding the decompressed image `rel` (e.g. `meta.bin.zst`) as
/// `meta.bin`; returns the directory (keep it alive) and the image's path.
pub fn image(rel: &str) -> (TempDir, PathBuf) {
    let bytes = fixture_bytes(rel);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("meta.bin");
    std::fs::write(&path, bytes).expect("write image");
    (dir, path)
}

/// The output the transcript records for the command line `cmd` (without `$ `).
pub fn transcript(cmd: &str) -> String {
    let text = fixture_text("transcript-0.9.0.txt");
    let start = text
        .find(&format!("$ {cmd}\n"))
        .unwrap_or_else(|| panic!("the transcript does not record `{cmd}`"))
        + cmd.len()
        + 3;
    let rest = &text[start..];
    let end = rest
        .find("[exit ")
        .unwrap_or_else(|| panic!("the transcript's `{cmd}` has no exit line"));
    rest[..end].to_string()
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
