//! `thinblk dump`: the pool's devices and mappings, streamed to a [`DumpSink`] in the order
//! `thin_dump` 0.9 prints them: devices by id, each device's mappings by virtual block,
//! consecutive blocks that map to consecutive data blocks with the same time merged into
//! one run.

use std::io::{self, Write};

use super::error::{Result, ToolError};
use super::xml::Run;
use crate::engine::pdata::btree;
use crate::engine::pdata::superblock::Superblock;
use crate::engine::pdata::tm::BlockSource;
use crate::engine::pdata::values::{BlockTime, DeviceDetails};

/// The pool-wide attributes a dump starts with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub time: u32,
    pub transaction: u64,
    pub flags: u32,
    pub version: u32,
    pub data_block_size: u32,
    pub nr_data_blocks: u64,
}

impl Header {
    pub fn of(sb: &Superblock) -> Header {
        Header {
            time: sb.time,
            transaction: sb.trans_id,
            flags: sb.flags,
            version: sb.version,
            data_block_size: sb.data_block_size,
            nr_data_blocks: sb.data_sm_root.nr_blocks,
        }
    }
}

/// Where a dump goes, piece by piece.
pub trait DumpSink {
    fn begin_superblock(&mut self, h: &Header) -> io::Result<()>;
    fn begin_device(&mut self, dev: u64, d: &DeviceDetails) -> io::Result<()>;
    fn run(&mut self, r: &Run) -> io::Result<()>;
    fn end_device(&mut self) -> io::Result<()>;
    fn end_superblock(&mut self) -> io::Result<()>;
}

/// Merges mappings, given in increasing block order, into runs.
#[derive(Debug, Default)]
pub struct RunBuilder {
    cur: Option<Run>,
}

impl RunBuilder {
    /// Adds a mapping; returns the run it ended, if any.
    pub fn push(&mut self, vblock: u64, v: BlockTime) -> Option<Run> {
        if let Some(r) = self.cur.as_mut() {
            let extends = r.origin_begin.checked_add(r.length) == Some(vblock)
                && r.data_begin.checked_add(r.length) == Some(v.block)
                && r.time == v.time;
            if extends {
                r.length += 1;
                return None;
            }
        }
        self.cur.replace(Run {
            origin_begin: vblock,
            data_begin: v.block,
            length: 1,
            time: v.time,
        })
    }

    /// The last run.
    pub fn finish(&mut self) -> Option<Run> {
        self.cur.take()
    }
}

/// Every device's details, in id order.
pub fn devices<S: BlockSource + ?Sized>(
    src: &S,
    sb: &Superblock,
) -> Result<Vec<(u64, DeviceDetails)>> {
    let mut out = Vec::new();
    btree::walk::<DeviceDetails, S, _>(src, sb.device_details_root, 0, |dev, d| {
        out.push((dev, d));
        Ok(true)
    })
    .map_err(ToolError::metadata("device details tree"))?;
    Ok(out)
}

/// The root of device `dev`'s mapping tree.
pub fn mapping_root<S: BlockSource + ?Sized>(src: &S, sb: &Superblock, dev: u64) -> Result<u64> {
    btree::lookup::<u64, S>(src, sb.data_mapping_root, dev)
        .map_err(ToolError::metadata("top level of the mapping tree"))?
        .ok_or(ToolError::NoMappingTree { dev })
}

/// Calls `f` with every mapping of `dev` in block order.
pub fn for_each_mapping<S, F>(src: &S, sb: &Superblock, dev: u64, mut f: F) -> Result<()>
where
    S: BlockSource + ?Sized,
    F: FnMut(u64, BlockTime) -> Result<()>,
{
    let root = mapping_root(src, sb, dev)?;
    let mut failure = None;
    btree::walk::<BlockTime, S, _>(src, root, 0, |k, v| match f(k, v) {
        Ok(()) => Ok(true),
        Err(e) => {
            failure = Some(e);
            Ok(false)
        }
    })
    .map_err(ToolError::metadata(format!("mapping tree of device {dev}")))?;
    failure.map_or(Ok(()), Err)
}

/// Streams the pool whose roots `sb` holds into `sink`.
pub fn dump<S: BlockSource + ?Sized>(
    src: &S,
    sb: &Superblock,
    sink: &mut dyn DumpSink,
) -> Result<()> {
    sink.begin_superblock(&Header::of(sb))
        .map_err(ToolError::Output)?;
    for (dev, details) in devices(src, sb)? {
        sink.begin_device(dev, &details)
            .map_err(ToolError::Output)?;
        let mut runs = RunBuilder::default();
        for_each_mapping(src, sb, dev, |k, v| match runs.push(k, v) {
            Some(r) => sink.run(&r).map_err(ToolError::Output),
            None => Ok(()),
        })?;
        if let Some(r) = runs.finish() {
            sink.run(&r).map_err(ToolError::Output)?;
        }
        sink.end_device().map_err(ToolError::Output)?;
    }
    sink.end_superblock().map_err(ToolError::Output)
}

/// Writes the XML `thin_dump` 0.9 writes. Like it, prints an empty uuid.
pub struct XmlWriter<W: Write> {
    out: W,
}

impl<W: Write> XmlWriter<W> {
    pub fn new(out: W) -> Self {
        XmlWriter { out }
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

impl<W: Write> DumpSink for XmlWriter<W> {
    fn begin_superblock(&mut self, h: &Header) -> io::Result<()> {
        writeln!(
            self.out,
            "<superblock uuid=\"\" time=\"{}\" transaction=\"{}\" flags=\"{}\" version=\"{}\" data_block_size=\"{}\" nr_data_blocks=\"{}\">",
            h.time, h.transaction, h.flags, h.version, h.data_block_size, h.nr_data_blocks
        )
    }

    fn begin_device(&mut self, dev: u64, d: &DeviceDetails) -> io::Result<()> {
        writeln!(
            self.out,
            "  <device dev_id=\"{dev}\" mapped_blocks=\"{}\" transaction=\"{}\" creation_time=\"{}\" snap_time=\"{}\">",
            d.mapped_blocks, d.transaction_id, d.creation_time, d.snapshotted_time
        )
    }

    fn run(&mut self, r: &Run) -> io::Result<()> {
        if r.length == 1 {
            writeln!(
                self.out,
                "    <single_mapping origin_block=\"{}\" data_block=\"{}\" time=\"{}\"/>",
                r.origin_begin, r.data_begin, r.time
            )
        } else {
            writeln!(
                self.out,
                "    <range_mapping origin_begin=\"{}\" data_begin=\"{}\" length=\"{}\" time=\"{}\"/>",
                r.origin_begin, r.data_begin, r.length, r.time
            )
        }
    }

    fn end_device(&mut self) -> io::Result<()> {
        writeln!(self.out, "  </device>")
    }

    fn end_superblock(&mut self) -> io::Result<()> {
        writeln!(self.out, "</superblock>")?;
        self.out.flush()
    }
}
