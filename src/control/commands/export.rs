//! Exports: a block node served on a vhost-user-blk socket.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{json, Value};

use super::{args, NoArgs};
use crate::control::protocol::QmpError;
use crate::daemon::state::{socket_path_is_valid, ExportConfig, State};
use crate::export_spec::{
    DEFAULT_POLL_US, DEFAULT_QUEUES, DEFAULT_QUEUE_SIZE, DEFAULT_SUBMIT_BATCH, MAX_POLL_US,
};
use crate::vhost::{MAX_QUEUES, MAX_QUEUE_SIZE};

pub(super) fn query_block_exports(state: &State, v: Value) -> Result<Value, QmpError> {
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
    #[serde(rename = "poll-us")]
    poll_us: Option<u32>,
    #[serde(rename = "submit-batch")]
    submit_batch: Option<u16>,
}

pub(super) fn block_export_add(state: &State, v: Value) -> Result<Value, QmpError> {
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
    let poll_us = a.poll_us.unwrap_or(DEFAULT_POLL_US);
    if poll_us > MAX_POLL_US {
        return Err(QmpError::generic(format!(
            "poll-us must be 0 to {MAX_POLL_US}"
        )));
    }
    let submit_batch = a.submit_batch.unwrap_or(DEFAULT_SUBMIT_BATCH);
    if submit_batch == 0 || submit_batch > MAX_QUEUE_SIZE {
        return Err(QmpError::generic(format!(
            "submit-batch must be 1 to {MAX_QUEUE_SIZE}"
        )));
    }
    state.add_export(ExportConfig {
        id: a.id,
        node: a.node_name,
        socket: path,
        writable: a.writable,
        num_queues,
        queue_size,
        poll_us,
        submit_batch,
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

pub(super) fn block_export_del(state: &State, v: Value) -> Result<Value, QmpError> {
    let a: ExportDel = args(v)?;
    if let Some(m) = a.mode.as_deref().filter(|m| !matches!(*m, "safe" | "hard")) {
        return Err(QmpError::generic(format!("mode '{m}' is not safe or hard")));
    }
    state.remove_export(&a.id)?;
    Ok(json!({}))
}
