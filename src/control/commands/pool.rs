//! The thin pool as a whole: its space, mode and low-water mark, and the metadata snapshot.

use serde::Deserialize;
use serde_json::{json, Value};

use super::{args, thin, NoArgs};
use crate::control::protocol::QmpError;
use crate::daemon::state::State;

pub(super) fn query_pool(state: &State, v: Value) -> Result<Value, QmpError> {
    let NoArgs {} = args(v)?;
    if let Some(standing_by) = super::take_over::standby_status(state) {
        return standing_by;
    }
    let thin = thin(state)?;
    let pool = thin.pool();
    let mode = pool.mode();
    let meta = pool.meta();
    Ok(json!({
        "mode": mode.as_str(),
        "block-size": pool.block_size(),
        "data-blocks": meta.data_dev_size(),
        "data-free-blocks": meta.free_data_blocks(),
        "metadata-blocks": meta.metadata_dev_size(),
        "metadata-free-blocks": meta.free_metadata_blocks(),
        "metadata-block-size": 4096,
        "transaction-id": meta.transaction_id(),
        "needs-check": meta.needs_check(),
        "metadata-snap": meta.metadata_snap().is_some(),
        "metadata-snap-block": meta.metadata_snap(),
        "data-low-water": pool.data_low_water(),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LowWater {
    blocks: u64,
}

/// THIN_POOL_LOW_SPACE is sent once when free data blocks drop below `blocks` (0: never);
/// setting the mark again re-arms it.
pub(super) fn pool_set_low_water(state: &State, v: Value) -> Result<Value, QmpError> {
    let a: LowWater = args(v)?;
    let pool = thin(state)?.pool();
    let total = pool.meta().data_dev_size();
    if a.blocks > total {
        return Err(QmpError::generic(format!(
            "blocks: {} is more than the pool's {total} data blocks",
            a.blocks
        )));
    }
    pool.set_data_low_water(a.blocks);
    Ok(json!({}))
}

pub(super) fn reserve_metadata_snap(state: &State, v: Value) -> Result<Value, QmpError> {
    let NoArgs {} = args(v)?;
    let block = thin(state)?.reserve_metadata_snap()?;
    Ok(json!({ "metadata-snap-block": block }))
}

pub(super) fn release_metadata_snap(state: &State, v: Value) -> Result<Value, QmpError> {
    let NoArgs {} = args(v)?;
    thin(state)?.release_metadata_snap()?;
    Ok(json!({}))
}
