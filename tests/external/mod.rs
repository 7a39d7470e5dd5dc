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

/// Fails the calling test because `what` is missing. (Typed as an `Option` for the callers'
/// `?`-style use; it never returns.)
pub fn missing<T>(what: &str) -> Option<T> {
    panic!(
        "{what}. scripts/test.sh installs the tools and CI puts the fixtures in \
         ../shared/fixtures/dm-thin beside the repository ({FIXTURES} names another place)"
    );
}

/// The dm-thin fixtures' directory.
pub fn fixture_dir() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os(FIXTURES)
        .map(PathBuf::from)
        .into_iter()
        .collect();
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/dm-thin"));
    // Worktrees of the main checkout sit one level deeper than the checkout itself.
    candidates.push(PathBuf::from("/work/shared/fixtures/dm-thin"));
    match candidates.iter().find(|p| p.join("pool.xml").exists()) {
        Some(dir) => Some(dir.clone()),
        None => missing(&format!(
            "dm-thin fixtures not found (looked in {candidates:?})"
        )),
    }
}

/// A fixture's path; a fixture missing from a fixture directory that exists always fails.
pub fn fixture_path(rel: &str) -> Option<PathBuf> {
    let path = fixture_dir()?.join(rel);
    assert!(path.exists(), "fixture {} is missing", path.display());
    Some(path)
}

/// A fixture's text (`pool.xml`, `transcript-0.9.0.txt`).
pub fn fixture_text(rel: &str) -> Option<String> {
    let path = fixture_path(rel)?;
    let text = std::fs::read_to_string(&path);
    Some(text.unwrap_or_else(|e| panic!("reading fixture {}: {e}", path.display())))
}

/// A fixture image (`*.zst`), decompressed.
pub fn fixture_bytes(rel: &str) -> Option<Vec<u8>> {
    use std::io::Read;
    let path = fixture_path(rel)?;
    let fail = |e: &dyn std::fmt::Display| -> ! {
        panic!("decompressing fixture {}: {e}", path.display())
    };
    let file = std::fs::File::open(&path).unwrap_or_else(|e| fail(&e));
    let mut dec = ruzstd::decoding::StreamingDecoder::new(std::io::BufReader::new(file))
        .unwrap_or_else(|e| fail(&e));
    let mut out = Vec::new();
    dec.read_to_end(&mut out).unwrap_or_else(|e| fail(&e));
    Some(out)
}

/// An installed program (thin-provisioning-tools live in /usr/sbin on Debian).
pub fn tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = vec!["/usr/sbin".into(), "/sbin".into()];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    match dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()) {
        Some(p) => Some(p),
        None => missing(&format!("{name} is not installed")),
    }
}
