//! What tests need from outside the repository: the dm-thin fixtures (`shared/fixtures/dm-thin`
//! beside the repository) and thin-provisioning-tools (which `scripts/test.sh` installs).
//!
//! A missing one fails the test that needs it, so that a run without them cannot pass by
//! testing nothing. There is no way to skip them: a machine that cannot have them cannot run
//! these tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// Where to look for the fixtures first (a directory holding `pool.xml`).
pub const FIXTURES: &str = "THINBLK_FIXTURES";

/// What a test that finds `what` missing says.
fn missing(what: &str) -> ! {
    panic!(
        "{what}. scripts/test.sh installs the tools and CI puts the fixtures in \
         ../shared/fixtures/dm-thin beside the repository ({FIXTURES} names another place)"
    );
}

/// The dm-thin fixtures' directory.
pub fn fixture_dir() -> PathBuf {
    let mut candidates: Vec<PathBuf> = std::env::var_os(FIXTURES)
        .map(PathBuf::from)
        .into_iter()
        .collect();
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/dm-thin"));
    // Worktrees of the main checkout sit one level deeper than the checkout itself.
    candidates.push(PathBuf::from("/work/shared/fixtures/dm-thin"));
    match candidates.iter().find(|p| p.join("pool.xml").exists()) {
        Some(dir) => dir.clone(),
        None => missing(&format!(
            "dm-thin fixtures not found (looked in {candidates:?})"
        )),
    }
}

/// A fixture's path; a fixture missing from a fixture directory that exists always fails.
pub fn fixture_path(rel: &str) -> PathBuf {
    let path = fixture_dir().join(rel);
    assert!(path.exists(), "fixture {} is missing", path.display());
    path
}

/// A fixture's text (`pool.xml`, `transcript-0.9.0.txt`).
pub fn fixture_text(rel: &str) -> String {
    let path = fixture_path(rel);
    let text = std::fs::read_to_string(&path);
    text.unwrap_or_else(|e| panic!("reading fixture {}: {e}", path.display()))
}

/// A fixture image (`*.zst`), decompressed.
pub fn fixture_bytes(rel: &str) -> Vec<u8> {
    use std::io::Read;
    let path = fixture_path(rel);
    let fail = |e: &dyn std::fmt::Display| -> ! {
        panic!("decompressing fixture {}: {e}", path.display())
    };
    let file = std::fs::File::open(&path).unwrap_or_else(|e| fail(&e));
    let mut dec = ruzstd::decoding::StreamingDecoder::new(std::io::BufReader::new(file))
        .unwrap_or_else(|e| fail(&e));
    let mut out = Vec::new();
    dec.read_to_end(&mut out).unwrap_or_else(|e| fail(&e));
    out
}

/// An installed program (thin-provisioning-tools live in /usr/sbin on Debian).
pub fn tool(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = vec!["/usr/sbin".into(), "/sbin".into()];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    match dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()) {
        Some(p) => p,
        None => missing(&format!("{name} is not installed")),
    }
}
