//! A standby's pool on RBD (`serve --standby`): `query-pool` while standing by, and
//! `pool-take-over`, which fences the pool's owner and opens the pool here.

use serde_json::{json, Value};

use super::{args, NoArgs};
use crate::control::protocol::QmpError;
use crate::daemon::standby::TakeOverError;
use crate::daemon::state::State;

/// `query-pool` of a daemon standing by: mode `standby`, the images, and who holds their
/// locks (`owners`, distinct client addresses; empty: the pool is free).
pub(super) fn standby_status(state: &State) -> Option<Result<Value, QmpError>> {
    let standby = state.standby()?;
    if state.thin().is_some() {
        // Taken over: the pool answers.
        return None;
    }
    let (metadata, data) = standby.images();
    Some(
        standby
            .owners()
            .map(|images| {
                let mut owners: Vec<&String> = images.iter().flat_map(|i| &i.owners).collect();
                owners.sort();
                owners.dedup();
                json!({
                    "mode": "standby",
                    "metadata": format!("rbd:{metadata}"),
                    "data": format!("rbd:{data}"),
                    "owners": owners,
                    "images": images.iter().map(|i| json!({
                        "image": format!("rbd:{}", i.image),
                        "exists": i.exists,
                        "owners": i.owners,
                    })).collect::<Vec<_>>(),
                })
            })
            .map_err(|e| QmpError::generic(format!("pool on RBD (standing by): {e}"))),
    )
}

/// Fences the owner of the pool this daemon stands by for (blocklisting its Ceph client,
/// breaking its locks), opens the pool at its last commit and starts the thin exports that
/// waited for it. Returns the fenced owners and the exports started (and those that failed).
pub(super) fn pool_take_over(state: &State, v: Value) -> Result<Value, QmpError> {
    let NoArgs {} = args(v)?;
    let Some(standby) = state.standby() else {
        let why = if state.thin().is_some() {
            "this daemon owns its pool already (pool-take-over is for a daemon started with \
             --standby)"
        } else {
            "this daemon has no pool on RBD to take over (serve --metadata rbd:POOL/IMAGE \
             --data rbd:POOL/IMAGE --standby)"
        };
        return Err(QmpError::generic(why));
    };
    match standby.take_over() {
        Ok(done) => Ok(json!({
            "fenced": done.fenced,
            "exports": done.exports,
            "failed-exports": done.failed.iter().map(|(id, why)| json!({
                "id": id,
                "error": why,
            })).collect::<Vec<_>>(),
        })),
        Err(e @ TakeOverError::AlreadyOwner) => Err(QmpError::generic(format!(
            "{e} (taken over since this daemon started)"
        ))),
        Err(e) => Err(QmpError::generic(e.to_string())),
    }
}
