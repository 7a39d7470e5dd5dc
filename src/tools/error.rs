//! Errors of the offline tools. Each names what it is about: a file, a block (through
//! [`PdataError`]), a device or an XML line.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

use super::xml::XmlError;
use crate::engine::pdata::PdataError;

/// What an offline tool can fail with.
#[derive(Debug, Error)]
pub enum ToolError {
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path}: in use by another process (is a thinblk daemon serving this pool?): {source}"
    )]
    Locked {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {bytes} bytes is too small to hold a metadata superblock")]
    TooSmall { path: PathBuf, bytes: u64 },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing the output: {0}")]
    Output(#[source] io::Error),
    #[error("reading the {what}: {source}")]
    Metadata {
        what: String,
        #[source]
        source: PdataError,
    },
    #[error("the superblock holds no metadata snapshot (held_root is 0)")]
    NoMetadataSnap,
    #[error("thin device {dev} is not in the device details tree")]
    NoSuchDevice { dev: u64 },
    #[error("thin device {dev} has no mapping tree")]
    NoMappingTree { dev: u64 },
    #[error("device {dev} maps block {vblock} to data block {block}, beyond the {nr_data_blocks} data blocks")]
    DataBlockOutOfRange {
        dev: u64,
        vblock: u64,
        block: u64,
        nr_data_blocks: u64,
    },
    #[error("{path}: {source}")]
    Xml {
        path: PathBuf,
        #[source]
        source: XmlError,
    },
    #[error("unknown field {0:?} (see --help for the list)")]
    UnknownField(String),
    #[error("the metadata device has {available} blocks; the input needs about {needed}: give a larger --metadata-size or output")]
    MetadataTooSmall { available: u64, needed: u64 },
    #[error("--metadata-size {bytes} is outside 4 KiB ..= {max} bytes")]
    BadMetadataSize { bytes: u64, max: u64 },
    #[error("{path}: cannot shrink an existing file from {from} to {to} bytes")]
    WouldShrink { path: PathBuf, from: u64, to: u64 },
    #[error("writing the pool: {0}")]
    Write(#[source] PdataError),
    #[error("restoring the pool: {0}")]
    Restore(#[source] crate::engine::thin::ThinError),
    #[error("the metadata check found {problems} problem(s)")]
    CheckFailed { problems: usize },
    #[error("the needs_check flag is set (run with --clear-needs-check to clear it once the pool checks clean)")]
    NeedsCheck,
}

impl ToolError {
    /// Wraps a persistent-data error with what was being read.
    pub fn metadata(what: impl Into<String>) -> impl FnOnce(PdataError) -> ToolError {
        let what = what.into();
        move |source| ToolError::Metadata { what, source }
    }
}

pub type Result<T, E = ToolError> = std::result::Result<T, E>;
