//! QMP messages: the greeting, replies, errors and events, each one JSON object plus CRLF.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

/// The QEMU version thinblk's QMP dialect follows (qmp-shell needs a `qemu` version object).
pub const QEMU_VERSION: (u32, u32, u32) = (7, 2, 0);

/// QMP error classes, as QEMU names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotFound,
    DeviceNotActive,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
        }
    }
}

/// A command's failure, as the client will see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }
    pub fn not_found(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::DeviceNotFound,
            desc: desc.into(),
        }
    }
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::CommandNotFound,
            desc: desc.into(),
        }
    }
}

pub fn version_object() -> Value {
    let (major, minor, micro) = QEMU_VERSION;
    json!({
        "qemu": {"major": major, "minor": minor, "micro": micro},
        "package": format!("thinblk {}", env!("CARGO_PKG_VERSION")),
    })
}

pub fn greeting() -> Value {
    json!({"QMP": {"version": version_object(), "capabilities": []}})
}

/// A reply, echoing the command's id unchanged when it had one.
pub fn reply(result: Result<Value, QmpError>, id: Option<Value>) -> Value {
    let mut m = Map::new();
    match result {
        Ok(v) => {
            m.insert("return".into(), v);
        }
        Err(e) => {
            m.insert(
                "error".into(),
                json!({"class": e.class.as_str(), "desc": e.desc}),
            );
        }
    }
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

pub fn event(name: &str, data: Value) -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    event_at(name, data, now)
}

/// An event that happened `time` after the Unix epoch.
pub fn event_at(name: &str, data: Value, time: Duration) -> Value {
    let now = time;
    json!({
        "event": name,
        "data": data,
        "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
    })
}

/// The wire form: compact JSON followed by CRLF.
pub fn encode(v: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    out.extend_from_slice(b"\r\n");
    out
}
