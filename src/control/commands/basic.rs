//! Negotiation, versions, the command list and the block nodes.

use serde::Deserialize;
use serde_json::{json, Value};

use super::{args, NoArgs, COMMANDS};
use crate::control::protocol::{version_object, QmpError};
use crate::daemon::state::State;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Capabilities {
    #[serde(default)]
    #[allow(dead_code)]
    enable: Vec<String>,
}

pub(super) fn qmp_capabilities(_: &State, v: Value) -> Result<Value, QmpError> {
    let caps: Capabilities = args(v)?;
    if let Some(c) = caps.enable.first() {
        return Err(QmpError::generic(format!(
            "capability '{c}' is not supported"
        )));
    }
    Err(QmpError::command_not_found(
        "capabilities negotiation is already complete, command ignored",
    ))
}

pub(super) fn query_version(_: &State, v: Value) -> Result<Value, QmpError> {
    let NoArgs {} = args(v)?;
    Ok(version_object())
}

pub(super) fn query_commands(_: &State, v: Value) -> Result<Value, QmpError> {
    let NoArgs {} = args(v)?;
    Ok(Value::Array(
        COMMANDS.iter().map(|(n, _)| json!({ "name": n })).collect(),
    ))
}

pub(super) fn query_named_block_nodes(state: &State, v: Value) -> Result<Value, QmpError> {
    let NoArgs {} = args(v)?;
    let mut out = Vec::new();
    for name in state.node_names() {
        let node = state.node(&name)?;
        out.push(json!({
            "node-name": name,
            "ro": node.read_only,
            "image": {"virtual-size": node.dev.size()},
        }));
    }
    Ok(Value::Array(out))
}
