//! The QMP commands: argument decoding (strict: unknown or mistyped keys are errors) and the
//! calls into the daemon state.

use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::protocol::{version_object, QmpError};
use crate::daemon::state::{socket_path_is_valid, ExportConfig, State, StateError};
use crate::export_spec::{DEFAULT_QUEUES, DEFAULT_QUEUE_SIZE};
use crate::vhost::{MAX_QUEUES, MAX_QUEUE_SIZE};

type Handler = fn(&State, Value) -> Result<Value, QmpError>;

/// Every command after negotiation, by name.
pub const COMMANDS: &[(&str, Handler)] = &[
    ("qmp_capabilities", qmp_capabilities),
    ("query-version", query_version),
    ("query-commands", query_commands),
    ("query-block-exports", query_block_exports),
    ("block-export-add", block_export_add),
    ("block-export-del", block_export_del),
    ("query-named-block-nodes", query_named_block_nodes),
];

pub fn find(name: &str) -> Option<Handler> {
    COMMANDS.iter().find(|(n, _)| *n == name).map(|(_, h)| *h)
}

impl From<StateError> for QmpError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::NoNode(_) | StateError::NoExport(_) => QmpError::not_found(e.to_string()),
            _ => QmpError::generic(e.to_string()),
        }
    }
}

/// Decodes `arguments` into `T`, naming the offending key on failure.
fn args<T: DeserializeOwned>(v: Value) -> Result<T, QmpError> {
    serde_json::from_value(v).map_err(|e| QmpError::generic(format!("invalid arguments: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Capabilities {
    #[serde(default)]
    #[allow(dead_code)]
    enable: Vec<String>,
}

fn qmp_capabilities(_: &State, v: Value) -> Result<Value, QmpError> {
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

fn query_version(_: &State, v: Value) -> Result<Value, QmpError> {
    let NoArgs {} = args(v)?;
    Ok(version_object())
}

fn query_commands(_: &State, v: Value) -> Result<Value, QmpError> {
    let NoArgs {} = args(v)?;
    Ok(Value::Array(
        COMMANDS.iter().map(|(n, _)| json!({ "name": n })).collect(),
    ))
}

fn query_named_block_nodes(state: &State, v: Value) -> Result<Value, QmpError> {
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

fn query_block_exports(state: &State, v: Value) -> Result<Value, QmpError> {
    let NoArgs {} = args(v)?;
    Ok(Value::Array(
        state
            .exports()
            .into_iter()
            .map(|e| {
                json!({
                    "type": "vhost-user-blk",
                    "id": e.id,
                    "node-name": e.node,
                    "shutting-down": false,
                    "addr": {"type": "unix", "path": e.socket},
                    "writable": e.writable,
                    "num-queues": e.num_queues,
                })
            })
            .collect(),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "lowercase")]
enum SocketAddress {
    Unix { path: PathBuf },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportAdd {
    #[serde(rename = "type")]
    kind: String,
    id: String,
    #[serde(rename = "node-name")]
    node_name: String,
    addr: SocketAddress,
    #[serde(default)]
    writable: bool,
    #[serde(rename = "num-queues")]
    num_queues: Option<u16>,
    #[serde(rename = "queue-size")]
    queue_size: Option<u16>,
}

fn block_export_add(state: &State, v: Value) -> Result<Value, QmpError> {
    let a: ExportAdd = args(v)?;
    if a.kind != "vhost-user-blk" {
        return Err(QmpError::generic(format!(
            "export type '{}' is not supported (only vhost-user-blk)",
            a.kind
        )));
    }
    let SocketAddress::Unix { path } = a.addr;
    if !socket_path_is_valid(&path) {
        return Err(QmpError::generic(format!(
            "'{}' cannot be a unix socket path",
            path.display()
        )));
    }
    let num_queues = a.num_queues.unwrap_or(DEFAULT_QUEUES);
    if num_queues == 0 || num_queues > MAX_QUEUES {
        return Err(QmpError::generic(format!(
            "num-queues must be 1 to {MAX_QUEUES}"
        )));
    }
    let queue_size = a.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE);
    if !queue_size.is_power_of_two() || queue_size > MAX_QUEUE_SIZE {
        return Err(QmpError::generic(format!(
            "queue-size must be a power of two up to {MAX_QUEUE_SIZE}"
        )));
    }
    state.add_export(ExportConfig {
        id: a.id,
        node: a.node_name,
        socket: path,
        writable: a.writable,
        num_queues,
        queue_size,
    })?;
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportDel {
    id: String,
    #[allow(dead_code)]
    mode: Option<String>,
}

fn block_export_del(state: &State, v: Value) -> Result<Value, QmpError> {
    let a: ExportDel = args(v)?;
    if let Some(m) = a.mode.as_deref().filter(|m| !matches!(*m, "safe" | "hard")) {
        return Err(QmpError::generic(format!("mode '{m}' is not safe or hard")));
    }
    state.remove_export(&a.id)?;
    Ok(json!({}))
}
