//! A strict reader of the XML `thin_dump` writes:
//!
//! ```text
//! <superblock uuid="" time="1" transaction="2" flags="0" version="2" data_block_size="128" nr_data_blocks="1024">
//!   <device dev_id="1" mapped_blocks="17" transaction="0" creation_time="0" snap_time="1">
//!     <range_mapping origin_begin="0" data_begin="0" length="5" time="0"/>
//!     <single_mapping origin_block="5" data_block="48" time="1"/>
//!   </device>
//! </superblock>
//! ```
//!
//! [`Reader`] yields validated [`Event`]s one at a time, so a restore holds no more than
//! the input. Everything a stranger could get wrong is an [`XmlError`] naming the line:
//! syntax, unknown or misplaced elements and attributes, numbers out of range, devices
//! given twice, mappings out of order or overlapping, data blocks beyond `nr_data_blocks`,
//! times wider than 24 bits. Comments and a leading `<?xml ...?>` are allowed; DOCTYPE and
//! CDATA are not. Nothing here panics or allocates more than the input's size.

use std::collections::{BTreeSet, VecDeque};

use thiserror::Error;

pub use lexer::escape_attr;
use lexer::{Lexer, Tag, TagKind};

use crate::engine::pdata::values::{BlockTime, DeviceDetails, TIME_BITS};
use crate::tools::model::{DeviceContents, PoolContents};

/// A problem with the XML, at a line (1-based).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("line {line}: {kind}")]
pub struct XmlError {
    pub line: usize,
    pub kind: XmlErrorKind,
}

/// What was wrong.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum XmlErrorKind {
    #[error("unexpected end of input {0}")]
    UnexpectedEof(&'static str),
    #[error("{0}")]
    Syntax(&'static str),
    #[error("attribute value is not UTF-8")]
    NotUtf8,
    #[error("unknown entity &{0};")]
    BadEntity(String),
    #[error("text {0:?} outside any element's attributes")]
    Text(String),
    #[error("unknown element <{0}>")]
    UnknownElement(String),
    #[error("<{found}> is not allowed {place}")]
    Misplaced { found: String, place: &'static str },
    #[error("</{found}> does not close <{open}>")]
    MismatchedClose { found: String, open: &'static str },
    #[error("</{0}> closes nothing")]
    UnexpectedClose(String),
    #[error("<{element}> lacks the {attr} attribute")]
    MissingAttribute {
        element: &'static str,
        attr: &'static str,
    },
    #[error("<{element}> has an unknown attribute {attr}")]
    UnknownAttribute { element: &'static str, attr: String },
    #[error("attribute {0} is given twice")]
    DuplicateAttribute(String),
    #[error("{attr}={value:?} is not a whole number in 0..={max}")]
    BadNumber {
        attr: &'static str,
        value: String,
        max: u64,
    },
    #[error("no <superblock> element")]
    NoSuperblock,
    #[error("content after </superblock>")]
    TrailingContent,
    #[error("device {0} appears twice")]
    DuplicateDevice(u64),
    #[error("device id {0} is above the kernel's limit of 16777215")]
    DevIdTooLarge(u64),
    #[error("mapping of block {vblock} comes before the end ({prev_end}) of the previous one: mappings must be in increasing order without overlap")]
    OutOfOrder { vblock: u64, prev_end: u64 },
    #[error("a range_mapping of length 0")]
    ZeroLength,
    #[error("range {begin} + {length} overflows")]
    Overflow { begin: u64, length: u64 },
    #[error("data blocks {begin}..{end} are beyond nr_data_blocks={nr_data_blocks}")]
    DataOutOfRange {
        begin: u64,
        end: u64,
        nr_data_blocks: u64,
    },
    #[error("time {0} does not fit in 24 bits")]
    TimeTooLarge(u32),
    #[error("data_block_size {0} is not a multiple of 128 sectors in 128..=2097152")]
    BadDataBlockSize(u32),
    #[error("version {0} is not 1 or 2")]
    BadVersion(u32),
    #[error("uuid is longer than 16 bytes")]
    UuidTooLong,
}

/// The `<superblock>` element's attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuperblockAttrs {
    /// At most 16 bytes.
    pub uuid: String,
    pub time: u32,
    pub transaction: u64,
    pub flags: u32,
    pub version: u32,
    pub data_block_size: u32,
    pub nr_data_blocks: u64,
}

/// A run of mappings: `length` consecutive virtual blocks to consecutive data blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub origin_begin: u64,
    pub data_begin: u64,
    pub length: u64,
    pub time: u32,
}

impl Run {
    /// The run's mappings.
    pub fn mappings(&self) -> impl Iterator<Item = (u64, BlockTime)> + '_ {
        (0..self.length).map(move |i| {
            (
                self.origin_begin.saturating_add(i),
                BlockTime {
                    block: self.data_begin.saturating_add(i),
                    time: self.time,
                },
            )
        })
    }
}

/// One validated piece of the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Superblock(SuperblockAttrs),
    /// A device; `details.mapped_blocks` is what the XML says, which may not be the count.
    Device {
        dev: u64,
        details: DeviceDetails,
    },
    Mapping(Run),
    DeviceEnd,
    SuperblockEnd,
}

const MAX_DEV_ID: u64 = (1 << 24) - 1;
const MAX_TIME: u32 = (1 << TIME_BITS) - 1;

mod lexer;

// ---------------------------------------------------------------- attributes

struct Attrs<'a> {
    element: &'static str,
    line: usize,
    list: Vec<(&'a str, String)>,
}

trait Number: Sized + Copy {
    const MAX: u64;
    fn from_u64(v: u64) -> Option<Self>;
}

impl Number for u64 {
    const MAX: u64 = u64::MAX;
    fn from_u64(v: u64) -> Option<Self> {
        Some(v)
    }
}

impl Number for u32 {
    const MAX: u64 = u32::MAX as u64;
    fn from_u64(v: u64) -> Option<Self> {
        u32::try_from(v).ok()
    }
}

impl<'a> Attrs<'a> {
    fn err(&self, kind: XmlErrorKind) -> XmlError {
        XmlError {
            line: self.line,
            kind,
        }
    }

    fn take_str(&mut self, attr: &'static str) -> Option<String> {
        let i = self.list.iter().position(|(a, _)| *a == attr)?;
        Some(self.list.swap_remove(i).1)
    }

    fn opt<T: Number>(&mut self, attr: &'static str) -> Result<Option<T>, XmlError> {
        let Some(value) = self.take_str(attr) else {
            return Ok(None);
        };
        let parsed = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
            value.parse::<u64>().ok().and_then(T::from_u64)
        } else {
            None
        };
        match parsed {
            Some(v) => Ok(Some(v)),
            None => Err(self.err(XmlErrorKind::BadNumber {
                attr,
                value: value.chars().take(40).collect(),
                max: T::MAX,
            })),
        }
    }

    fn req<T: Number>(&mut self, attr: &'static str) -> Result<T, XmlError> {
        let element = self.element;
        self.opt(attr)?
            .ok_or_else(|| self.err(XmlErrorKind::MissingAttribute { element, attr }))
    }

    /// Fails on any attribute not taken.
    fn finish(self) -> Result<(), XmlError> {
        match self.list.first() {
            Some((a, _)) => Err(self.err(XmlErrorKind::UnknownAttribute {
                element: self.element,
                attr: a.to_string(),
            })),
            None => Ok(()),
        }
    }
}

// ---------------------------------------------------------------- reader

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    InSuperblock,
    InDevice,
    Done,
}

/// Reads events from a document held in memory.
pub struct Reader<'a> {
    lex: Lexer<'a>,
    state: State,
    queued: VecDeque<(usize, Event)>,
    /// A non-empty mapping element waits for its closing tag.
    pending_close: Option<&'static str>,
    nr_data_blocks: u64,
    devices: BTreeSet<u64>,
    /// End of the last mapping of the current device.
    next_free: Option<u64>,
}

impl<'a> Reader<'a> {
    pub fn new(src: &'a [u8]) -> Reader<'a> {
        Reader {
            lex: Lexer::new(src),
            state: State::Start,
            queued: VecDeque::new(),
            pending_close: None,
            nr_data_blocks: 0,
            devices: BTreeSet::new(),
            next_free: None,
        }
    }

    /// The next event and the line it starts on; `None` after `</superblock>` and the end.
    pub fn next_event(&mut self) -> Result<Option<(usize, Event)>, XmlError> {
        loop {
            if let Some(e) = self.queued.pop_front() {
                return Ok(Some(e));
            }
            let Some(tag) = self.lex.next()? else {
                return match self.state {
                    State::Done => Ok(None),
                    State::Start => Err(self.lex.err(XmlErrorKind::NoSuperblock)),
                    State::InSuperblock => Err(self
                        .lex
                        .err(XmlErrorKind::UnexpectedEof("inside <superblock>"))),
                    State::InDevice => {
                        Err(self.lex.err(XmlErrorKind::UnexpectedEof("inside <device>")))
                    }
                };
            };
            self.tag(tag)?;
        }
    }

    fn tag(&mut self, tag: Tag<'a>) -> Result<(), XmlError> {
        let line = tag.line;
        let err = |kind| XmlError { line, kind };
        if let Some(open) = self.pending_close.take() {
            return match tag.kind {
                TagKind::Close { name } if name == open => Ok(()),
                TagKind::Close { name } => Err(err(XmlErrorKind::MismatchedClose {
                    found: name.to_string(),
                    open,
                })),
                TagKind::Open { name, .. } => Err(err(XmlErrorKind::Misplaced {
                    found: name.to_string(),
                    place: "inside a mapping",
                })),
            };
        }
        match (self.state, tag.kind) {
            (State::Done, _) => Err(err(XmlErrorKind::TrailingContent)),
            (state, TagKind::Open { name, attrs, empty }) => {
                let known = ["superblock", "device", "range_mapping", "single_mapping"];
                let Some(&element) = known.iter().find(|&&k| k == name) else {
                    return Err(err(XmlErrorKind::UnknownElement(
                        name.chars().take(40).collect(),
                    )));
                };
                let attrs = Attrs {
                    element,
                    line,
                    list: attrs,
                };
                match (state, element) {
                    (State::Start, "superblock") => self.superblock(attrs, empty),
                    (State::InSuperblock, "device") => self.device(attrs, empty),
                    (State::InDevice, "range_mapping" | "single_mapping") => {
                        if !empty {
                            self.pending_close = Some(element);
                        }
                        self.mapping(attrs)
                    }
                    (State::Start, _) => Err(err(XmlErrorKind::Misplaced {
                        found: name.to_string(),
                        place: "as the document element (expected <superblock>)",
                    })),
                    (State::InSuperblock, _) => Err(err(XmlErrorKind::Misplaced {
                        found: name.to_string(),
                        place: "directly inside <superblock>",
                    })),
                    _ => Err(err(XmlErrorKind::Misplaced {
                        found: name.to_string(),
                        place: "inside <device>",
                    })),
                }
            }
            (State::InSuperblock, TagKind::Close { name: "superblock" }) => {
                self.state = State::Done;
                self.queued.push_back((line, Event::SuperblockEnd));
                Ok(())
            }
            (State::InDevice, TagKind::Close { name: "device" }) => {
                self.state = State::InSuperblock;
                self.queued.push_back((line, Event::DeviceEnd));
                Ok(())
            }
            (State::InSuperblock, TagKind::Close { name }) => {
                Err(err(XmlErrorKind::MismatchedClose {
                    found: name.to_string(),
                    open: "superblock",
                }))
            }
            (State::InDevice, TagKind::Close { name }) => Err(err(XmlErrorKind::MismatchedClose {
                found: name.to_string(),
                open: "device",
            })),
            (State::Start, TagKind::Close { name }) => {
                Err(err(XmlErrorKind::UnexpectedClose(name.to_string())))
            }
        }
    }

    fn superblock(&mut self, mut a: Attrs<'a>, empty: bool) -> Result<(), XmlError> {
        let line = a.line;
        let uuid = a.take_str("uuid").unwrap_or_default();
        if uuid.len() > 16 {
            return Err(a.err(XmlErrorKind::UuidTooLong));
        }
        let sb = SuperblockAttrs {
            uuid,
            time: a.req("time")?,
            transaction: a.req("transaction")?,
            flags: a.opt("flags")?.unwrap_or(0),
            version: a.opt("version")?.unwrap_or(2),
            data_block_size: a.req("data_block_size")?,
            nr_data_blocks: a.req("nr_data_blocks")?,
        };
        if !(1..=2).contains(&sb.version) {
            return Err(a.err(XmlErrorKind::BadVersion(sb.version)));
        }
        let dbs = sb.data_block_size;
        if !crate::tools::data_block_size_ok(dbs) {
            return Err(a.err(XmlErrorKind::BadDataBlockSize(dbs)));
        }
        a.finish()?;
        self.nr_data_blocks = sb.nr_data_blocks;
        self.queued.push_back((line, Event::Superblock(sb)));
        if empty {
            self.state = State::Done;
            self.queued.push_back((line, Event::SuperblockEnd));
        } else {
            self.state = State::InSuperblock;
        }
        Ok(())
    }

    fn device(&mut self, mut a: Attrs<'a>, empty: bool) -> Result<(), XmlError> {
        let line = a.line;
        let dev: u64 = a.req("dev_id")?;
        let details = DeviceDetails {
            mapped_blocks: a.req("mapped_blocks")?,
            transaction_id: a.req("transaction")?,
            creation_time: a.req("creation_time")?,
            snapshotted_time: a.req("snap_time")?,
        };
        a.finish()?;
        if dev > MAX_DEV_ID {
            return Err(XmlError {
                line,
                kind: XmlErrorKind::DevIdTooLarge(dev),
            });
        }
        if !self.devices.insert(dev) {
            return Err(XmlError {
                line,
                kind: XmlErrorKind::DuplicateDevice(dev),
            });
        }
        self.next_free = None;
        self.queued
            .push_back((line, Event::Device { dev, details }));
        if empty {
            self.queued.push_back((line, Event::DeviceEnd));
        } else {
            self.state = State::InDevice;
        }
        Ok(())
    }

    fn mapping(&mut self, mut a: Attrs<'a>) -> Result<(), XmlError> {
        let line = a.line;
        let run = if a.element == "range_mapping" {
            Run {
                origin_begin: a.req("origin_begin")?,
                data_begin: a.req("data_begin")?,
                length: a.req("length")?,
                time: a.req("time")?,
            }
        } else {
            Run {
                origin_begin: a.req("origin_block")?,
                data_begin: a.req("data_block")?,
                length: 1,
                time: a.req("time")?,
            }
        };
        a.finish()?;
        self.check_run(&run)
            .map_err(|kind| XmlError { line, kind })?;
        self.next_free = Some(run.origin_begin + run.length);
        self.queued.push_back((line, Event::Mapping(run)));
        Ok(())
    }

    fn check_run(&self, r: &Run) -> Result<(), XmlErrorKind> {
        if r.length == 0 {
            return Err(XmlErrorKind::ZeroLength);
        }
        let overflow = XmlErrorKind::Overflow {
            begin: r.origin_begin,
            length: r.length,
        };
        r.origin_begin.checked_add(r.length).ok_or(overflow)?;
        let data_end = r
            .data_begin
            .checked_add(r.length)
            .ok_or(XmlErrorKind::Overflow {
                begin: r.data_begin,
                length: r.length,
            })?;
        if data_end > self.nr_data_blocks {
            return Err(XmlErrorKind::DataOutOfRange {
                begin: r.data_begin,
                end: data_end,
                nr_data_blocks: self.nr_data_blocks,
            });
        }
        if r.time > MAX_TIME {
            return Err(XmlErrorKind::TimeTooLarge(r.time));
        }
        if let Some(prev_end) = self.next_free {
            if r.origin_begin < prev_end {
                return Err(XmlErrorKind::OutOfOrder {
                    vblock: r.origin_begin,
                    prev_end,
                });
            }
        }
        Ok(())
    }
}

/// What a whole document holds, without its mappings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub superblock: SuperblockAttrs,
    pub devices: u64,
    pub mappings: u64,
    pub runs: u64,
}

/// Reads the whole document, validating it, and counts what it holds.
pub fn scan(src: &[u8]) -> Result<Summary, XmlError> {
    let mut r = Reader::new(src);
    let mut sum: Option<Summary> = None;
    while let Some((_, e)) = r.next_event()? {
        match (e, sum.as_mut()) {
            (Event::Superblock(sb), _) => {
                sum = Some(Summary {
                    superblock: sb,
                    devices: 0,
                    mappings: 0,
                    runs: 0,
                })
            }
            (Event::Device { .. }, Some(s)) => s.devices += 1,
            (Event::Mapping(run), Some(s)) => {
                s.runs += 1;
                s.mappings = s.mappings.saturating_add(run.length);
            }
            _ => {}
        }
    }
    sum.ok_or(XmlError {
        line: r.lex.line,
        kind: XmlErrorKind::NoSuperblock,
    })
}

/// Reads the whole document into memory (every mapping expanded: for tests and small pools).
/// `mapped_blocks` is what the XML says.
pub fn parse(src: &[u8]) -> Result<(SuperblockAttrs, PoolContents), XmlError> {
    let mut r = Reader::new(src);
    let mut head = None;
    let mut pool = PoolContents::default();
    let mut cur: Option<(u64, DeviceContents)> = None;
    while let Some((_, e)) = r.next_event()? {
        match e {
            Event::Superblock(sb) => {
                pool.time = sb.time;
                pool.transaction = sb.transaction;
                pool.data_block_size = sb.data_block_size;
                pool.nr_data_blocks = sb.nr_data_blocks;
                head = Some(sb);
            }
            Event::Device { dev, details } => {
                cur = Some((
                    dev,
                    DeviceContents {
                        details,
                        mappings: Default::default(),
                    },
                ))
            }
            Event::Mapping(run) => {
                if let Some((_, d)) = cur.as_mut() {
                    d.mappings.extend(run.mappings());
                }
            }
            Event::DeviceEnd => {
                if let Some((dev, d)) = cur.take() {
                    pool.devices.insert(dev, d);
                }
            }
            Event::SuperblockEnd => {}
        }
    }
    let head = head.ok_or(XmlError {
        line: r.lex.line,
        kind: XmlErrorKind::NoSuperblock,
    })?;
    Ok((head, pool))
}

#[cfg(test)]
mod tests;
