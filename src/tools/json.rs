//! `thinblk dump --format json`: the structure of the XML as JSON, streamed.
//!
//! ```text
//! {"superblock": {"uuid": "", "time": 1, "transaction": 2, "flags": 0, "version": 2,
//!   "data_block_size": 128, "nr_data_blocks": 1024, "devices": [
//!     {"dev_id": 1, "mapped_blocks": 17, "transaction": 0, "creation_time": 0, "snap_time": 1,
//!      "mappings": [{"origin_begin": 0, "data_begin": 0, "length": 5, "time": 0}, ...]}]}}
//! ```
//!
//! Every mapping is a run (a `single_mapping` is a run of length 1).

use std::io::{self, Write};

use super::dump::{DumpSink, Header};
use super::xml::Run;
use crate::engine::pdata::values::DeviceDetails;

/// Writes the dump as JSON, one mapping per line.
pub struct JsonWriter<W: Write> {
    out: W,
    first_device: bool,
    first_run: bool,
}

impl<W: Write> JsonWriter<W> {
    pub fn new(out: W) -> Self {
        JsonWriter {
            out,
            first_device: true,
            first_run: true,
        }
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

impl<W: Write> DumpSink for JsonWriter<W> {
    fn begin_superblock(&mut self, h: &Header) -> io::Result<()> {
        write!(
            self.out,
            "{{\n  \"superblock\": {{\n    \"uuid\": \"\",\n    \"time\": {},\n    \"transaction\": {},\n    \"flags\": {},\n    \"version\": {},\n    \"data_block_size\": {},\n    \"nr_data_blocks\": {},\n    \"devices\": [",
            h.time, h.transaction, h.flags, h.version, h.data_block_size, h.nr_data_blocks
        )
    }

    fn begin_device(&mut self, dev: u64, d: &DeviceDetails) -> io::Result<()> {
        let sep = if self.first_device { "" } else { "," };
        self.first_device = false;
        self.first_run = true;
        write!(
            self.out,
            "{sep}\n      {{\n        \"dev_id\": {dev},\n        \"mapped_blocks\": {},\n        \"transaction\": {},\n        \"creation_time\": {},\n        \"snap_time\": {},\n        \"mappings\": [",
            d.mapped_blocks, d.transaction_id, d.creation_time, d.snapshotted_time
        )
    }

    fn run(&mut self, r: &Run) -> io::Result<()> {
        let sep = if self.first_run { "" } else { "," };
        self.first_run = false;
        write!(
            self.out,
            "{sep}\n          {{\"origin_begin\": {}, \"data_begin\": {}, \"length\": {}, \"time\": {}}}",
            r.origin_begin, r.data_begin, r.length, r.time
        )
    }

    fn end_device(&mut self) -> io::Result<()> {
        if self.first_run {
            write!(self.out, "]\n      }}")
        } else {
            write!(self.out, "\n        ]\n      }}")
        }
    }

    fn end_superblock(&mut self) -> io::Result<()> {
        if self.first_device {
            writeln!(self.out, "]\n  }}\n}}")?;
        } else {
            writeln!(self.out, "\n    ]\n  }}\n}}")?;
        }
        self.out.flush()
    }
}
