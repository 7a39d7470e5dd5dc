//! `block-set-io-throttle`: an export's I/O limits, with QEMU's arguments and checks.

use serde::Deserialize;
use serde_json::{json, Value};

use super::args;
use crate::control::protocol::QmpError;
use crate::daemon::state::{State, ThrottleError};
use crate::daemon::throttle::{Limit, Limits, BUCKETS};

/// QEMU's `BlockIOThrottle`. The six averages are required there, so here too.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IoThrottle {
    /// The export's id (QEMU: the device's qdev id).
    id: Option<String>,
    /// The same, under QEMU's deprecated name.
    device: Option<String>,
    bps: u64,
    bps_rd: u64,
    bps_wr: u64,
    iops: u64,
    iops_rd: u64,
    iops_wr: u64,
    bps_max: Option<u64>,
    bps_rd_max: Option<u64>,
    bps_wr_max: Option<u64>,
    iops_max: Option<u64>,
    iops_rd_max: Option<u64>,
    iops_wr_max: Option<u64>,
    bps_max_length: Option<u64>,
    bps_rd_max_length: Option<u64>,
    bps_wr_max_length: Option<u64>,
    iops_max_length: Option<u64>,
    iops_rd_max_length: Option<u64>,
    iops_wr_max_length: Option<u64>,
    iops_size: Option<u64>,
    group: Option<String>,
}

impl IoThrottle {
    fn limits(&self) -> Limits {
        let bucket = |avg: u64, max: Option<u64>, len: Option<u64>| Limit {
            avg,
            max: max.unwrap_or(0),
            burst_length: len.unwrap_or(1),
        };
        // In the order of `throttle::BUCKETS`: bytes total, read, write; then operations.
        let buckets: [Limit; BUCKETS] = [
            bucket(self.bps, self.bps_max, self.bps_max_length),
            bucket(self.bps_rd, self.bps_rd_max, self.bps_rd_max_length),
            bucket(self.bps_wr, self.bps_wr_max, self.bps_wr_max_length),
            bucket(self.iops, self.iops_max, self.iops_max_length),
            bucket(self.iops_rd, self.iops_rd_max, self.iops_rd_max_length),
            bucket(self.iops_wr, self.iops_wr_max, self.iops_wr_max_length),
        ];
        Limits {
            buckets,
            iops_size: self.iops_size.unwrap_or(0),
        }
    }
}

/// Sets (or with every limit zero, lifts) an export's limits; exports naming the same
/// `group` share them.
pub(super) fn block_set_io_throttle(state: &State, v: Value) -> Result<Value, QmpError> {
    let a: IoThrottle = args(v)?;
    let id = match (&a.id, &a.device) {
        (Some(id), None) | (None, Some(id)) => id.clone(),
        _ => return Err(QmpError::generic("Need exactly one of 'id' and 'device'")),
    };
    match state.set_io_throttle(&id, a.group.as_deref(), a.limits()) {
        Ok(()) => Ok(json!({})),
        Err(ThrottleError::NoExport(_)) => {
            Err(QmpError::not_found(format!("Device '{id}' not found")))
        }
        Err(e) => Err(QmpError::generic(e.to_string())),
    }
}
