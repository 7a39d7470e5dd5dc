//! The QMP control socket: QEMU's wire format, so existing clients (qemu.qmp, qmp-shell) work.

pub mod client;
pub mod commands;
pub mod json_stream;
pub mod protocol;
mod session;
mod writer;

pub use session::replies;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::{info, warn};

use crate::daemon::state::State;
use crate::socket_access::SocketAccess;
use crate::sockets::{bind_with, SocketError};

/// The listening control socket; each client gets a thread.
pub struct ControlServer {
    path: PathBuf,
    /// A duplicate of the listening socket, to hand over at a graceful upgrade.
    listener: Option<UnixListener>,
}

impl ControlServer {
    pub fn start(path: &Path, state: Arc<State>) -> Result<ControlServer, SocketError> {
        Self::start_with(path, state, &SocketAccess::default())
    }

    /// [`ControlServer::start`] with the socket's owner, group and mode in `access`.
    pub fn start_with(
        path: &Path,
        state: Arc<State>,
        access: &SocketAccess,
    ) -> Result<ControlServer, SocketError> {
        let listener = bind_with(path, access)?;
        let handed = listener.try_clone().ok();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(listener, state))
            .map_err(|source| SocketError::Io {
                path: path.display().to_string(),
                source,
            })?;
        info!("control socket at {}", path.display());
        Ok(ControlServer {
            path: path.to_path_buf(),
            listener: handed,
        })
    }
}

impl ControlServer {
    /// The socket's path and listening socket (for a graceful upgrade).
    pub fn listening(&self) -> Option<(&Path, &UnixListener)> {
        Some((&self.path, self.listener.as_ref()?))
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: UnixListener, state: Arc<State>) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let state = state.clone();
                let spawned = std::thread::Builder::new()
                    .name("qmp-client".into())
                    .spawn(move || session::run(state, stream));
                if let Err(e) = spawned {
                    warn!("control: cannot start a client thread: {e}");
                }
            }
            Err(e) => warn!("control: accept failed: {e}"),
        }
    }
}
