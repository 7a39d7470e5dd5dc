//! Exports: a block node served on a vhost-user-blk socket.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{json, Value};

use super::{args, NoArgs};
use crate::control::protocol::QmpError;
use crate::daemon::export_settings::ExportSettings;
use crate::daemon::state::{socket_path_is_valid, ExportConfig, State};
use crate::socket_access::{self, SocketAccess};

pub(super) fn query_block_exports(state: &State, v: Value) -> Result<Value, QmpError> {
    let NoArgs {} = args(v)?;
    let mut all: Vec<Value> = state
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
                "num-queues": e.settings.num_queues,
                // thinblk: whether this export runs its node now (of several exports of
                // one node, as in a migration, at most one does).
                "active": state.export_active(&e.id),
            })
        })
        .collect();
    all.extend(super::nbd::nbd_exports(state));
    Ok(Value::Array(all))
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
    /// Octal, as a string ("0660"); thinblk's own, like the two below.
    #[serde(rename = "socket-mode")]
    socket_mode: Option<String>,
    /// A user name or number, as a string.
    #[serde(rename = "socket-owner")]
    socket_owner: Option<String>,
    /// A group name or number, as a string.
    #[serde(rename = "socket-group")]
    socket_group: Option<String>,
    /// Start it again after a restart (saved beside the pool); thinblk's own.
    persistent: Option<bool>,
}

/// The socket's owner, group and mode as asked (unset ones take the daemon's defaults).
fn socket_access(a: &ExportAdd) -> Result<SocketAccess, QmpError> {
    let bad = |key: &str, e: socket_access::AccessError| {
        QmpError::generic(format!("invalid arguments: '{key}': {e}"))
    };
    Ok(SocketAccess {
        mode: a
            .socket_mode
            .as_deref()
            .map(|m| socket_access::parse_mode(m).map_err(|e| bad("socket-mode", e)))
            .transpose()?,
        owner: a
            .socket_owner
            .as_deref()
            .map(|u| socket_access::parse_user(u).map_err(|e| bad("socket-owner", e)))
            .transpose()?,
        group: a
            .socket_group
            .as_deref()
            .map(|g| socket_access::parse_group(g).map_err(|e| bad("socket-group", e)))
            .transpose()?,
    })
}

pub(super) fn block_export_add(state: &State, v: Value) -> Result<Value, QmpError> {
    let a: ExportAdd = args(v)?;
    if a.kind != "vhost-user-blk" {
        return Err(QmpError::generic(format!(
            "export type '{}' is not supported (only vhost-user-blk)",
            a.kind
        )));
    }
    let access = socket_access(&a)?;
    let SocketAddress::Unix { path } = a.addr;
    if !socket_path_is_valid(&path) {
        return Err(QmpError::generic(format!(
            "'{}' cannot be a unix socket path",
            path.display()
        )));
    }
    let defaults = ExportSettings::default();
    let settings = ExportSettings {
        num_queues: a.num_queues.unwrap_or(defaults.num_queues),
        queue_size: a.queue_size.unwrap_or(defaults.queue_size),
        poll_us: a.poll_us.unwrap_or(defaults.poll_us),
        submit_batch: a.submit_batch.unwrap_or(defaults.submit_batch),
    };
    settings.validate().map_err(|e| {
        QmpError::generic(format!(
            "invalid arguments: '{}': {}",
            e.setting.qmp_key(),
            e.rule
        ))
    })?;
    let config = ExportConfig {
        id: a.id,
        node: a.node_name,
        socket: path,
        writable: a.writable,
        settings,
        access,
    };
    if a.persistent.unwrap_or(true) {
        state.add_saved_export(config)?;
    } else {
        state.add_export(config)?;
    }
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
