//! `thinblk ls` and `thinblk delta` print what thin_ls and thin_delta 0.9 print.

mod tools_support;

use tools_support::*;

const LS_FIELDS: &str =
    "DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS,TRANSACTION,CREATE_TIME,SNAP_TIME";

#[test]
fn ls_of_meta_bin_is_the_transcripts_thin_ls_output() {
    let cmd = format!("thin_ls -o {LS_FIELDS} meta.bin");
    let ((_dir, meta), want) = (image("meta.bin.zst"), transcript(&cmd));
    assert_eq!(thinblk_ok(&["ls", "-o", LS_FIELDS, s(&meta)]), want);
}

#[test]
fn ls_counts_a_snapshots_remapped_block_as_exclusive_to_both() {
    let (_dir, meta) = image("meta.bin.zst");
    let got = thinblk_ok(&["ls", "--no-headers", "-o", "DEV,EXCLUSIVE_BLOCKS", s(&meta)]);
    assert_eq!(got, "1 1 \n2 8 \n3 2 \n");
}

#[test]
fn ls_rejects_an_unknown_field_by_name() {
    let (_dir, meta) = image("meta.bin.zst");
    let out = thinblk(&["ls", "-o", "DEV,NOPE", s(&meta)]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOPE"));
}

#[test]
fn delta_of_meta_bin_is_the_transcripts_thin_delta_output() {
    let ((_dir, meta), want) = (
        image("meta.bin.zst"),
        transcript("thin_delta --snap1 1 --snap2 3 meta.bin"),
    );
    assert_eq!(
        thinblk_ok(&["delta", "--snap1", "1", "--snap2", "3", s(&meta)]),
        want
    );
}

#[test]
fn delta_of_a_missing_device_fails_naming_it() {
    let (_dir, meta) = image("meta.bin.zst");
    let out = thinblk(&["delta", "--snap1", "1", "--snap2", "9", s(&meta)]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("device 9"));
}

/// Every column, the default columns, and delta both ways and verbose, against the
/// installed tools on a kernel-written image.
fn like_installed_tools(name: &str) {
    let (_dir, meta) = image(&format!("kernel/{name}.bin.zst"));
    let (thin_ls, thin_delta) = (tool("thin_ls"), tool("thin_delta"));
    let all = "DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS,MAPPED_SECTORS,EXCLUSIVE_SECTORS,SHARED_SECTORS,MAPPED_BYTES,EXCLUSIVE_BYTES,SHARED_BYTES,MAPPED,EXCLUSIVE,SHARED,TRANSACTION,CREATE_TIME,SNAP_TIME";
    let m = s(&meta);
    let cases: Vec<(&std::path::Path, Vec<&str>)> = vec![
        (&thin_ls, vec!["-o", all, m]),
        (&thin_ls, vec![m]),
        (&thin_ls, vec!["--no-headers", m]),
        (&thin_delta, vec!["--snap1", "1", "--snap2", "2", m]),
        (&thin_delta, vec!["--snap1", "2", "--snap2", "1", m]),
        (
            &thin_delta,
            vec!["--verbose", "--snap1", "1", "--snap2", "2", m],
        ),
    ];
    for (exe, args) in cases {
        let (ok, want, err) = run_tool(exe, &args);
        assert!(ok, "{exe:?} {args:?}: {err}");
        let sub = if exe.ends_with("thin_ls") {
            "ls"
        } else {
            "delta"
        };
        let mut ours = vec![sub];
        ours.extend_from_slice(&args);
        assert_eq!(thinblk_ok(&ours), want, "thinblk {ours:?}");
    }
}

#[test]
fn ls_and_delta_match_the_installed_tools_on_a_kernel_image() {
    like_installed_tools("tmeta");
}

#[test]
fn ls_and_delta_match_the_installed_tools_on_shared_nodes() {
    like_installed_tools("tmeta_with_shared_internals_and_leaves");
}
