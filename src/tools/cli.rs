//! The subcommands' arguments (clap) and what each runs; `main.rs` only dispatches here.

use std::fs::File;
use std::io::{self, BufWriter, IsTerminal, Write};
use std::path::PathBuf;

use clap::{Args, ValueEnum};

use super::check::{check, check_metadata, CheckOptions};
use super::delta::{delta, DeltaOptions};
use super::dump::{dump, DumpSink, XmlWriter};
use super::error::{Result, ToolError};
use super::json::JsonWriter;
use super::ls::{ls, parse_fields, LsOptions, DEFAULT_FIELDS};
use super::progress::{self, Progress};
use super::restore::{restore, RestoreOptions};
use super::{Access, Metadata};

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The metadata file or device.
    pub metadata: PathBuf,
    /// Print nothing; the exit status says it all.
    #[arg(short, long)]
    pub quiet: bool,
    /// Only check the superblock.
    #[arg(long)]
    pub super_block_only: bool,
    /// Clear the needs_check flag if the pool is otherwise consistent.
    #[arg(long, alias = "clear-needs-check-flag")]
    pub clear_needs_check: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Xml,
    Json,
}

#[derive(Args, Debug)]
pub struct DumpArgs {
    /// The metadata file or device.
    pub metadata: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Xml)]
    pub format: Format,
    /// Write to FILE instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Dump the held metadata snapshot instead of the live metadata.
    #[arg(short, long)]
    pub metadata_snap: bool,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The thin_dump XML to read.
    #[arg(short, long, value_name = "XML")]
    pub input: PathBuf,
    /// The metadata file or device to write (a missing file is created, sparse).
    #[arg(short, long, value_name = "META")]
    pub output: PathBuf,
    /// Size of a new output file, or to grow an existing one to (e.g. 64M; default: large
    /// enough for the input, at least 4 MiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_metadata_size)]
    pub metadata_size: Option<u64>,
    /// Print nothing but errors.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    /// The metadata file or device.
    pub metadata: PathBuf,
    /// Columns, comma-separated: DEV, MAPPED_BLOCKS, EXCLUSIVE_BLOCKS, SHARED_BLOCKS,
    /// MAPPED_SECTORS, EXCLUSIVE_SECTORS, SHARED_SECTORS, MAPPED_BYTES, EXCLUSIVE_BYTES,
    /// SHARED_BYTES, MAPPED, EXCLUSIVE, SHARED, TRANSACTION, CREATE_TIME, SNAP_TIME.
    #[arg(short = 'o', long = "format", value_name = "FIELDS")]
    pub fields: Option<String>,
    /// Leave out the header line.
    #[arg(long)]
    pub no_headers: bool,
    /// List the held metadata snapshot's devices.
    #[arg(short, long)]
    pub metadata_snap: bool,
}

#[derive(Args, Debug)]
pub struct DeltaArgs {
    /// The metadata file or device.
    pub metadata: PathBuf,
    /// The left device.
    #[arg(long, alias = "thin1", value_name = "DEV")]
    pub snap1: u64,
    /// The right device.
    #[arg(long, alias = "thin2", value_name = "DEV")]
    pub snap2: u64,
    /// Show data blocks, and group runs by kind.
    #[arg(long)]
    pub verbose: bool,
    /// Compare in the held metadata snapshot.
    #[arg(short, long)]
    pub metadata_snap: bool,
}

fn parse_metadata_size(s: &str) -> std::result::Result<u64, String> {
    crate::export_spec::parse_size("metadata-size", s).map_err(|e| e.to_string())
}

/// `thinblk check`: fails unless the pool is consistent and `needs_check` is clear (or was
/// cleared).
pub fn run_check(a: &CheckArgs) -> Result<()> {
    let opts = CheckOptions {
        super_block_only: a.super_block_only,
        clear_needs_check: a.clear_needs_check,
        quiet: a.quiet,
    };
    let outcome = if progress::on_terminal() && !a.quiet {
        let access = if opts.clear_needs_check {
            Access::Write
        } else {
            Access::Read
        };
        let md = Metadata::open(&a.metadata, access)?;
        let bar = metadata_read_progress(&md, "checking");
        let mut lines = bar.line_writer();
        check_metadata(&md.bm, &opts, &mut lines, &mut io::stdout().lock())?
    } else {
        check(
            &a.metadata,
            &opts,
            &mut io::stderr().lock(),
            &mut io::stdout().lock(),
        )?
    };
    if outcome.problems > 0 {
        return Err(ToolError::CheckFailed {
            problems: outcome.problems,
        });
    }
    if !outcome.passed() {
        return Err(ToolError::NeedsCheck);
    }
    Ok(())
}

fn output(path: Option<&PathBuf>) -> Result<Box<dyn Write>> {
    Ok(match path {
        Some(p) => Box::new(BufWriter::new(File::create(p).map_err(|source| {
            ToolError::Io {
                path: p.clone(),
                source,
            }
        })?)),
        None => Box::new(BufWriter::new(io::stdout().lock())),
    })
}

/// `thinblk dump`.
pub fn run_dump(a: &DumpArgs) -> Result<()> {
    let md = Metadata::open(&a.metadata, Access::Read)?;
    // No bar over the dump itself when it goes to the same terminal.
    let _bar = (a.output.is_some() || !io::stdout().is_terminal())
        .then(|| metadata_read_progress(&md, "dumping"));
    let sb = md.roots(a.metadata_snap)?;
    let out = output(a.output.as_ref())?;
    let mut sink: Box<dyn DumpSink> = match a.format {
        Format::Xml => Box::new(XmlWriter::new(out)),
        Format::Json => Box::new(JsonWriter::new(out)),
    };
    dump(&md.bm, &sb, sink.as_mut())
}

/// `thinblk restore`.
pub fn run_restore(a: &RestoreArgs) -> Result<()> {
    let spinner = Progress::spinner(&format!(
        "restoring {} into {}",
        a.input.display(),
        a.output.display()
    ));
    let report = restore(&RestoreOptions {
        input: a.input.clone(),
        output: a.output.clone(),
        metadata_size: a.metadata_size,
    })?;
    drop(spinner);
    for w in &report.warnings {
        log::warn!("{}: {w}", a.input.display());
    }
    if !a.quiet {
        eprintln!(
            "restored {} device(s), {} mapping(s) into {} ({} metadata blocks)",
            report.devices,
            report.mappings,
            a.output.display(),
            report.metadata_blocks
        );
    }
    Ok(())
}

/// `thinblk ls`.
pub fn run_ls(a: &LsArgs) -> Result<()> {
    let fields = match &a.fields {
        Some(s) => parse_fields(s)?,
        None => DEFAULT_FIELDS.to_vec(),
    };
    let md = Metadata::open(&a.metadata, Access::Read)?;
    let opts = LsOptions {
        fields,
        headers: !a.no_headers,
        metadata_snap: a.metadata_snap,
    };
    let mut out = BufWriter::new(io::stdout().lock());
    ls(&md, &opts, &mut out)?;
    out.flush().map_err(ToolError::Output)
}

/// `thinblk delta`.
pub fn run_delta(a: &DeltaArgs) -> Result<()> {
    let md = Metadata::open(&a.metadata, Access::Read)?;
    let opts = DeltaOptions {
        snap1: a.snap1,
        snap2: a.snap2,
        verbose: a.verbose,
        metadata_snap: a.metadata_snap,
    };
    let mut out = BufWriter::new(io::stdout().lock());
    delta(&md, &opts, &mut out)
}

/// A bar over the metadata blocks in use, moved by the blocks the cache reads (the walks of
/// check and dump read each block in use about once).
fn metadata_read_progress(md: &Metadata, what: &str) -> Progress {
    use crate::engine::pdata::space_map::{MetadataSpaceMap, SpaceMap};
    let nr_blocks = md.bm.nr_blocks();
    let free = md
        .superblock()
        .ok()
        .and_then(|sb| MetadataSpaceMap::open(&md.bm, &sb.metadata_sm_root).ok())
        .map_or(0, |sm| sm.nr_free());
    let cache = md.bm.cache().clone();
    Progress::bar(
        &format!("{what} {}", md.path.display()),
        nr_blocks.saturating_sub(free).max(1),
        "metadata blocks",
        move || cache.stats().reads,
    )
}

/// `thinblk merge`: folds a stopped snapshot into its origin, with a bar over its exceptions
/// on a terminal.
pub fn run_merge(
    origin: &std::path::Path,
    store: &std::path::Path,
) -> std::result::Result<u64, crate::engine::cow::CowError> {
    use crate::engine::cow::{open_cow, CowOptions};
    if !store.exists() {
        // Its own error for a missing store.
        return crate::engine::cow::merge_offline(origin, store).map(|r| r.chunks);
    }
    let opts = CowOptions {
        direct: true,
        ..CowOptions::default()
    };
    let files = std::sync::Arc::new(open_cow(origin, store, &opts)?);
    let total = files.device.status().exceptions;
    let watched = files.clone();
    let bar = Progress::bar(
        &format!("merging {} into {}", store.display(), origin.display()),
        total.max(1),
        "chunks",
        move || total.saturating_sub(watched.device.status().exceptions),
    );
    let report = files.merge()?;
    drop(bar);
    Ok(report.chunks)
}
