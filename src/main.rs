//! The `thinblk` command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use thinblk::daemon;
use thinblk::export_spec::ExportSpec;
use thinblk::tools;

/// thinblk: thin-provisioned block storage for virtual machines, served over vhost-user-blk.
///
/// Guests attach with QEMU's vhost-user-blk-pci or cloud-hypervisor's --disk vhost_user=on.
/// Logging goes to stderr; set RUST_LOG (error, warn, info, debug, trace) to choose how much.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve disks to virtual machines over vhost-user-blk sockets.
    ///
    /// With no --export, serves a 16 GiB sparse disk ./thinblk-pool/disk0.raw (created on the
    /// first run) at ./thinblk-pool/disk0.sock. Runs until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Check a pool's metadata (like thin_check, plus data ref counts and mapped_blocks).
    Check(tools::cli::CheckArgs),
    /// Print a pool's metadata as thin_dump XML (or JSON).
    Dump(tools::cli::DumpArgs),
    /// Write a pool's metadata from thin_dump XML.
    Restore(tools::cli::RestoreArgs),
    /// List thin devices (like thin_ls).
    Ls(tools::cli::LsArgs),
    /// Show how two thin devices differ (like thin_delta).
    Delta(tools::cli::DeltaArgs),
}

#[derive(clap::Args, Debug, Default)]
struct ServeArgs {
    /// An export, as comma-separated key=value pairs (repeat the flag for several).
    ///
    /// raw=PATH: the file or block device to serve byte for byte (this or null= is required).
    /// null=SIZE: a device that stores nothing and reads zeros, for benchmarks (e.g. 16G).
    /// socket=PATH: the vhost-user socket to create, mode 0600 (required); a stale socket is
    /// replaced, a socket some server still listens on is an error.
    /// id=NAME: the export name, also the disk serial the guest reads (default: socket name).
    /// queues=N: virtqueues, one worker thread each, 1 to 16 (default 2).
    /// queue-size=N: entries per virtqueue, a power of two up to 1024 (default 256).
    /// readonly=on|off: refuse writes and tell the guest the disk is read-only (default off).
    /// direct=on|off: O_DIRECT on the backing file, bypassing the host page cache (default on).
    /// Write a literal comma in a value as ",,".
    #[arg(long = "export", value_name = "SPEC", verbatim_doc_comment)]
    exports: Vec<ExportSpec>,

    /// Directory for the default disk and sockets when no --export is given.
    #[arg(long, value_name = "DIR", default_value = daemon::DEFAULT_POOL_DIR)]
    dir: PathBuf,

    /// The QMP control socket (mode 0600). Default with no --export: DIR/control.sock;
    /// with --export: none unless given.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli
        .command
        .unwrap_or(Command::Serve(ServeArgs::default_with_dir()))
    {
        Command::Serve(args) => {
            let (exports, control) = if args.exports.is_empty() {
                let control = args
                    .control
                    .unwrap_or_else(|| args.dir.join("control.sock"));
                (vec![daemon::default_export(&args.dir)?], Some(control))
            } else {
                (args.exports, args.control)
            };
            daemon::serve(&exports, control.as_deref())
        }
        Command::Check(a) => Ok(tools::cli::run_check(&a)?),
        Command::Dump(a) => Ok(tools::cli::run_dump(&a)?),
        Command::Restore(a) => Ok(tools::cli::run_restore(&a)?),
        Command::Ls(a) => Ok(tools::cli::run_ls(&a)?),
        Command::Delta(a) => Ok(tools::cli::run_delta(&a)?),
    }
}

impl ServeArgs {
    fn default_with_dir() -> Self {
        ServeArgs {
            exports: Vec::new(),
            dir: PathBuf::from(daemon::DEFAULT_POOL_DIR),
            control: None,
        }
    }
}
