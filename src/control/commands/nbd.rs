//! The NBD server, with QEMU's command names and arguments: `nbd-server-start`,
//! `nbd-server-add`, `nbd-server-remove`, `nbd-server-stop`.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{json, Value};

use super::{args, NoArgs};
use crate::control::protocol::QmpError;
use crate::daemon::nbd::{NbdExportConfig, NbdStateError};
use crate::daemon::state::{socket_path_is_valid, State};
use crate::nbd::{NbdAddr, NbdError};

impl From<NbdStateError> for QmpError {
    fn from(e: NbdStateError) -> Self {
        match e {
            NbdStateError::State(s) => s.into(),
            NbdStateError::Nbd(NbdError::NoExport(_)) => QmpError::not_found(e.to_string()),
            _ => QmpError::generic(e.to_string()),
        }
    }
}

/// QEMU's SocketAddressLegacy (`{"type": "unix", "data": {"path": ...}}`), as
/// `nbd-server-start` takes it; the flat SocketAddress form is accepted too.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "lowercase")]
enum FlatAddr {
    Unix { path: PathBuf },
    Inet { host: String, port: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyAddr {
    #[serde(rename = "type")]
    kind: String,
    data: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Start {
    addr: Value,
    #[serde(rename = "max-connections")]
    #[allow(dead_code)]
    max_connections: Option<u32>,
    #[serde(rename = "tls-creds")]
    tls_creds: Option<String>,
}

fn address(v: Value) -> Result<NbdAddr, QmpError> {
    let flat: FlatAddr = if v.get("data").is_some() {
        let l: LegacyAddr = args(v)?;
        let mut data = l.data;
        if let Value::Object(m) = &mut data {
            m.insert("type".into(), Value::String(l.kind));
        }
        args(data)?
    } else {
        args(v)?
    };
    match flat {
        FlatAddr::Unix { path } if socket_path_is_valid(&path) => Ok(NbdAddr::Unix(path)),
        FlatAddr::Unix { path } => Err(QmpError::generic(format!(
            "'{}' cannot be a unix socket path",
            path.display()
        ))),
        FlatAddr::Inet { host, port } => Ok(NbdAddr::Tcp(format!("{host}:{port}"))),
    }
}

pub(super) fn nbd_server_start(state: &State, v: Value) -> Result<Value, QmpError> {
    let a: Start = args(v)?;
    if a.tls_creds.is_some() {
        return Err(QmpError::generic(
            "TLS is not supported: serve NBD on a unix socket or a trusted network",
        ));
    }
    state.nbd().start(address(a.addr)?)?;
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Add {
    device: String,
    name: Option<String>,
    description: Option<String>,
    #[serde(default)]
    writable: bool,
    bitmap: Option<String>,
}

pub(super) fn nbd_server_add(state: &State, v: Value) -> Result<Value, QmpError> {
    let a: Add = args(v)?;
    if a.name.as_ref().is_some_and(|n| n.len() > 4096) {
        return Err(QmpError::generic("invalid arguments: 'name' is too long"));
    }
    state.nbd().add(
        state,
        NbdExportConfig {
            device: a.device,
            name: a.name,
            description: a.description,
            writable: a.writable,
            bitmap: a.bitmap,
        },
    )?;
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Remove {
    name: String,
    mode: Option<String>,
}

pub(super) fn nbd_server_remove(state: &State, v: Value) -> Result<Value, QmpError> {
    let a: Remove = args(v)?;
    let hard = match a.mode.as_deref() {
        None | Some("safe") => false,
        Some("hard") => true,
        Some(m) => return Err(QmpError::generic(format!("mode '{m}' is not safe or hard"))),
    };
    state.nbd().remove(&a.name, hard)?;
    Ok(json!({}))
}

pub(super) fn nbd_server_stop(state: &State, v: Value) -> Result<Value, QmpError> {
    let NoArgs {} = args(v)?;
    state.nbd().stop()?;
    Ok(json!({}))
}

/// The NBD exports as `query-block-exports` lists them (type "nbd", id = export name).
pub(super) fn nbd_exports(state: &State) -> Vec<Value> {
    let Some((addr, exports)) = state.nbd().list() else {
        return Vec::new();
    };
    exports
        .into_iter()
        .map(|e| {
            json!({
                "type": "nbd",
                "id": e.name,
                "node-name": e.node,
                "shutting-down": false,
                "addr": addr,
                "writable": e.writable,
                "bitmap": e.bitmap,
            })
        })
        .collect()
}
