//! Write thresholds: BLOCK_WRITE_THRESHOLD once a write ends past the mark.

use serde::Deserialize;
use serde_json::{json, Value};

use super::args;
use crate::control::protocol::QmpError;
use crate::daemon::state::State;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Threshold {
    #[serde(rename = "node-name")]
    node_name: String,
    #[serde(rename = "write-threshold")]
    write_threshold: u64,
}

/// Arms (or with 0 disarms) the threshold of a node; it applies to every export of it.
pub(super) fn block_set_write_threshold(state: &State, v: Value) -> Result<Value, QmpError> {
    let a: Threshold = args(v)?;
    state.node(&a.node_name)?;
    state.write_threshold(&a.node_name).set(a.write_threshold);
    Ok(json!({}))
}
