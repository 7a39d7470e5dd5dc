//! The QMP commands: strict argument decoding (unknown or mistyped keys are errors naming the
//! key) and the calls into the daemon state. One file per family of commands.

mod basic;
mod cow;
mod decode;
mod export;
mod io_throttle;
mod jobs;
mod mirror;
mod nbd;
mod pool;
mod pool_resize;
mod snapshot;
mod stats;
mod take_over;
mod thin;
mod threshold;
mod upgrade;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::protocol::QmpError;
use crate::daemon::state::{State, StateError};
use crate::engine::thin::{ThinError, VolumeError, Volumes};

type Handler = fn(&State, Value) -> Result<Value, QmpError>;

/// Every command after negotiation, by name.
pub const COMMANDS: &[(&str, Handler)] = &[
    ("qmp_capabilities", basic::qmp_capabilities),
    ("query-version", basic::query_version),
    ("query-commands", basic::query_commands),
    ("query-named-block-nodes", basic::query_named_block_nodes),
    ("query-block-exports", export::query_block_exports),
    ("block-export-add", export::block_export_add),
    ("block-export-del", export::block_export_del),
    ("query-pool", pool::query_pool),
    ("pool-set-low-water", pool::pool_set_low_water),
    ("pool-reserve-metadata-snap", pool::reserve_metadata_snap),
    ("pool-release-metadata-snap", pool::release_metadata_snap),
    ("query-thin-devices", thin::query_thin_devices),
    ("thin-create", thin::thin_create),
    ("thin-delete", thin::thin_delete),
    ("block-resize", thin::block_resize),
    ("thin-delta", thin::thin_delta),
    ("thin-snapshot", snapshot::thin_snapshot),
    (
        "blockdev-snapshot-internal-sync",
        snapshot::blockdev_snapshot_internal_sync,
    ),
    ("transaction", snapshot::transaction),
    (
        "block-set-write-threshold",
        threshold::block_set_write_threshold,
    ),
    ("cow-create", cow::cow_create),
    ("query-cow", cow::query_cow),
    ("cow-merge", cow::cow_merge),
    ("cow-delete", cow::cow_delete),
    ("x-thinblk-upgrade", upgrade::x_thinblk_upgrade),
    ("nbd-server-start", nbd::nbd_server_start),
    ("nbd-server-add", nbd::nbd_server_add),
    ("nbd-server-remove", nbd::nbd_server_remove),
    ("nbd-server-stop", nbd::nbd_server_stop),
    ("query-blockstats", stats::query_blockstats),
    (
        "block-latency-histogram-set",
        stats::block_latency_histogram_set,
    ),
    ("block-set-io-throttle", io_throttle::block_set_io_throttle),
    ("pool-resize", pool_resize::pool_resize),
    ("pool-take-over", take_over::pool_take_over),
    ("query-jobs", jobs::query_jobs),
    ("query-block-jobs", jobs::query_block_jobs),
    ("job-cancel", jobs::job_cancel),
    ("job-complete", jobs::job_complete),
    ("block-job-cancel", jobs::block_job_cancel),
    ("block-job-complete", jobs::block_job_complete),
    ("thin-mirror", mirror::thin_mirror),
];

pub fn find(name: &str) -> Option<Handler> {
    COMMANDS.iter().find(|(n, _)| *n == name).map(|(_, h)| *h)
}

impl From<StateError> for QmpError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::NoNode(_) | StateError::NoExport(_) => QmpError::not_found(e.to_string()),
            StateError::Thin(v) => v.into(),
            _ => QmpError::generic(e.to_string()),
        }
    }
}

impl From<VolumeError> for QmpError {
    fn from(e: VolumeError) -> Self {
        match e {
            VolumeError::NoSuchDisk(_) => QmpError::not_found(e.to_string()),
            _ => QmpError::generic(e.to_string()),
        }
    }
}

impl From<ThinError> for QmpError {
    fn from(e: ThinError) -> Self {
        QmpError::generic(format!("thin pool: {e}"))
    }
}

/// Decodes `arguments` into `T`; an error names the key it is about (see `decode`).
fn args<T: DeserializeOwned>(v: Value) -> Result<T, QmpError> {
    decode::decode(&v).map_err(|e| QmpError::generic(format!("invalid arguments: {e}")))
}

/// The daemon's thin pool, or the error every pool command gives without one.
fn thin(state: &State) -> Result<&Volumes, QmpError> {
    state
        .thin()
        .map(|t| t.as_ref())
        .ok_or_else(|| QmpError::generic("this daemon has no thin pool (serve with --dir)"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Probe {
        name: String,
        size: u64,
        addr: Option<Addr>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Addr {
        path: String,
    }

    fn desc(v: Value) -> String {
        args::<Probe>(v)
            .map(|_| String::new())
            .unwrap_or_else(|e| e.desc)
    }

    #[test]
    fn argument_errors_name_the_key() {
        assert!(desc(json!({"name": "a", "size": "big"})).contains("'size'"));
        assert!(desc(json!({"name": 5, "size": 1})).contains("'name'"));
        // A value of several lines (an object where a string belongs) is named too.
        let d = desc(json!({"name": {"first": 1, "second": 2}, "size": 1}));
        assert!(d.contains("'name'"), "{d}");
        let d = desc(json!({"name": "a", "size": [1, 2]}));
        assert!(d.contains("'size'"), "{d}");
        assert!(desc(json!({"name": "a", "size": 1, "addr": {"path": 1}})).contains("'addr.path'"));
        assert!(desc(json!({"name": "a"})).contains("`size`"));
        let unknown = desc(json!({"name": "a", "size": 1, "colour": 1}));
        assert!(
            unknown.contains("`colour`") && !unknown.contains("'colour'"),
            "{unknown}"
        );
        assert!(!desc(json!({"name": "a", "size": 1})).contains("invalid"));
    }
}
