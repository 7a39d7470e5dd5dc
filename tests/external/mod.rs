//! What tests need from outside the repository: the dm-thin fixtures (`shared/fixtures/dm-thin`
//! beside the repository) and thin-provisioning-tools (which `scripts/test.sh` installs).
//!
//! A missing one fails the test that needs it, so that a run without them cannot pass by
//! testing nothing. On a machine that cannot have them, `THINBLK_SKIP_MISSING=1` skips those
//! tests instead, each with a message.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// Set to 1 to skip, rather than fail, tests whose fixture or tool is missing.
pub const SKIP_MISSING: &str = "THINBLK_SKIP_MISSING";

/// Where to look for the fixtures first (a directory holding `pool.xml`).
pub const FIXTURES: &str = "THINBLK_FIXTURES";

/// Fails the calling test because `what` is missing, or skips it (`None`, with a message)
/// when the run asked for that.
pub fn missing<T>(what: &str) -> Option<T> {
    if std::env::var_os(SKIP_MISSING).is_some_and(|v| v == "1") {
        eprintln!("skipping: {what} ({SKIP_MISSING}=1)");
        return None;
    }
    panic!(
        "{what}. scripts/test.sh installs the tools and CI puts the fixtures in \
         ../shared/fixtures/dm-thin beside the repository ({FIXTURES} names another place); \
         {SKIP_MISSING}=1 skips the tests that need them instead"
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
