//! A connection to a Ceph cluster (a librados handle) and its I/O contexts, one per pool.
//!
//! A connection is heavy (librados starts a dozen threads and keeps sessions to the mon and
//! every OSD), so the daemon shares one per set of options ([`Cluster::shared`]); a second,
//! separate one ([`Cluster::connect`]) is for who must be a different client, such as a test
//! standing in for another host.

use std::ffi::CStr;
use std::io;
use std::os::raw::c_char;
use std::path::Path;
use std::ptr;
use std::sync::{Arc, Mutex, Weak};

use super::error::{c_string, ceph_error, check};
use super::ffi;
use super::CephOptions;

/// How long `connect` waits for the monitors before it gives up (librados waits 300 s).
const MOUNT_TIMEOUT_SECS: &str = "30";

/// A connected librados handle; shut down when the last reference goes.
pub struct Cluster {
    handle: ffi::rados_t,
    instance: u64,
}

// SAFETY: a connected librados handle may be used from any thread and concurrently (librados
// locks internally); only configuration changes are not thread-safe, and none happen after
// `connect` returns.
unsafe impl Send for Cluster {}
// SAFETY: as above.
unsafe impl Sync for Cluster {}

/// Connections made by [`Cluster::shared`], by options.
static SHARED: Mutex<Vec<(CephOptions, Weak<Cluster>)>> = Mutex::new(Vec::new());

impl Cluster {
    /// A new connection, as the user `opts.id` (default `admin`) with the configuration
    /// file `opts.conf` (default: librados's search: `$CEPH_CONF`, `/etc/ceph/ceph.conf`, ...).
    pub fn connect(opts: &CephOptions) -> io::Result<Arc<Cluster>> {
        let id = opts
            .id
            .as_deref()
            .map(|id| c_string("the Ceph user id", id))
            .transpose()?;
        let conf = opts.conf.as_deref().map(path_c_string).transpose()?;
        let mut handle: ffi::rados_t = ptr::null_mut();
        // SAFETY: `handle` is a valid place for the new handle; `id` is NUL-terminated or
        // NULL and outlives the call.
        let rc = unsafe {
            ffi::rados_create(&mut handle, id.as_ref().map_or(ptr::null(), |c| c.as_ptr()))
        };
        check("rados_create", rc)?;
        // From here on `cluster` owns the handle: every error path shuts it down.
        let mut cluster = Cluster {
            handle,
            instance: 0,
        };
        // SAFETY: a created, not yet connected handle; `conf` is NUL-terminated or NULL.
        let rc = unsafe {
            ffi::rados_conf_read_file(
                cluster.handle,
                conf.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
            )
        };
        check("rados_conf_read_file", rc)?;
        cluster.set("client_mount_timeout", MOUNT_TIMEOUT_SECS)?;
        // SAFETY: a configured handle, connected once.
        check("rados_connect", unsafe {
            ffi::rados_connect(cluster.handle)
        })?;
        // SAFETY: a connected handle.
        cluster.instance = unsafe { ffi::rados_get_instance_id(cluster.handle) };
        Ok(Arc::new(cluster))
    }

    /// The daemon's connection for `opts`: made on first use, shared while anyone holds it.
    pub fn shared(opts: &CephOptions) -> io::Result<Arc<Cluster>> {
        // A poisoned lock only means a panic elsewhere while it was held; the list is intact.
        let mut shared = SHARED.lock().unwrap_or_else(|p| p.into_inner());
        shared.retain(|(_, weak)| weak.strong_count() > 0);
        if let Some(c) = shared
            .iter()
            .find(|(o, _)| o == opts)
            .and_then(|(_, w)| w.upgrade())
        {
            return Ok(c);
        }
        let cluster = Cluster::connect(opts)?;
        shared.push((opts.clone(), Arc::downgrade(&cluster)));
        Ok(cluster)
    }

    fn set(&self, option: &str, value: &str) -> io::Result<()> {
        let (o, v) = (c_string("option", option)?, c_string("value", value)?);
        // SAFETY: a handle not yet connected (see `Send`); both strings are NUL-terminated
        // and outlive the call.
        let rc = unsafe { ffi::rados_conf_set(self.handle, o.as_ptr(), v.as_ptr()) };
        check("rados_conf_set", rc).map(drop)
    }

    /// This client's instance id (`client.N` in lock owners).
    pub fn instance_id(&self) -> u64 {
        self.instance
    }

    /// This client's addresses, as the cluster sees them (what a blocklist entry names).
    pub fn addrs(&self) -> io::Result<String> {
        let mut out: *mut c_char = ptr::null_mut();
        // SAFETY: a connected handle; `out` receives a buffer librados allocated.
        check("rados_getaddrs", unsafe {
            ffi::rados_getaddrs(self.handle, &mut out)
        })?;
        if out.is_null() {
            return Err(ceph_error("rados_getaddrs", libc::EIO));
        }
        // SAFETY: librados returned a NUL-terminated string, freed right after the copy.
        let s = unsafe { CStr::from_ptr(out) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: the buffer came from rados_getaddrs and is freed once.
        unsafe { ffi::rados_buffer_free(out) };
        Ok(s)
    }

    /// Blocklists the client at `addr` (`IP:PORT/NONCE`, as a lock owner or
    /// [`Cluster::addrs`] gives it) for `expire_secs` (0: the cluster's default, an hour),
    /// then waits for the osdmap that carries the entry.
    pub fn blocklist_add(&self, addr: &str, expire_secs: u32) -> io::Result<()> {
        let a = c_string("the client address", addr)?;
        // SAFETY: a connected handle; librados only reads the string, which outlives the
        // call (the API takes `char *` for historical reasons).
        let rc =
            unsafe { ffi::rados_blocklist_add(self.handle, a.as_ptr().cast_mut(), expire_secs) };
        check("rados_blocklist_add", rc)?;
        // SAFETY: a connected handle.
        check("rados_wait_for_latest_osdmap", unsafe {
            ffi::rados_wait_for_latest_osdmap(self.handle)
        })
        .map(drop)
    }

    /// An I/O context on `pool`.
    pub fn ioctx(self: &Arc<Self>, pool: &str) -> io::Result<Arc<IoCtx>> {
        let name = c_string("the pool name", pool)?;
        let mut handle: ffi::rados_ioctx_t = ptr::null_mut();
        // SAFETY: a connected handle; `name` is NUL-terminated; `handle` is a valid place.
        let rc = unsafe { ffi::rados_ioctx_create(self.handle, name.as_ptr(), &mut handle) };
        check("rados_ioctx_create", rc)?;
        Ok(Arc::new(IoCtx {
            handle,
            pool: pool.into(),
            _cluster: self.clone(),
        }))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle was created by rados_create and is shut down once; every I/O
        // context holds an `Arc` of this cluster, so none is left.
        unsafe { ffi::rados_shutdown(self.handle) };
    }
}

fn path_c_string(p: &Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: a path with a NUL byte", p.display()),
        )
    })
}

/// An I/O context on one pool; keeps its cluster connected.
pub struct IoCtx {
    handle: ffi::rados_ioctx_t,
    pool: String,
    _cluster: Arc<Cluster>,
}

// SAFETY: librbd only reads the context when it opens or creates an image (it keeps its own
// copy), and librados I/O contexts may be used from several threads for I/O; nothing here
// changes the context's settings after creation.
unsafe impl Send for IoCtx {}
// SAFETY: as above.
unsafe impl Sync for IoCtx {}

impl IoCtx {
    pub fn pool(&self) -> &str {
        &self.pool
    }

    pub(crate) fn raw(&self) -> ffi::rados_ioctx_t {
        self.handle
    }
}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: created by rados_ioctx_create and destroyed once; images opened with it
        // hold an `Arc` of it, so none is left.
        unsafe { ffi::rados_ioctx_destroy(self.handle) };
    }
}
