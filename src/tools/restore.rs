//! `thinblk restore`: writes a pool from `thin_dump` XML.
//!
//! The input is read and validated completely first ([`xml::scan`]), so bad input never
//! touches the output. Then block 0 of the output is zeroed (a failure half-way leaves no
//! superblock pointing at half-overwritten trees), every device's mapping tree is built by
//! btree inserts through the transaction manager, each mapping giving its data block one
//! reference in the data space map, the device details and top-level mapping trees are
//! filled, and the pool is committed in the kernel's order (data space map, metadata space
//! map, superblock). `mapped_blocks` is written as counted, as `thin_restore` does.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::{Result, ToolError};
use super::xml::{self, Event, Summary};
use crate::bufio::{BlockStore, FileStore};
use crate::engine::pdata::error::PdataError;
use crate::engine::pdata::space_map::bitmap::ENTRIES_PER_BITMAP;
use crate::engine::pdata::space_map::metadata::MAX_METADATA_BLOCKS;
use crate::engine::pdata::superblock::{BLOCK_SIZE, SUPERBLOCK_LOCATION};
use crate::engine::thin::{PoolMetadata, ThinError};

/// Smallest metadata device created by default (4 MiB, like the fixtures).
const MIN_DEFAULT_BLOCKS: u64 = 1024;

/// What to restore where.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub input: PathBuf,
    pub output: PathBuf,
    /// Size of the output in bytes: of a new file, or to grow an existing one to.
    pub metadata_size: Option<u64>,
}

/// What a restore wrote.
#[derive(Debug, Clone, Default)]
pub struct RestoreReport {
    pub devices: u64,
    pub mappings: u64,
    pub metadata_blocks: u64,
    /// Things the input said that were not kept (a `mapped_blocks` that was not the count).
    pub warnings: Vec<String>,
}

/// Metadata blocks a pool needs: `(at least, comfortably)`.
///
/// At least: full leaves of mappings (252 per 4 KiB node), device trees, one bitmap per
/// 16320 data blocks and the index over them, and a few fixed blocks (superblock,
/// space-map index, empty ref-count trees). Comfortably: leaves filled by sequential
/// inserts end up about half full, internal nodes, a ref-count tree entry for every data
/// block shared three or more times, metadata bitmaps, and a quarter more.
pub fn metadata_blocks_needed(s: &Summary) -> (u64, u64) {
    let nodes = |n: u64, per_node: u64| n.div_ceil(per_node);
    let bitmaps = s.superblock.nr_data_blocks.div_ceil(ENTRIES_PER_BITMAP);
    let fixed = 16;
    let least =
        fixed + nodes(s.mappings, 252) + nodes(s.devices, 126) + bitmaps + nodes(bitmaps, 252);
    let leaves = nodes(s.mappings, 126) + s.devices;
    let used = fixed
        + leaves
        + nodes(leaves, 60)
        + 2 * nodes(s.devices, 42)
        + bitmaps
        + nodes(bitmaps, 60)
        + nodes(s.mappings / 3, 112);
    let with_bitmaps = used + nodes(used, ENTRIES_PER_BITMAP);
    (least, with_bitmaps.saturating_mul(5) / 4 + 64)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ToolError + '_ {
    move |source| ToolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Opens (growing it if asked) or creates the output, locked exclusively.
fn open_output(opts: &RestoreOptions, default_blocks: u64) -> Result<FileStore> {
    let path = opts.output.as_path();
    let max = MAX_METADATA_BLOCKS * BLOCK_SIZE as u64;
    let wanted = match opts.metadata_size {
        Some(bytes) if !(BLOCK_SIZE as u64..=max).contains(&bytes) => {
            return Err(ToolError::BadMetadataSize { bytes, max })
        }
        Some(bytes) => Some(bytes / BLOCK_SIZE as u64),
        None => None,
    };
    let store = if path.exists() {
        let store = FileStore::open(path, BLOCK_SIZE).map_err(|source| ToolError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        lock(&store, path)?;
        if let Some(blocks) = wanted {
            let now = store.nr_blocks();
            if blocks < now {
                return Err(ToolError::WouldShrink {
                    path: path.to_path_buf(),
                    from: now * BLOCK_SIZE as u64,
                    to: blocks * BLOCK_SIZE as u64,
                });
            }
            store.resize(blocks).map_err(io_err(path))?;
        }
        store
    } else {
        let blocks =
            wanted.unwrap_or(default_blocks.clamp(MIN_DEFAULT_BLOCKS, MAX_METADATA_BLOCKS));
        let store = FileStore::create(path, BLOCK_SIZE, blocks).map_err(io_err(path))?;
        lock(&store, path)?;
        store
    };
    Ok(store)
}

fn lock(store: &FileStore, path: &Path) -> Result<()> {
    store.lock_exclusive().map_err(|source| ToolError::Locked {
        path: path.to_path_buf(),
        source,
    })
}

/// Restores `opts.input` into `opts.output`.
pub fn restore(opts: &RestoreOptions) -> Result<RestoreReport> {
    let input = std::fs::read(&opts.input).map_err(io_err(&opts.input))?;
    let xml_err = |source| ToolError::Xml {
        path: opts.input.clone(),
        source,
    };
    let summary = xml::scan(&input).map_err(xml_err)?;
    let (least, comfortable) = metadata_blocks_needed(&summary);
    if least > MAX_METADATA_BLOCKS {
        return Err(ToolError::MetadataTooSmall {
            available: MAX_METADATA_BLOCKS,
            needed: least,
        });
    }
    let created = !opts.output.exists();
    let store = open_output(opts, comfortable)?;
    let result = write_pool(opts, &summary, &input, store, (least, comfortable));
    if result.is_err() && created {
        // Best effort: a half-written new file is worth nothing.
        let _ = std::fs::remove_file(&opts.output);
    }
    result
}

/// Writes the pool into the opened output.
fn write_pool(
    opts: &RestoreOptions,
    summary: &Summary,
    input: &[u8],
    store: FileStore,
    (least, comfortable): (u64, u64),
) -> Result<RestoreReport> {
    let xml_err = |source| ToolError::Xml {
        path: opts.input.clone(),
        source,
    };
    let available = store.nr_blocks().min(MAX_METADATA_BLOCKS);
    if available < least {
        return Err(ToolError::MetadataTooSmall {
            available,
            needed: least,
        });
    }
    let out = opts.output.as_path();
    store
        .write_block(SUPERBLOCK_LOCATION, &[0u8; BLOCK_SIZE])
        .and_then(|()| store.flush())
        .map_err(io_err(out))?;
    let store: Arc<dyn BlockStore> = Arc::new(store);
    let bm = super::block_manager(store);
    let no_space = |e: ThinError| match e {
        ThinError::NoMetadataSpace | ThinError::Pdata(PdataError::NoSpace(_)) => {
            ToolError::MetadataTooSmall {
                available,
                needed: comfortable,
            }
        }
        ThinError::Pdata(e) => ToolError::Write(e),
        e => ToolError::Restore(e),
    };
    let sb = &summary.superblock;
    let mut meta = PoolMetadata::format(bm.cache().clone(), sb.data_block_size, sb.nr_data_blocks)
        .map_err(no_space)?;
    let mut report = write_devices(&mut meta, input).map_err(|e| match e {
        WriteError::Xml(e) => xml_err(e),
        WriteError::Thin(e) => no_space(e),
    })?;
    let mut uuid = [0u8; 16];
    for (d, s) in uuid.iter_mut().zip(sb.uuid.bytes()) {
        *d = s;
    }
    meta.restore_header(uuid, sb.flags, sb.version, sb.time, sb.transaction);
    meta.commit().map_err(no_space)?;
    report.metadata_blocks = available;
    Ok(report)
}

enum WriteError {
    Xml(xml::XmlError),
    Thin(ThinError),
}

impl From<xml::XmlError> for WriteError {
    fn from(e: xml::XmlError) -> Self {
        WriteError::Xml(e)
    }
}

impl From<ThinError> for WriteError {
    fn from(e: ThinError) -> Self {
        WriteError::Thin(e)
    }
}

/// Second pass over the (already validated) input: builds every device.
fn write_devices(meta: &mut PoolMetadata, input: &[u8]) -> Result<RestoreReport, WriteError> {
    let mut report = RestoreReport::default();
    let mut reader = xml::Reader::new(input);
    let mut cur = None;
    while let Some((line, e)) = reader.next_event()? {
        match e {
            Event::Device { dev, details } => {
                meta.restore_device(dev, details)?;
                cur = Some((line, dev, details));
            }
            Event::Mapping(run) => {
                if let Some((_, dev, _)) = cur {
                    for (k, v) in run.mappings() {
                        meta.restore_mapping(dev, k, v)?;
                    }
                }
            }
            Event::DeviceEnd => {
                if let Some((line, dev, details)) = cur.take() {
                    let count = meta.mapped_count(dev)?;
                    if details.mapped_blocks != count {
                        report.warnings.push(format!(
                            "line {line}: device {dev} says mapped_blocks=\"{}\" but has {count} mappings; writing {count}",
                            details.mapped_blocks
                        ));
                    }
                    report.devices += 1;
                    report.mappings += count;
                }
            }
            Event::Superblock(_) | Event::SuperblockEnd => {}
        }
    }
    Ok(report)
}
