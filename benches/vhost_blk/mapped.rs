//! Disks with a million mapped blocks, made without writing their data (about 61 GiB of it):
//! a thin pool whose metadata is restored from generated `thin_dump` XML, and a qcow2 image
//! whose clusters are allocated by `preallocation=metadata`. Their data files stay sparse, so
//! reads hit holes: what is measured is the servers' mapping, not the disk.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::images::{qcow2_create, CLUSTER};
use crate::server::THIN_DATA_SIZE;

/// Mapped blocks (and allocated clusters) of the disks.
pub const MAPPED: u64 = 1_000_000;
/// Their virtual size: every block mapped.
pub const SIZE: u64 = MAPPED * CLUSTER;
/// The thin device's name in the pool.
pub const THIN_NAME: &str = "big";

fn thinblk(args: &[&str]) -> Result<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_thinblk"))
        .args(args)
        .output()
        .map_err(|e| format!("thinblk {}: {e}", args[0]))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let msg = String::from_utf8_lossy(&out.stderr);
        Err(format!("thinblk {}: {}", args[0], msg.trim()))
    }
}

fn utf8(p: &Path) -> Result<&str, String> {
    p.to_str()
        .ok_or_else(|| format!("{} is not UTF-8", p.display()))
}

/// A fresh pool directory `dir` (for `thinblk serve --dir`) holding the device
/// [`THIN_NAME`] with [`MAPPED`] blocks mapped to data blocks 0.. in order. Restoring
/// metadata inserts every mapping into the btree, the same tree the daemon builds, so its
/// shape is that of a disk written once from start to end.
pub fn thin_pool(dir: &Path) -> Result<PathBuf, String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let block_sectors = CLUSTER / 512;
    let data_blocks = THIN_DATA_SIZE / CLUSTER;
    let xml = format!(
        "<superblock uuid=\"\" time=\"0\" transaction=\"1\" flags=\"0\" version=\"2\" \
         data_block_size=\"{block_sectors}\" nr_data_blocks=\"{data_blocks}\">\n\
         <device dev_id=\"0\" mapped_blocks=\"{MAPPED}\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n\
         <range_mapping origin_begin=\"0\" data_begin=\"0\" length=\"{MAPPED}\" time=\"0\"/>\n\
         </device>\n</superblock>\n"
    );
    let xml_path = dir.join("mapped.xml");
    std::fs::write(&xml_path, xml).map_err(|e| format!("writing {}: {e}", xml_path.display()))?;
    let meta = dir.join("metadata");
    let (x, m) = (utf8(&xml_path)?, utf8(&meta)?);
    // Room beyond the restored tree for the snapshots' commits.
    thinblk(&["restore", "-q", "-i", x, "-o", m, "--metadata-size", "256M"])?;
    let listed = thinblk(&["ls", "-o", "DEV,MAPPED_BLOCKS", "--no-headers", m])?;
    let counts: Vec<&str> = listed.split_whitespace().collect();
    if counts != ["0", &MAPPED.to_string()] {
        return Err(format!(
            "restored pool lists {listed:?}, not device 0 with {MAPPED} blocks"
        ));
    }
    // The dm-thin format has no names; without this the daemon would call the device dev0
    // and guess its size from the highest mapped block.
    let catalog = serde_json::json!({"devices": {THIN_NAME: {"id": 0, "size": SIZE}}});
    let catalog_path = dir.join("devices.json");
    std::fs::write(&catalog_path, catalog.to_string())
        .map_err(|e| format!("writing {}: {e}", catalog_path.display()))?;
    Ok(dir.to_path_buf())
}

/// A qcow2 image at `path`, [`SIZE`] bytes with 64 KiB clusters, every cluster allocated.
pub fn qcow2(path: &Path) -> Result<(), String> {
    qcow2_create(path, SIZE, ",preallocation=metadata")
}
