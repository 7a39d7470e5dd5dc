//! `thinblk dump` prints what thin_dump 0.9 prints, byte for byte.

mod tools_support;

use tools_support::*;

#[test]
fn dump_of_meta_bin_is_the_transcripts_thin_dump_output() {
    let ((_dir, meta), want) = (image("meta.bin.zst"), transcript("thin_dump meta.bin"));
    assert_eq!(thinblk_ok(&["dump", s(&meta)]), want);
}

#[test]
fn dump_of_meta_bin_is_pool_xml() {
    let ((_dir, meta), want) = (image("meta.bin.zst"), fixture_text("pool.xml"));
    assert_eq!(thinblk_ok(&["dump", s(&meta)]), want);
}

#[test]
fn dump_of_the_rust_133_image_is_pool_xml() {
    let ((_dir, meta), want) = (image("meta-rust133.bin.zst"), fixture_text("pool.xml"));
    assert_eq!(thinblk_ok(&["dump", s(&meta)]), want);
}

#[test]
fn dump_of_the_multilevel_image_is_its_xml() {
    let ((_dir, meta), want) = (
        image("meta-multilevel.bin.zst"),
        fixture_text("pool-multilevel.xml"),
    );
    assert_eq!(thinblk_ok(&["dump", s(&meta)]), want);
}

#[test]
fn dump_writes_to_a_file_with_o() {
    let ((dir, meta), want) = (image("meta.bin.zst"), fixture_text("pool.xml"));
    let out = dir.path().join("out.xml");
    assert_eq!(thinblk_ok(&["dump", s(&meta), "-o", s(&out)]), "");
    assert_eq!(std::fs::read_to_string(&out).expect("read output"), want);
}

fn kernel_image_dumps_like_thin_dump(name: &str, extra: &[&str]) {
    let (_dir, meta) = image(&format!("kernel/{name}.bin.zst"));
    let thin_dump = tool("thin_dump");
    let mut args = extra.to_vec();
    args.push(s(&meta));
    let (ok, want, err) = run_tool(&thin_dump, &args);
    assert!(ok, "thin_dump failed: {err}");
    let mut ours = vec!["dump"];
    ours.extend_from_slice(&args);
    let got = thinblk_ok(&ours);
    assert!(
        got == want,
        "thinblk dump {extra:?} of {name} differs from thin_dump"
    );
}

#[test]
fn kernel_written_image_dumps_like_thin_dump() {
    kernel_image_dumps_like_thin_dump("tmeta", &[]);
}

#[test]
fn kernel_image_with_a_metadata_snapshot_dumps_like_thin_dump() {
    kernel_image_dumps_like_thin_dump("tmeta_with_metadata_snap", &[]);
}

#[test]
fn held_metadata_snapshot_dumps_like_thin_dump_m() {
    kernel_image_dumps_like_thin_dump("tmeta_with_metadata_snap", &["-m"]);
}

#[test]
fn kernel_image_with_shared_nodes_dumps_like_thin_dump() {
    kernel_image_dumps_like_thin_dump("tmeta_with_shared_internals_and_leaves", &[]);
}

#[test]
fn metadata_snap_without_a_held_root_is_an_error() {
    let (_dir, meta) = image("meta.bin.zst");
    let out = thinblk(&["dump", "--metadata-snap", s(&meta)]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no metadata snapshot"));
}

#[test]
fn json_dump_holds_the_same_pool_as_the_xml() {
    let ((_dir, meta), xml) = (
        image("meta-multilevel.bin.zst"),
        fixture_text("pool-multilevel.xml"),
    );
    let (head, want) = thinblk::tools::xml::parse(xml.as_bytes()).expect("parse xml");
    let json: serde_json::Value =
        serde_json::from_str(&thinblk_ok(&["dump", "--format", "json", s(&meta)]))
            .expect("valid JSON");
    let sb = &json["superblock"];
    assert_eq!(sb["time"], head.time);
    assert_eq!(sb["transaction"], head.transaction);
    assert_eq!(sb["data_block_size"], head.data_block_size);
    assert_eq!(sb["nr_data_blocks"], head.nr_data_blocks);
    let devices = sb["devices"].as_array().expect("devices array");
    assert_eq!(devices.len(), want.devices.len());
    for (d, (id, w)) in devices.iter().zip(&want.devices) {
        assert_eq!(d["dev_id"], *id);
        assert_eq!(d["mapped_blocks"], w.details.mapped_blocks);
        assert_eq!(d["snap_time"], w.details.snapshotted_time);
        let mut got = std::collections::BTreeMap::new();
        for run in d["mappings"].as_array().expect("mappings array") {
            let n = |k: &str| run[k].as_u64().expect("number");
            for i in 0..n("length") {
                got.insert(
                    n("origin_begin") + i,
                    (n("data_begin") + i, n("time") as u32),
                );
            }
        }
        let want: std::collections::BTreeMap<_, _> = w
            .mappings
            .iter()
            .map(|(k, v)| (*k, (v.block, v.time)))
            .collect();
        assert_eq!(got, want);
    }
}

#[test]
fn thin_restore_output_dumps_back_to_its_input() {
    let (xml_path, thin_restore) = (fixture_path("pool-multilevel.xml"), tool("thin_restore"));
    let dir = tempfile::tempdir().expect("tempdir");
    let meta = dir.path().join("meta.bin");
    std::fs::File::create(&meta)
        .and_then(|f| f.set_len(8 << 20))
        .expect("create metadata file");
    let (ok, _, err) = run_tool(&thin_restore, &["-i", s(&xml_path), "-o", s(&meta)]);
    assert!(ok, "thin_restore failed: {err}");
    let want = std::fs::read_to_string(&xml_path).expect("read xml");
    assert_eq!(thinblk_ok(&["dump", s(&meta)]), want);
}
