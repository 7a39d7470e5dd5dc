//! `x-thinblk-upgrade`: replace the running daemon with a new binary, keeping every socket
//! (`daemon/upgrade.rs`). The reply comes before the exec; the client's connection then
//! closes, and the control socket answers again from the new process.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{json, Value};

use super::args;
use crate::control::protocol::QmpError;
use crate::daemon::state::State;
use crate::daemon::upgrade;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Upgrade {
    /// The binary to exec; default: the path the daemon was started from.
    binary: Option<PathBuf>,
}

pub(super) fn x_thinblk_upgrade(_state: &State, v: Value) -> Result<Value, QmpError> {
    let a: Upgrade = args(v)?;
    upgrade::request(a.binary).map_err(|e| QmpError::generic(e.to_string()))?;
    Ok(json!({}))
}
