//! The in-memory half of `thinblk restore`: validates a whole `thin_dump` document held in
//! memory, then writes the pool it describes into any [`BlockStore`] (a file, or a
//! [`MemStore`](crate::bufio::MemStore) for tests and the fuzzer). Opening, creating and
//! sizing files is [`super::restore`]'s business.

use std::path::Path;
use std::sync::Arc;

use crate::bufio::BlockStore;
use crate::engine::pdata::error::PdataError;
use crate::engine::pdata::space_map::bitmap::ENTRIES_PER_BITMAP;
use crate::engine::pdata::space_map::metadata::MAX_METADATA_BLOCKS;
use crate::engine::pdata::superblock::{BLOCK_SIZE, FLAG_NEEDS_CHECK, SUPERBLOCK_LOCATION};
use crate::engine::thin::{PoolMetadata, ThinError};
use crate::tools::error::{Result, ToolError};
use crate::tools::xml::{self, Event, Summary, XmlError};

/// What a restore wrote.
#[derive(Debug, Clone, Default)]
pub struct RestoreReport {
    pub devices: u64,
    pub mappings: u64,
    pub metadata_blocks: u64,
    /// Things the input said that were not kept (a `mapped_blocks` that was not the count).
    pub warnings: Vec<String>,
}

/// A document read and validated completely, so that bad input is refused before anything
/// is written.
#[derive(Debug, Clone)]
pub struct Validated<'a> {
    input: &'a [u8],
    pub summary: Summary,
    /// Metadata blocks the pool needs at least, and comfortably
    /// ([`metadata_blocks_needed`]).
    pub least: u64,
    pub comfortable: u64,
}

impl<'a> Validated<'a> {
    /// Reads and validates the whole of `input`.
    pub fn new(input: &'a [u8]) -> Result<Validated<'a>, XmlError> {
        let summary = xml::scan(input)?;
        let (least, comfortable) = metadata_blocks_needed(&summary);
        Ok(Validated {
            input,
            summary,
            least,
            comfortable,
        })
    }
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

/// Validates `input` and writes its pool into `store`, all in memory if `store` is.
/// `input_name` and `output_name` only name the two in errors.
pub fn restore_into(
    input: &[u8],
    store: Arc<dyn BlockStore>,
    input_name: &Path,
    output_name: &Path,
) -> Result<RestoreReport> {
    let doc = Validated::new(input).map_err(|source| ToolError::Xml {
        path: input_name.to_path_buf(),
        source,
    })?;
    write_pool(&doc, store, input_name, output_name)
}

/// Writes a validated document's pool into `store`, replacing whatever it held.
///
/// Block 0 is zeroed first, so a failure half-way leaves no superblock pointing at
/// half-overwritten trees. Then every device's mapping tree is built by btree inserts through
/// the transaction manager, each mapping giving its data block one reference in the data space
/// map, and the pool is committed in the kernel's order (data space map, metadata space map,
/// superblock). `mapped_blocks` is written as counted, as `thin_restore` does.
pub fn write_pool(
    doc: &Validated<'_>,
    store: Arc<dyn BlockStore>,
    input_name: &Path,
    output_name: &Path,
) -> Result<RestoreReport> {
    let available = store.nr_blocks().min(MAX_METADATA_BLOCKS);
    if available < doc.least {
        return Err(ToolError::MetadataTooSmall {
            available,
            needed: doc.least,
        });
    }
    store
        .write_block(SUPERBLOCK_LOCATION, &[0u8; BLOCK_SIZE])
        .and_then(|()| store.flush())
        .map_err(|source| ToolError::Io {
            path: output_name.to_path_buf(),
            source,
        })?;
    let bm = super::super::block_manager(store);
    let no_space = |e: ThinError| match e {
        ThinError::NoMetadataSpace | ThinError::Pdata(PdataError::NoSpace(_)) => {
            ToolError::MetadataTooSmall {
                available,
                needed: doc.comfortable,
            }
        }
        ThinError::Pdata(e) => ToolError::Write(e),
        e => ToolError::Restore(e),
    };
    let sb = &doc.summary.superblock;
    let mut meta = PoolMetadata::format(bm.cache().clone(), sb.data_block_size, sb.nr_data_blocks)
        .map_err(no_space)?;
    let mut report = write_devices(&mut meta, doc.input).map_err(|e| match e {
        WriteError::Xml(source) => ToolError::Xml {
            path: input_name.to_path_buf(),
            source,
        },
        WriteError::Thin(e) => no_space(e),
    })?;
    let mut uuid = [0u8; 16];
    for (d, s) in uuid.iter_mut().zip(sb.uuid.bytes()) {
        *d = s;
    }
    if sb.flags & !FLAG_NEEDS_CHECK != 0 {
        report.warnings.push(format!(
            "superblock flags=\"{}\" has bits other than needs_check ({FLAG_NEEDS_CHECK}); writing {}",
            sb.flags,
            sb.flags & FLAG_NEEDS_CHECK
        ));
    }
    meta.restore_header(uuid, sb.flags, sb.version, sb.time, sb.transaction);
    meta.commit().map_err(no_space)?;
    report.metadata_blocks = available;
    Ok(report)
}

enum WriteError {
    Xml(XmlError),
    Thin(ThinError),
}

impl From<XmlError> for WriteError {
    fn from(e: XmlError) -> Self {
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
