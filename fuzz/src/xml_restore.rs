//! XML restore: `tools::restore::Validated::new` reads and validates a `thin_dump` document,
//! then `tools::restore::write_pool` writes its pool into a small memory store. Bad input
//! must be an error, never a panic, a hang or a huge allocation; a document that validates
//! must either be written or be refused as too large for the store. What was written must
//! pass `thinblk check` (reopened through a fresh cache) without a problem, and dump back to
//! the document: the same devices, details and mappings (`mapped_blocks` as counted), the
//! same superblock fields.
//!
//! Input: the document itself.

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;

use thinblk::bufio::{BlockStore, MemStore};
use thinblk::engine::pdata::superblock::{BLOCK_SIZE, FLAG_NEEDS_CHECK, SUPERBLOCK_LOCATION};
use thinblk::tools::check::{check_metadata, CheckOptions};
use thinblk::tools::dump::{dump, XmlWriter};
use thinblk::tools::restore::{write_pool, RestoreReport, Validated};
use thinblk::tools::xml::{self, SuperblockAttrs};
use thinblk::tools::{block_manager, read_superblock, ToolError};

/// Metadata blocks of the output (256 KiB). Small, so that documents the store can hold stay
/// cheap to write, check and dump (at most about 11,500 mappings and 750,000 data blocks),
/// and so that running out of metadata space is within the fuzzer's reach.
pub const META_BLOCKS: u64 = 64;

pub fn run(data: &[u8]) {
    let doc = match Validated::new(data) {
        Ok(doc) => doc,
        Err(e) => {
            // The message is what a user sees: building it must not panic either.
            let _ = e.to_string();
            return;
        }
    };
    let store: Arc<dyn BlockStore> = Arc::new(MemStore::new(BLOCK_SIZE, META_BLOCKS));
    let report = match write_pool(&doc, store.clone(), Path::new("in.xml"), Path::new("mem")) {
        Ok(report) => report,
        // Refusing a pool the store cannot hold is right; anything else means the first pass
        // accepted what the second could not write.
        Err(ToolError::MetadataTooSmall { .. }) => return,
        Err(e) => panic!("a validated document failed to restore: {e}"),
    };
    check_clean(&store);
    dumps_back(data, &store, &report);
}

/// Runs `thinblk check`'s checks on the store through a fresh cache, as a later run would.
fn check_clean(store: &Arc<dyn BlockStore>) {
    let bm = block_manager(store.clone());
    let (mut progress, mut values) = (Vec::new(), Vec::new());
    let outcome = match check_metadata(&bm, &CheckOptions::default(), &mut progress, &mut values) {
        Ok(outcome) => outcome,
        Err(e) => panic!("check of the restored pool failed to run: {e}"),
    };
    if outcome.problems != 0 {
        let _ = progress.write_all(&values);
        panic!(
            "restore wrote metadata with {} problem(s):\n{}",
            outcome.problems,
            String::from_utf8_lossy(&progress)
        );
    }
}

/// Dumps the restored pool and compares it with the document.
fn dumps_back(data: &[u8], store: &Arc<dyn BlockStore>, report: &RestoreReport) {
    let bm = block_manager(store.clone());
    let sb = read_superblock(&bm, SUPERBLOCK_LOCATION).expect("superblock of a clean pool");
    let mut out = XmlWriter::new(Vec::new());
    dump(&*bm, &sb, &mut out).expect("dump of a clean pool");
    let dumped = out.into_inner();
    let (head_out, pool_out) = xml::parse(&dumped).expect("dump output reads back");
    // The input validated and fitted in the store, so expanding its mappings is cheap.
    let (head_in, mut pool_in) = xml::parse(data).expect("a validated document parses");

    for d in pool_in.devices.values_mut() {
        d.details.mapped_blocks = d.mappings.len() as u64;
    }
    assert_eq!(
        pool_out, pool_in,
        "the dump differs from the restored document"
    );
    let mappings: u64 = pool_in
        .devices
        .values()
        .map(|d| d.details.mapped_blocks)
        .sum();
    assert_eq!(report.devices, pool_in.devices.len() as u64);
    assert_eq!(report.mappings, mappings);

    // thin_dump prints an empty uuid; the superblock holds the document's, zero-padded.
    let mut uuid = [0u8; 16];
    for (d, s) in uuid.iter_mut().zip(head_in.uuid.bytes()) {
        *d = s;
    }
    assert_eq!(sb.uuid, uuid, "uuid {:?} not kept", head_in.uuid);
    let unknown_flags = head_in.flags & !FLAG_NEEDS_CHECK != 0;
    assert_eq!(
        unknown_flags,
        report.warnings.iter().any(|w| w.contains("flags")),
        "dropped flag bits must be warned about, and only they"
    );
    let want = SuperblockAttrs {
        uuid: String::new(),
        flags: head_in.flags & FLAG_NEEDS_CHECK,
        ..head_in
    };
    assert_eq!(head_out, want, "superblock fields not kept");
}
