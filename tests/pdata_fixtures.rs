//! The reader against metadata written by thin_restore and by the Linux kernel.

mod pdata_support;

use std::io::Write;

use pdata_support::*;
use thinblk::engine::pdata::btree;
use thinblk::engine::pdata::space_map::{DiskSpaceMap, MetadataSpaceMap, SpaceMap};
use thinblk::engine::pdata::values::BlockTime;

fn reads_like_xml(image: &str, xml: &str) {
    let (img, xml) = (fixture_image(image), fixture_text(xml));
    let (_store, bm) = mem_bm(&img, 1 << 20);
    let sb = read_superblock(&*bm).expect("superblock");
    let got = dump(&*bm, &sb).expect("dump");
    assert_eq!(got, parse_xml(&xml));
}

#[test]
fn thin_restore_090_image_reads_as_pool_xml() {
    reads_like_xml("meta.bin.zst", "pool.xml");
}

#[test]
fn thin_restore_133_image_reads_as_pool_xml() {
    reads_like_xml("meta-rust133.bin.zst", "pool.xml");
}

#[test]
fn multilevel_image_reads_as_its_xml() {
    reads_like_xml("meta-multilevel.bin.zst", "pool-multilevel.xml");
}

#[test]
fn point_lookups_find_every_mapping_of_the_multilevel_image() {
    let (img, xml) = (
        fixture_image("meta-multilevel.bin.zst"),
        fixture_text("pool-multilevel.xml"),
    );
    let (_store, bm) = mem_bm(&img, 1 << 20);
    let sb = read_superblock(&*bm).expect("superblock");
    let want = parse_xml(&xml);
    for (dev, d) in &want.devices {
        for (&k, &v) in &d.mappings {
            let got = btree::lookup_nested::<BlockTime, _>(&*bm, sb.data_mapping_root, *dev, k)
                .expect("lookup");
            assert_eq!(got, Some(v));
        }
        let hi = d.mappings.keys().next_back().copied();
        let root = btree::lookup::<u64, _>(&*bm, sb.data_mapping_root, *dev)
            .expect("top")
            .expect("present");
        assert_eq!(
            btree::highest_key::<BlockTime, _>(&*bm, root).expect("highest"),
            hi
        );
        assert_eq!(
            btree::lowest_key::<BlockTime, _>(&*bm, root).expect("lowest"),
            d.mappings.keys().next().copied()
        );
    }
    assert_eq!(
        btree::lookup_nested::<BlockTime, _>(&*bm, sb.data_mapping_root, 99, 0).expect("lookup"),
        None
    );
}

#[test]
fn space_maps_of_the_090_image_open_with_the_documented_counts() {
    let img = fixture_image("meta.bin.zst");
    let (_store, bm) = mem_bm(&img, 1 << 20);
    let sb = read_superblock(&*bm).expect("superblock");
    let msm = MetadataSpaceMap::open(&bm, &sb.metadata_sm_root).expect("metadata sm");
    assert_eq!(msm.nr_blocks(), 1024);
    assert_eq!(msm.nr_allocated(), 12);
    for b in 0..13u64 {
        assert_eq!(
            msm.count(b).expect("count"),
            u32::from(b != 8),
            "metadata block {b}"
        );
    }
    let dsm = DiskSpaceMap::open(bm.clone(), &sb.data_sm_root).expect("data sm");
    assert_eq!(dsm.nr_blocks(), 1024);
    // Data blocks 0..16 are shared by devices 1 and 3, 16 too (block 1000 of both).
    assert_eq!(dsm.count(0).expect("count"), 2);
    assert_eq!(dsm.count(16).expect("count"), 2);
    assert_eq!(dsm.count(48).expect("count"), 1);
    assert_eq!(dsm.count(100).expect("count"), 1);
    assert_eq!(dsm.count(200).expect("count"), 0);
}

fn kernel_image_reads_as_thin_dump(name: &str) {
    let img = fixture_image(&format!("kernel/{name}.bin.zst"));
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(&img).expect("write image");
    let want = thin_dump(file.path());
    let (_store, bm) = mem_bm(&img, 16 << 20);
    let sb = read_superblock(&*bm).expect("superblock");
    let got = dump(&*bm, &sb).expect("dump");
    assert_eq!(got.devices.len(), want.devices.len());
    assert_eq!(got, want);
    MetadataSpaceMap::open(&bm, &sb.metadata_sm_root).expect("metadata sm opens");
    DiskSpaceMap::open(bm.clone(), &sb.data_sm_root).expect("data sm opens");
}

#[test]
fn kernel_written_image_reads_as_thin_dump_prints_it() {
    kernel_image_reads_as_thin_dump("tmeta");
}

#[test]
fn kernel_image_with_metadata_snapshot_reads_as_thin_dump_prints_it() {
    kernel_image_reads_as_thin_dump("tmeta_with_metadata_snap");
}

#[test]
fn kernel_image_with_shared_nodes_reads_as_thin_dump_prints_it() {
    kernel_image_reads_as_thin_dump("tmeta_with_shared_internals_and_leaves");
}

fn checks_clean(image: &str) {
    let img = fixture_image(image);
    let (_store, bm) = mem_bm(&img, 16 << 20);
    let report = thinblk::engine::pdata::check::check_pool(&bm);
    let shown: Vec<String> = report
        .problems
        .iter()
        .take(10)
        .map(|p| p.to_string())
        .collect();
    assert!(
        report.is_clean(),
        "{image}: {} problems, first: {shown:#?}",
        report.problems.len()
    );
    assert!(report.devices > 0);
}

#[test]
fn checker_finds_nothing_wrong_in_the_thin_restore_images() {
    checks_clean("meta.bin.zst");
    checks_clean("meta-rust133.bin.zst");
    checks_clean("meta-multilevel.bin.zst");
}

#[test]
fn checker_finds_nothing_wrong_in_the_kernel_images() {
    checks_clean("kernel/tmeta.bin.zst");
    checks_clean("kernel/tmeta_with_metadata_snap.bin.zst");
    checks_clean("kernel/tmeta_with_shared_internals_and_leaves.bin.zst");
}
