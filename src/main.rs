//! The `thinblk` command line.

use std::path::PathBuf;
use std::time::Duration;

use std::ffi::OsString;

use clap::{CommandFactory, Parser, Subcommand};
use thinblk::config_file;
use thinblk::daemon::{self, PoolLocation, ServeConfig};
use thinblk::engine::thin::{PoolGeometry, PoolOptions};
use thinblk::export_spec::{parse_size, ExportSpec};
use thinblk::socket_access::{self, SocketAccess};
use thinblk::tools;

/// thinblk: thin-provisioned block storage for virtual machines, served over vhost-user-blk.
///
/// Guests attach with QEMU's vhost-user-blk-pci or cloud-hypervisor's --disk vhost_user=on.
/// Logging goes to stderr; set RUST_LOG (error, warn, info, debug, trace) to choose how much.
#[derive(Parser, Debug)]
#[command(name = "thinblk", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve disks to virtual machines over vhost-user-blk sockets.
    ///
    /// With no options at all: a thin pool in ./thinblk-pool/ (sparse `metadata` and `data`
    /// files, created on the first run), its 16 GiB disk `disk0` (created on the first run)
    /// exported at ./thinblk-pool/disk0.sock, and the QMP socket ./thinblk-pool/control.sock.
    /// Runs until SIGINT or SIGTERM; SIGHUP re-reads --config.
    #[command(args_override_self = true, after_long_help = CONFIG_HELP)]
    Serve(Box<ServeArgs>),
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
    /// Send one QMP command to a running daemon and print the reply as JSON (exit status 1
    /// on an error reply), or print its events with --events.
    Ctl(thinblk::control::client::CtlArgs),
    /// Fold a cow= snapshot's store into its origin (no daemon may serve it). The origin is
    /// written in place; an interrupted merge finishes when run again.
    Merge(MergeArgs),
    /// Write man pages or shell completions.
    #[command(subcommand)]
    Generate(GenerateArgs),
}

#[derive(Subcommand, Debug)]
enum GenerateArgs {
    /// Man pages: thinblk.1 and thinblk-SUBCOMMAND.1 into DIR (e.g. /usr/local/share/man/man1).
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// The completion script for SHELL, into DIR (named as the shell expects) or to stdout.
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
        #[arg(value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

fn run_generate(what: GenerateArgs) -> anyhow::Result<()> {
    match what {
        GenerateArgs::Man { dir } => {
            for page in thinblk::generate::man_pages(Cli::command(), &dir)? {
                println!("{}", page.display());
            }
        }
        GenerateArgs::Completions { shell, dir: None } => {
            thinblk::generate::completions(Cli::command(), shell, &mut std::io::stdout());
        }
        GenerateArgs::Completions {
            shell,
            dir: Some(dir),
        } => {
            std::fs::create_dir_all(&dir)?;
            let path = dir.join(thinblk::generate::completion_file_name(shell, "thinblk"));
            let mut f = std::fs::File::create(&path)?;
            thinblk::generate::completions(Cli::command(), shell, &mut f);
            println!("{}", path.display());
        }
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
struct MergeArgs {
    /// The snapshot's origin file or block device (written).
    #[arg(long, value_name = "PATH")]
    origin: PathBuf,
    /// The snapshot's store.
    #[arg(long, value_name = "PATH")]
    store: PathBuf,
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size("size", s).map_err(|e| e.to_string())
}

fn mode_arg(s: &str) -> Result<u32, String> {
    socket_access::parse_mode(s).map_err(|e| e.to_string())
}

fn user_arg(s: &str) -> Result<u32, String> {
    socket_access::parse_user(s).map_err(|e| e.to_string())
}

fn group_arg(s: &str) -> Result<u32, String> {
    socket_access::parse_group(s).map_err(|e| e.to_string())
}

/// `serve --help`'s word on configuration files.
const CONFIG_HELP: &str = config_file::HELP;

#[derive(clap::Args, Debug, Default)]
struct ServeArgs {
    /// Read flags from a TOML file (see below); the command line overrides it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// An export, as comma-separated key=value pairs (repeat the flag for several).
    ///
    /// name=NAME: a thin device of the pool (created when size= is given and it is missing);
    /// raw=PATH: a file or block device served byte for byte;
    /// null=SIZE: a device that stores nothing and reads zeros, for benchmarks (e.g. 16G);
    /// cow=ORIGIN: a writable snapshot of the file or block device ORIGIN (never written),
    /// its changed chunks kept in store= in dm-snapshot's format.
    /// rbd=POOL/IMAGE: an existing Ceph RBD image served byte for byte through librbd
    /// (see --ceph-conf, --ceph-id; needs a thinblk built with the `rbd` feature).
    /// One of name=, raw=, null=, cow= or rbd= is required.
    /// size=SIZE: with name=, the size of a device to create (e.g. 16G).
    /// snapshot-of=NAME: with name=, create the device as a snapshot of NAME if missing.
    /// origin=PATH: with name=, create the device with the external origin PATH if missing:
    /// unmapped blocks read PATH (read-only), size defaults to PATH's.
    /// store=PATH: with cow=, the exception store (created sparse when missing, big enough
    /// to copy the whole origin unless store-size= says otherwise).
    /// chunk-size=SIZE: with cow=, the copy unit, a power of two from 4K to 512K (default
    /// 64K; an existing store keeps its own).
    /// store-size=SIZE: with cow=, the size of a store file created now.
    /// transient=on|off: with cow=, keep exceptions in memory only; they are lost at exit.
    /// socket=PATH: the vhost-user socket to create, mode 0600 (required for raw=, null=, cow=, rbd=;
    /// thin exports default to DIR/NAME.sock); a stale socket is replaced, a socket some
    /// server still listens on is an error.
    /// socket-mode=MODE, socket-owner=USER, socket-group=GROUP: the socket's octal mode,
    /// owner and group (names or numbers), set before the socket appears at its path
    /// (default: --socket-mode, --socket-owner, --socket-group).
    /// id=NAME: the export name, also the disk serial the guest reads (default: the device
    /// name, or the socket's file name).
    /// queues=N: virtqueues, 1 to 16 (default 2), served by the daemon's --workers.
    /// queue-size=N: entries per virtqueue, a power of two up to 1024 (default 256).
    /// readonly=on|off: refuse writes and tell the guest the disk is read-only (default off).
    /// direct=on|off: O_DIRECT on a raw backing file, bypassing the host page cache (default on).
    /// poll-us=N: microseconds a queue worker keeps polling its virtqueue and io_uring after
    /// activity before it sleeps at most, 0 to 1000 (default 32; 0: never poll; RBD devices
    /// never poll); for the guest's next request each queue learns how much of it pays off.
    /// submit-batch=N: requests a queue worker hands to io_uring per system call at most,
    /// 1 to 1024 (default 4: the host device starts on the first while the rest are framed).
    /// Write a literal comma in a value as ",,".
    #[arg(long = "export", value_name = "SPEC", verbatim_doc_comment)]
    exports: Vec<ExportSpec>,

    /// Directory of the pool: its `metadata`, `data` and `devices.json` files (unless
    /// --metadata/--data say otherwise) and the sockets of thin exports [default: thinblk-pool]
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,

    /// The pool's metadata file or device (created sparse with --metadata-size when missing),
    /// or rbd:POOL/IMAGE, an RBD image (created when missing; needs --data rbd:...).
    #[arg(long, value_name = "PATH")]
    metadata: Option<PathBuf>,

    /// The pool's data file or device (created sparse with --data-size when missing), or
    /// rbd:POOL/IMAGE, an RBD image (created when missing).
    #[arg(long, value_name = "PATH")]
    data: Option<PathBuf>,

    /// Size of a new metadata file (or image).
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = size_arg)]
    metadata_size: u64,

    /// Size of a new data file (or image).
    #[arg(long, value_name = "SIZE", default_value = "64G", value_parser = size_arg)]
    data_size: u64,

    /// Data block size of a new pool: 64K to 1G, a multiple of 64K.
    #[arg(long, value_name = "SIZE", default_value = "64K", value_parser = size_arg)]
    block_size: u64,

    /// Fail writes at once when the pool's data space runs out, instead of queueing them
    /// for up to --no-space-timeout seconds while waiting for the pool to grow.
    #[arg(long)]
    error_if_no_space: bool,

    /// Seconds writes wait for data space before they fail.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    no_space_timeout: u64,

    /// Memory for cached metadata blocks.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = size_arg)]
    metadata_cache: u64,

    /// The QMP control socket (mode 0600) [default: DIR/control.sock when a pool is open]
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,

    /// Also serve NBD at ADDR: a unix socket path (mode 0600), or host:port for TCP (no TLS:
    /// a trusted network only). Each export's disk is exported read-only under its id; QMP
    /// nbd-server-add adds more. Off by default.
    #[arg(long, value_name = "ADDR")]
    nbd: Option<String>,
    /// Octal mode of export sockets that give no socket-mode= (e.g. 0660 with
    /// --socket-group to let a VMM's group connect) [default: 0600]
    #[arg(long, value_name = "MODE", value_parser = mode_arg)]
    socket_mode: Option<u32>,

    /// Owner (name or number) of export sockets that give no socket-owner=.
    #[arg(long, value_name = "USER", value_parser = user_arg)]
    socket_owner: Option<u32>,

    /// Group (name or number) of export sockets that give no socket-group= (libvirt's QEMU:
    /// the group of its user, e.g. libvirt-qemu or kvm).
    #[arg(long, value_name = "GROUP", value_parser = group_arg)]
    socket_group: Option<u32>,

    /// Octal mode of the QMP control socket; whoever can connect can create, delete and
    /// export every disk [default: 0600]
    #[arg(long, value_name = "MODE", value_parser = mode_arg)]
    control_mode: Option<u32>,

    /// Group (name or number) of the QMP control socket.
    #[arg(long, value_name = "GROUP", value_parser = group_arg)]
    control_group: Option<u32>,
    /// With a pool on RBD: if another daemon owns it (holds its images' exclusive locks),
    /// fence that daemon (break its locks, which blocklists its Ceph client) and take the
    /// pool over at its last commit, instead of refusing to start.
    #[arg(long)]
    take_over: bool,

    /// With a pool on RBD: stand by for it (another host's daemon owns it) instead of opening
    /// it. The QMP socket, and exports of other devices, run at once; QMP query-pool says who
    /// owns the pool, and pool-take-over fences that owner, opens the pool and starts the
    /// thin exports.
    #[arg(long)]
    standby: bool,

    /// Serve the exports' statistics and the pool's gauges in the Prometheus text format at
    /// http://ADDR/metrics (for example 127.0.0.1:9847). Off by default.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,

    /// The Ceph configuration file (monitors, keyring) for rbd= exports and pools on RBD
    /// [default: librados's search: $CEPH_CONF, /etc/ceph/ceph.conf, ~/.ceph/config]
    #[arg(long, value_name = "PATH")]
    ceph_conf: Option<PathBuf>,

    /// The Ceph (cephx) user to connect as, without "client." [default: admin]
    #[arg(long, value_name = "NAME")]
    ceph_id: Option<String>,

    /// Queue worker threads shared by every queue of every export, at most this many
    /// [default: one per core the daemon may run on]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    workers: Option<u16>,
}

impl ServeArgs {
    fn into_config(self) -> anyhow::Result<ServeConfig> {
        let block_ok = (64 << 10..=1 << 30).contains(&self.block_size)
            && self.block_size.is_multiple_of(64 << 10);
        if !block_ok {
            anyhow::bail!("--block-size must be 64K to 1G and a multiple of 64K");
        }
        let only_devices = !self.exports.is_empty()
            && self
                .exports
                .iter()
                .all(|e| !matches!(e.backing, thinblk::export_spec::Backing::Thin { .. }));
        let wants_pool =
            !only_devices || self.dir.is_some() || self.metadata.is_some() || self.data.is_some();
        let dir = self
            .dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(daemon::DEFAULT_POOL_DIR));
        let rbd = daemon::rbd_pool::spec_from_args(
            self.metadata.as_deref(),
            self.data.as_deref(),
            thinblk::engine::rbd::CephOptions {
                conf: self.ceph_conf.clone(),
                id: self.ceph_id.clone(),
            },
            self.take_over,
            self.standby,
        )
        .map_err(anyhow::Error::msg)?;
        let pool = wants_pool.then(|| {
            let geometry = PoolGeometry {
                block_size: self.block_size,
                metadata_size: self.metadata_size,
                data_size: self.data_size,
            };
            let options = PoolOptions {
                error_if_no_space: self.error_if_no_space,
                no_space_timeout: Duration::from_secs(self.no_space_timeout),
                metadata_cache: usize::try_from(self.metadata_cache).unwrap_or(usize::MAX),
                ..PoolOptions::default()
            };
            let mut loc = PoolLocation::in_dir(&dir, geometry, options);
            loc.rbd = rbd.clone();
            if loc.rbd.is_some() {
                // The images are named by loc.rbd; the catalog and saved exports stay in DIR.
                return loc;
            }
            if let Some(m) = &self.metadata {
                loc.catalog = m.with_extension("devices.json");
                loc.saved = m.with_extension("exports.json");
                loc.metadata = m.clone();
            }
            if let Some(d) = &self.data {
                loc.data = d.clone();
            }
            loc
        });
        let control = self
            .control
            .clone()
            .or_else(|| pool.as_ref().map(|p| p.dir.join("control.sock")));
        let exports = if self.exports.is_empty() {
            vec![daemon::default_export()]
        } else {
            self.exports
        };
        Ok(ServeConfig {
            exports,
            pool,
            control,
            nbd: self.nbd.as_deref().map(thinblk::nbd::NbdAddr::parse),
            socket_defaults: SocketAccess {
                mode: self.socket_mode,
                owner: self.socket_owner,
                group: self.socket_group,
            },
            control_access: SocketAccess {
                mode: self.control_mode,
                owner: None,
                group: self.control_group,
            },
            reload: None,
            metrics: self.metrics,
            ceph: thinblk::engine::rbd::CephOptions {
                conf: self.ceph_conf,
                id: self.ceph_id,
            },
        })
    }
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        None => Ok(daemon::serve(ServeArgs::default_args().into_config()?)?),
        Some(Command::Serve(args)) => run_serve(*args),
        Some(Command::Check(a)) => Ok(tools::cli::run_check(&a)?),
        Some(Command::Dump(a)) => Ok(tools::cli::run_dump(&a)?),
        Some(Command::Restore(a)) => Ok(tools::cli::run_restore(&a)?),
        Some(Command::Ls(a)) => Ok(tools::cli::run_ls(&a)?),
        Some(Command::Delta(a)) => Ok(tools::cli::run_delta(&a)?),
        Some(Command::Ctl(args)) => std::process::exit(thinblk::control::client::run(&args)?),
        Some(Command::Generate(what)) => run_generate(what),
        Some(Command::Merge(a)) => {
            let chunks = tools::cli::run_merge(&a.origin, &a.store)?;
            println!("merged {chunks} chunks into {}", a.origin.display());
            Ok(())
        }
    }
}

/// `thinblk serve`, with its --config file read first (and again at each SIGHUP).
fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    // Before any export starts; a reload does not change it.
    thinblk::vhost::worker_pool::configure(args.workers.map_or(0, usize::from));
    let Some(file) = args.config.clone() else {
        return Ok(daemon::serve(args.into_config()?)?);
    };
    // The command line after `serve`, parsed again after the file's flags at each reload.
    let mut argv = std::env::args_os().skip_while(|a| a != "serve");
    argv.next();
    let cli: Vec<OsString> = argv.collect();
    let first = read_config_table(&file)?;
    let args = serve_args_with_file(&file, &cli)?;
    // The file may set it too.
    thinblk::vhost::worker_pool::configure(args.workers.map_or(0, usize::from));
    let mut config = args.into_config()?;
    config.reload = Some(Box::new(move || {
        let table = read_config_table(&file).map_err(|e| e.to_string())?;
        let changed: Vec<&String> = table
            .iter()
            .filter(|(k, v)| *k != "export" && first.get(*k) != Some(*v))
            .map(|(k, _)| k)
            .chain(
                first
                    .keys()
                    .filter(|k| *k != "export" && !table.contains_key(*k)),
            )
            .collect();
        if !changed.is_empty() {
            log::warn!(
                "{}: {changed:?} changed; only exports are reloaded, the rest takes effect at the next start",
                file.display()
            );
        }
        let args = serve_args_with_file(&file, &cli).map_err(|e| e.to_string())?;
        Ok(args.into_config().map_err(|e| e.to_string())?.exports)
    }));
    Ok(daemon::serve(config)?)
}

fn read_config_table(file: &std::path::Path) -> anyhow::Result<toml::Table> {
    let name = file.display().to_string();
    let text = std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("reading {name}: {e}"))?;
    Ok(config_file::parse(&name, &text)?)
}

/// The file's flags, then the command line's: the later wins, repeated flags add up.
fn serve_args_with_file(file: &std::path::Path, cli: &[OsString]) -> anyhow::Result<ServeArgs> {
    let cmd = Cli::command();
    let serve = cmd
        .find_subcommand("serve")
        .ok_or_else(|| anyhow::anyhow!("no serve subcommand"))?;
    let from_file = config_file::read_args(file, serve)?;
    let mut argv: Vec<OsString> = vec!["thinblk".into(), "serve".into()];
    argv.extend(from_file.into_iter().map(OsString::from));
    argv.extend(cli.iter().cloned());
    match Cli::try_parse_from(argv)?.command {
        Some(Command::Serve(args)) => Ok(*args),
        _ => anyhow::bail!("the configuration did not parse as serve"),
    }
}

impl ServeArgs {
    /// What a bare `thinblk` (no subcommand) runs: `thinblk serve` with its defaults.
    fn default_args() -> Self {
        match Cli::parse_from(["thinblk", "serve"]).command {
            Some(Command::Serve(args)) => *args,
            _ => ServeArgs::default(),
        }
    }
}
