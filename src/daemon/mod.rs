//! `thinblk serve`: opens the devices, starts the exports, and waits for a signal to stop.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use log::info;

use crate::control::ControlServer;
use crate::engine::null::NullDevice;
use crate::engine::raw::{RawDevice, RawOptions};
use crate::engine::BlockDevice;
use crate::export_spec::{Backing, ExportSpec, DEFAULT_QUEUES, DEFAULT_QUEUE_SIZE};
use state::{ExportConfig, Node, State};

pub mod state;

/// Size of the disk `thinblk serve` creates when run with no options.
pub const DEFAULT_DISK_SIZE: u64 = 16 << 30;
/// Where `thinblk serve` keeps its files when run with no options.
pub const DEFAULT_POOL_DIR: &str = "thinblk-pool";

/// The export a bare `thinblk serve` runs: a sparse raw disk in `dir`, created if missing.
pub fn default_export(dir: &Path) -> anyhow::Result<ExportSpec> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .with_context(|| format!("restricting {}", dir.display()))?;
    let image = dir.join("disk0.raw");
    RawDevice::create_sparse(&image, DEFAULT_DISK_SIZE)
        .with_context(|| format!("creating {}", image.display()))?;
    Ok(ExportSpec {
        backing: Backing::Raw(image),
        socket: dir.join("disk0.sock"),
        id: "disk0".into(),
        queues: DEFAULT_QUEUES,
        queue_size: DEFAULT_QUEUE_SIZE,
        read_only: false,
        direct: true,
    })
}

fn open_device(spec: &ExportSpec) -> anyhow::Result<Arc<dyn BlockDevice>> {
    match &spec.backing {
        Backing::Raw(path) => {
            let opts = RawOptions {
                read_only: spec.read_only,
                direct: spec.direct,
            };
            let dev = RawDevice::open(path, opts)
                .with_context(|| format!("opening {}", path.display()))?;
            info!(
                "{}: raw {} ({} bytes, {})",
                spec.id,
                path.display(),
                dev.size(),
                if dev.is_direct() {
                    "O_DIRECT"
                } else {
                    "buffered"
                }
            );
            Ok(Arc::new(dev))
        }
        Backing::Null(size) => {
            info!("{}: null device of {size} bytes", spec.id);
            Ok(Arc::new(NullDevice::new(*size)))
        }
    }
}

/// QEMU options that attach the export at `socket`.
pub fn qemu_options(socket: &Path, queues: u16) -> String {
    format!(
        "-object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \
         -chardev socket,id=char0,path={} \
         -device vhost-user-blk-pci,chardev=char0,num-queues={queues}",
        socket.display()
    )
}

/// Starts every export and the control socket; they run until SIGINT or SIGTERM.
pub fn serve(specs: &[ExportSpec], control: Option<&Path>) -> anyhow::Result<()> {
    let signals = crate::signals::block_termination()?;
    let state = State::new();
    for spec in specs {
        let dev = open_device(spec)?;
        state.add_node(
            &spec.id,
            Node {
                dev,
                read_only: spec.read_only,
            },
        )?;
        state
            .add_export(ExportConfig {
                id: spec.id.clone(),
                node: spec.id.clone(),
                socket: spec.socket.clone(),
                writable: !spec.read_only,
                num_queues: spec.queues,
                queue_size: spec.queue_size,
            })
            .with_context(|| format!("starting export {}", spec.id))?;
        let socket = absolute(&spec.socket);
        println!("export {} at {}", spec.id, socket.display());
        println!("  QEMU: {}", qemu_options(&socket, spec.queues));
        println!(
            "  cloud-hypervisor: --memory size=1G,shared=on --disk vhost_user=on,socket={},num_queues={}",
            socket.display(),
            spec.queues
        );
    }
    let _control = match control {
        Some(path) => {
            let server = ControlServer::start(path, state.clone())
                .with_context(|| format!("starting the control socket {}", path.display()))?;
            println!("control (QMP) at {}", absolute(path).display());
            Some(server)
        }
        None => None,
    };
    let sig = signals.wait()?;
    info!("signal {sig}: stopping");
    state.stop_all();
    Ok(())
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}
