//! `pool-resize`: grows the pool's data and metadata devices while guests run.

use serde::Deserialize;
use serde_json::{json, Value};

use super::{args, thin};
use crate::control::protocol::QmpError;
use crate::daemon::state::State;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolResize {
    /// New size of the data device in bytes (whole blocks count). Absent: the data device's
    /// size is read again (a block device grown underneath, say with lvextend).
    #[serde(rename = "data-size")]
    data_size: Option<u64>,
    /// New size of the metadata device in bytes (whole 4 KiB blocks count); a block device
    /// must already be that big. Absent: unchanged.
    #[serde(rename = "metadata-size")]
    metadata_size: Option<u64>,
}

/// Grows the pool; shrinking either device is refused before anything changes. Writes
/// waiting for data space go on at once, and the low-space events are armed again.
pub(super) fn pool_resize(state: &State, v: Value) -> Result<Value, QmpError> {
    let a: PoolResize = args(v)?;
    let pool = thin(state)?.pool();
    let block = pool.block_size();
    let (data_now, meta_now) = {
        let m = pool.meta();
        (m.data_dev_size() * block, m.metadata_dev_size() * 4096)
    };
    let refuse = |what: &str, now: u64, to: u64| {
        QmpError::generic(format!(
            "{what}-size: cannot shrink the pool's {what} device from {now} to {to} bytes"
        ))
    };
    if let Some(to) = a.data_size.filter(|&to| to / block * block < data_now) {
        return Err(refuse("data", data_now, to));
    }
    if let Some(to) = a.metadata_size.filter(|&to| to / 4096 * 4096 < meta_now) {
        return Err(refuse("metadata", meta_now, to));
    }
    if let Some(bytes) = a.metadata_size {
        pool.resize_metadata(bytes)
            .map_err(|e| QmpError::generic(e.to_string()))?;
    }
    pool.resize_data(a.data_size)
        .map_err(|e| QmpError::generic(e.to_string()))?;
    let m = pool.meta();
    Ok(json!({
        "data-blocks": m.data_dev_size(),
        "metadata-blocks": m.metadata_dev_size(),
    }))
}
