//! The few librados calls thinblk needs, declared by hand: `rbd-sys` binds librbd only.
//! Signatures as in `/usr/include/rados/librados.h` (librados 2, Ceph 16).

use std::os::raw::{c_char, c_int};

pub use rbd_sys::{rados_ioctx_t, rados_t};

#[link(name = "rados")]
extern "C" {
    /// Creates a cluster handle for the user `client.ID` (NULL: `client.admin`).
    pub fn rados_create(cluster: *mut rados_t, id: *const c_char) -> c_int;
    /// Reads a configuration file (NULL: `$CEPH_CONF`, then the usual places).
    pub fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
    /// Sets one configuration option; it wins over the file.
    pub fn rados_conf_set(cluster: rados_t, option: *const c_char, value: *const c_char) -> c_int;
    pub fn rados_connect(cluster: rados_t) -> c_int;
    /// Disconnects and frees the handle, connected or not.
    pub fn rados_shutdown(cluster: rados_t);
    /// This client's instance id: the N of `client.N` in lock owners and blocklists.
    pub fn rados_get_instance_id(cluster: rados_t) -> u64;
    /// This client's addresses as text, in a buffer freed with `rados_buffer_free`.
    pub fn rados_getaddrs(cluster: rados_t, addrs: *mut *mut c_char) -> c_int;
    pub fn rados_buffer_free(buf: *mut c_char);
    /// Blocklists a client address (`IP:PORT/NONCE`) for `expire_seconds` (0: the cluster's
    /// default): the OSDs refuse its I/O from the next osdmap on.
    pub fn rados_blocklist_add(
        cluster: rados_t,
        client_address: *mut c_char,
        expire_seconds: u32,
    ) -> c_int;
    /// Waits until this client has the newest osdmap (so a blocklist entry it added is in
    /// force for its own requests' view).
    pub fn rados_wait_for_latest_osdmap(cluster: rados_t) -> c_int;
    pub fn rados_ioctx_create(
        cluster: rados_t,
        pool_name: *const c_char,
        ioctx: *mut rados_ioctx_t,
    ) -> c_int;
    pub fn rados_ioctx_destroy(io: rados_ioctx_t);
}
