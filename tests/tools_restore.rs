//! `thinblk restore` writes pools that thin_check and `thinblk check` accept and that dump
//! back to the input; bad input is refused with its line and leaves the output alone.

mod tools_support;

use std::path::Path;

use tools_support::*;

/// Restores `xml` into a new file, checks it both ways, and compares dumps with the input.
fn restores_and_dumps_back(xml_path: &Path) {
    let dir = tempfile::tempdir().expect("tempdir");
    let meta = dir.path().join("meta.bin");
    thinblk_ok(&["restore", "-q", "-i", s(xml_path), "-o", s(&meta)]);
    let want = std::fs::read_to_string(xml_path).expect("read xml");
    thinblk_ok(&["check", "-q", s(&meta)]);
    assert_eq!(thinblk_ok(&["dump", s(&meta)]), want);
    let thin_check = tool("thin_check");
    let (ok, out, err) = run_tool(&thin_check, &[s(&meta)]);
    assert!(ok, "thin_check: {out}{err}");
    let thin_dump = tool("thin_dump");
    let (ok, out, err) = run_tool(&thin_dump, &[s(&meta)]);
    assert!(ok, "thin_dump: {err}");
    assert!(
        out == want,
        "thin_dump of the restored pool differs from the input"
    );
}

#[test]
fn pool_xml_restores_into_a_pool_both_checkers_accept() {
    let p = fixture_path("pool.xml");
    restores_and_dumps_back(&p);
}

#[test]
fn multilevel_xml_restores_into_a_pool_both_checkers_accept() {
    let p = fixture_path("pool-multilevel.xml");
    restores_and_dumps_back(&p);
}

#[test]
fn a_kernel_pools_dump_restores_and_dumps_back() {
    let (dir, meta) = image("kernel/tmeta.bin.zst");
    let thin_dump = tool("thin_dump");
    let (ok, xml, err) = run_tool(&thin_dump, &[s(&meta)]);
    assert!(ok, "{err}");
    let xml_path = dir.path().join("tmeta.xml");
    std::fs::write(&xml_path, xml).expect("write xml");
    restores_and_dumps_back(&xml_path);
}

#[test]
fn restore_into_an_existing_file_keeps_its_size() {
    let xml = fixture_path("pool.xml");
    let dir = tempfile::tempdir().expect("tempdir");
    let meta = dir.path().join("meta.bin");
    std::fs::File::create(&meta)
        .and_then(|f| f.set_len(16 << 20))
        .expect("create");
    thinblk_ok(&["restore", "-q", "-i", s(&xml), "-o", s(&meta)]);
    assert_eq!(std::fs::metadata(&meta).expect("stat").len(), 16 << 20);
    thinblk_ok(&["check", "-q", s(&meta)]);
}

#[test]
fn restore_creates_a_file_of_the_size_asked_for() {
    let xml = fixture_path("pool.xml");
    let dir = tempfile::tempdir().expect("tempdir");
    let meta = dir.path().join("meta.bin");
    thinblk_ok(&[
        "restore",
        "-q",
        "-i",
        s(&xml),
        "-o",
        s(&meta),
        "--metadata-size",
        "32M",
    ]);
    assert_eq!(std::fs::metadata(&meta).expect("stat").len(), 32 << 20);
    thinblk_ok(&["check", "-q", s(&meta)]);
}

#[test]
fn bad_xml_is_refused_with_its_line_and_the_output_is_untouched() {
    let ((dir, meta), xml) = (image("meta.bin.zst"), fixture_text("pool.xml"));
    let before = std::fs::read(&meta).expect("read");
    let bad = xml.replacen("data_block=\"48\"", "data_block=\"4x8\"", 1);
    let line = bad
        .lines()
        .position(|l| l.contains("4x8"))
        .expect("edited line")
        + 1;
    let bad_path = dir.path().join("bad.xml");
    std::fs::write(&bad_path, bad).expect("write");
    let out = thinblk(&["restore", "-i", s(&bad_path), "-o", s(&meta)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("line {line}:")), "{err}");
    assert!(err.contains("data_block"), "{err}");
    assert_eq!(std::fs::read(&meta).expect("read"), before);
}

#[test]
fn too_small_a_metadata_device_is_refused() {
    let xml = fixture_path("pool-multilevel.xml");
    let dir = tempfile::tempdir().expect("tempdir");
    let meta = dir.path().join("meta.bin");
    let out = thinblk(&[
        "restore",
        "-i",
        s(&xml),
        "-o",
        s(&meta),
        "--metadata-size",
        "16K",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("metadata device has 4 blocks"), "{err}");
}

#[test]
fn restore_refuses_an_output_a_daemon_holds() {
    let ((_dir, meta), xml) = (image("meta.bin.zst"), fixture_path("pool.xml"));
    let held = thinblk::bufio::FileStore::open(&meta, 4096).expect("open");
    held.lock_exclusive().expect("lock");
    let out = thinblk(&["restore", "-i", s(&xml), "-o", s(&meta)]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
}
