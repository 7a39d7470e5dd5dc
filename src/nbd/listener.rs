//! The server: a listening socket (unix or TCP), a thread that accepts, and one thread per
//! connection (handshake, then transmission). Exports are added and removed while it runs;
//! removing one hangs up on its clients, stopping the server hangs up on all of them and
//! waits for their threads, so nothing outlives it.

use std::collections::HashMap;
use std::fmt;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use log::{info, warn};
use parking_lot::Mutex;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::export::{Exports, NbdExport};
use super::negotiate::{negotiate, HandshakeEnd};
use super::socket::Socket;
use super::transmission::Connection;
use crate::sockets::{bind_private, SocketError};

/// Clients at once; more are accepted and closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client may take over each read of the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddr {
    Unix(PathBuf),
    /// `host:port`.
    Tcp(String),
}

impl NbdAddr {
    /// `host:port` (a port of digits, no slash) is TCP; anything else a unix socket path.
    pub fn parse(s: &str) -> NbdAddr {
        let tcp = !s.contains('/')
            && s.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())
            });
        if tcp {
            NbdAddr::Tcp(s.to_string())
        } else {
            NbdAddr::Unix(PathBuf::from(s))
        }
    }
}

impl fmt::Display for NbdAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdAddr::Unix(p) => write!(f, "{}", p.display()),
            NbdAddr::Tcp(a) => write!(f, "{a}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("an NBD export named '{0}' already exists")]
    ExportExists(String),
    #[error("no NBD export named '{0}'")]
    NoExport(String),
    #[error("NBD export '{0}' has clients; mode=hard disconnects them")]
    InUse(String),
}

struct ConnEntry {
    /// The same socket as the connection's, to hang up on it from here.
    fd: OwnedFd,
    export: Option<String>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Conns {
    next: u64,
    map: HashMap<u64, ConnEntry>,
}

struct Shared {
    exports: Exports,
    conns: Mutex<Conns>,
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

pub struct NbdServer {
    addr: NbdAddr,
    shared: Arc<Shared>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    unix_path: Option<PathBuf>,
}

impl NbdServer {
    pub fn start(addr: NbdAddr) -> Result<NbdServer, NbdError> {
        let listen_err = |source| NbdError::Listen {
            addr: addr.to_string(),
            source,
        };
        let listener = match &addr {
            NbdAddr::Unix(p) => Listener::Unix(bind_private(p)?, p.clone()),
            NbdAddr::Tcp(a) => Listener::Tcp(TcpListener::bind(a.as_str()).map_err(listen_err)?),
        };
        let unix_path = match &listener {
            Listener::Unix(_, p) => Some(p.clone()),
            Listener::Tcp(_) => None,
        };
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(listen_err)?);
        let shared = Arc::new(Shared {
            exports: Exports::default(),
            conns: Mutex::new(Conns::default()),
        });
        let (s, st) = (shared.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("nbd-listen".into())
            .spawn(move || accept_loop(listener, &s, &st))
            .map_err(listen_err)?;
        info!("NBD server listening on {addr}");
        Ok(NbdServer {
            addr,
            shared,
            stop,
            thread: Some(thread),
            unix_path,
        })
    }

    pub fn addr(&self) -> &NbdAddr {
        &self.addr
    }

    pub fn add(&self, export: NbdExport) -> Result<(), NbdError> {
        let name = export.name.clone();
        if !self.shared.exports.insert(Arc::new(export)) {
            return Err(NbdError::ExportExists(name));
        }
        info!("NBD export {name}");
        Ok(())
    }

    /// Removes an export. Refused while clients use it unless `hard`: then they are
    /// disconnected, and this returns once their requests in flight have finished.
    pub fn remove(&self, name: &str, hard: bool) -> Result<(), NbdError> {
        if self.shared.exports.get(name).is_none() {
            return Err(NbdError::NoExport(name.into()));
        }
        if !hard && self.clients_of(name) > 0 {
            return Err(NbdError::InUse(name.into()));
        }
        // Out of the table first: a client finishing its handshake now sees it gone.
        self.shared.exports.remove(name);
        let threads: Vec<JoinHandle<()>> = {
            let mut conns = self.shared.conns.lock();
            conns
                .map
                .values_mut()
                .filter(|e| e.export.as_deref() == Some(name))
                .filter_map(|e| {
                    Socket::shutdown(e.fd.as_raw_fd());
                    e.thread.take()
                })
                .collect()
        };
        // Their requests in flight finish before this returns: the caller may delete the
        // device next, and no write may reach it (or a device that reuses its id) after.
        for t in threads {
            let _ = t.join();
        }
        // A thread whose handle was not recorded yet leaves the table as it ends.
        while self.clients_of(name) > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        info!("NBD export {name} removed");
        Ok(())
    }

    pub fn clients_of(&self, name: &str) -> usize {
        let conns = self.shared.conns.lock();
        conns
            .map
            .values()
            .filter(|e| e.export.as_deref() == Some(name))
            .count()
    }

    pub fn exports(&self) -> Vec<Arc<NbdExport>> {
        self.shared.exports.all()
    }

    /// Exports of block node device `dev` (compared by identity).
    pub fn export_names(&self) -> Vec<String> {
        self.shared.exports.names()
    }

    /// Connections open now (for tests and status).
    pub fn connections(&self) -> usize {
        self.shared.conns.lock().map.len()
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Taken out of the lock first: each thread removes itself from it as it ends.
        let all = std::mem::take(&mut self.shared.conns.lock().map);
        for e in all.values() {
            Socket::shutdown(e.fd.as_raw_fd());
        }
        for (_, mut e) in all {
            if let Some(t) = e.thread.take() {
                let _ = t.join();
            }
        }
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
        info!("NBD server on {} stopped", self.addr);
    }
}

fn accept_loop(listener: Listener, shared: &Arc<Shared>, stop: &EventFd) {
    let lfd = match &listener {
        Listener::Unix(l, _) => l.as_raw_fd(),
        Listener::Tcp(l) => l.as_raw_fd(),
    };
    loop {
        let mut fds = [
            libc::pollfd {
                fd: lfd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds that live across the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            warn!(
                "NBD server: poll failed: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents == 0 {
            continue;
        }
        let fd: OwnedFd = match &listener {
            Listener::Unix(l, _) => match l.accept() {
                Ok((s, _)) => s.into(),
                Err(e) => {
                    warn!("NBD server: accept: {e}");
                    continue;
                }
            },
            Listener::Tcp(l) => match l.accept() {
                Ok((s, _)) => {
                    let _ = s.set_nodelay(true);
                    s.into()
                }
                Err(e) => {
                    warn!("NBD server: accept: {e}");
                    continue;
                }
            },
        };
        spawn_connection(Socket::new(fd), shared);
    }
}

fn spawn_connection(sock: Socket, shared: &Arc<Shared>) {
    let Ok(dup) = sock.try_clone() else { return };
    let id = {
        let mut conns = shared.conns.lock();
        if conns.map.len() >= MAX_CONNECTIONS {
            warn!("NBD server: {MAX_CONNECTIONS} clients already; hanging up on another");
            return;
        }
        conns.next += 1;
        let id = conns.next;
        conns.map.insert(
            id,
            ConnEntry {
                fd: dup,
                export: None,
                thread: None,
            },
        );
        id
    };
    let s = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("nbd-conn".into())
        .spawn(move || {
            serve_connection(sock, &s, id);
            s.conns.lock().map.remove(&id);
        });
    let mut conns = shared.conns.lock();
    match spawned {
        Ok(t) => {
            if let Some(e) = conns.map.get_mut(&id) {
                e.thread = Some(t);
            }
        }
        Err(e) => {
            warn!("NBD server: no thread for a client: {e}");
            conns.map.remove(&id);
        }
    }
}

fn serve_connection(mut sock: Socket, shared: &Shared, id: u64) {
    let _ = sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    // Under the lock `remove` hangs up under, and before the client hears yes: either
    // `remove` sees this client, or this client sees the export gone.
    let mut admit = |export: &Arc<NbdExport>| {
        let mut conns = shared.conns.lock();
        let current = shared.exports.get(&export.name);
        if !current.is_some_and(|e| Arc::ptr_eq(&e, export)) {
            return false;
        }
        match conns.map.get_mut(&id) {
            Some(e) => {
                e.export = Some(export.name.clone());
                true
            }
            None => false,
        }
    };
    let session = match negotiate(&mut sock, &shared.exports, &mut admit) {
        Ok(s) => s,
        Err(HandshakeEnd::Aborted) => return,
        Err(e) => {
            info!("NBD client {id}: handshake ended: {e}");
            return;
        }
    };
    let _ = sock.set_read_timeout(None);
    let name = session.export.name.clone();
    match Connection::new(sock, session) {
        Ok(conn) => {
            if let Err(e) = conn.run() {
                info!("NBD client {id} of {name}: {e}");
            }
        }
        Err(e) => warn!("NBD client {id} of {name}: no device queue: {e}"),
    }
}

#[cfg(test)]
#[path = "listener_tests.rs"]
mod tests;
