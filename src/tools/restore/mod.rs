//! `thinblk restore`: writes a pool from `thin_dump` XML into a metadata file.
//!
//! This half opens, creates and sizes the output; validating the input and writing the pool
//! is [`write`], which works on any block store (the fuzzer's is in memory). The input is
//! read and validated completely before the output is opened, so bad input never touches it.

pub mod write;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use write::{metadata_blocks_needed, restore_into, write_pool, RestoreReport, Validated};

use super::error::{Result, ToolError};
use crate::bufio::{BlockStore, FileStore};
use crate::engine::pdata::space_map::metadata::MAX_METADATA_BLOCKS;
use crate::engine::pdata::superblock::BLOCK_SIZE;

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
    let doc = Validated::new(&input).map_err(|source| ToolError::Xml {
        path: opts.input.clone(),
        source,
    })?;
    if doc.least > MAX_METADATA_BLOCKS {
        return Err(ToolError::MetadataTooSmall {
            available: MAX_METADATA_BLOCKS,
            needed: doc.least,
        });
    }
    let created = !opts.output.exists();
    let store = open_output(opts, doc.comfortable)?;
    let result = write_pool(&doc, Arc::new(store), &opts.input, &opts.output);
    if result.is_err() && created {
        // Best effort: a half-written new file is worth nothing.
        let _ = std::fs::remove_file(&opts.output);
    }
    result
}
