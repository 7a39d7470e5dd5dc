//! Backing files: a raw file written once so that reads hit real blocks, fresh qcow2 images
//! and qcow2 backing chains made with qemu-img.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// qcow2 cluster size, the same as a thin pool's 64 KiB data block.
pub const CLUSTER: u64 = 64 << 10;

/// `DIR/disk-SIZE.raw`, `size` bytes of non-zero data, written once and reused by later runs.
pub fn raw_file(dir: &Path, size: u64) -> Result<PathBuf, String> {
    let path = dir.join(format!("disk-{size}.raw"));
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == size) {
        return Ok(path);
    }
    eprintln!("writing {} ({} MiB)", path.display(), size >> 20);
    let tmp = dir.join("disk.raw.partial");
    let e = |e: std::io::Error| format!("writing {}: {e}", tmp.display());
    let mut f = std::fs::File::create(&tmp).map_err(e)?;
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64);
        f.write_all(&chunk[..n as usize]).map_err(e)?;
        left -= n;
    }
    f.sync_all().map_err(e)?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("renaming {}: {e}", tmp.display()))?;
    Ok(path)
}

/// Runs `qemu-img ARGS`; its error output becomes the error.
pub fn qemu_img(args: &[&str]) -> Result<(), String> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|e| format!("qemu-img did not start: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let msg = String::from_utf8_lossy(&out.stderr);
        Err(format!("qemu-img {}: {}", args[0], msg.trim()))
    }
}

fn cluster_opt() -> String {
    format!("cluster_size={CLUSTER}")
}

/// A fresh, empty qcow2 image of `size` bytes with 64 KiB clusters.
pub fn qcow2_fresh(path: &Path, size: u64) -> Result<(), String> {
    qcow2_create(path, size, "")
}

/// A qcow2 image of `size` bytes with 64 KiB clusters and `more` qemu-img options
/// (`,key=value...`), made afresh.
pub fn qcow2_create(path: &Path, size: u64, more: &str) -> Result<(), String> {
    let _ = std::fs::remove_file(path);
    let options = format!("{}{more}", cluster_opt());
    let p = path.to_str().ok_or("path is not UTF-8")?;
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &options,
        p,
        &size.to_string(),
    ])
}

/// A qcow2 copy of the raw file `raw` (every cluster allocated, made once and reused) and
/// `depth` fresh empty overlays on it, `chain-1.qcow2` to `chain-DEPTH.qcow2`. Returns the
/// images base first.
pub fn qcow2_chain(dir: &Path, raw: &Path, depth: usize) -> Result<Vec<PathBuf>, String> {
    let stem = raw.file_stem().ok_or("raw file has no name")?;
    let base = dir.join(stem).with_extension("qcow2");
    if !base.exists() {
        let tmp = base.with_extension("qcow2.partial");
        let (r, t) = (raw.to_str(), tmp.to_str());
        let (r, t) = r.zip(t).ok_or("path is not UTF-8")?;
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &cluster_opt(),
            r,
            t,
        ])?;
        std::fs::rename(&tmp, &base).map_err(|e| format!("renaming {}: {e}", tmp.display()))?;
    }
    let mut chain = vec![base];
    for i in 1..=depth {
        let top = dir.join(format!("chain-{i}.qcow2"));
        let _ = std::fs::remove_file(&top);
        let below = chain[i - 1].to_str().ok_or("path is not UTF-8")?;
        let t = top.to_str().ok_or("path is not UTF-8")?;
        let o = cluster_opt();
        qemu_img(&[
            "create", "-q", "-f", "qcow2", "-o", &o, "-b", below, "-F", "qcow2", t,
        ])?;
        chain.push(top);
    }
    Ok(chain)
}

/// qemu-storage-daemon `--blockdev`s that open `chain` (base first) node by node, each file with
/// O_DIRECT and io_uring; the top node is `q{len-1}`.
pub fn qsd_chain_nodes(chain: &[PathBuf]) -> Vec<String> {
    let mut nodes = Vec::new();
    for (i, image) in chain.iter().enumerate() {
        nodes.push(crate::server::qsd_file_node(&format!("f{i}"), image));
        let mut node = format!("driver=qcow2,node-name=q{i},file=f{i}");
        if i > 0 {
            node.push_str(&format!(",backing=q{}", i - 1));
        }
        nodes.push(node);
    }
    nodes
}
