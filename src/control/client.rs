//! `thinblk ctl`: a small QMP client for scripts and people. It negotiates capabilities,
//! runs one command and prints the reply's `return` as JSON (exit status 1 on an error
//! reply), or with `--events` prints every event as it arrives.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use serde_json::{json, Map, Value};

/// The socket `thinblk serve` opens when run with no options.
pub const DEFAULT_SOCKET: &str = "thinblk-pool/control.sock";

#[derive(clap::Args, Debug)]
pub struct CtlArgs {
    /// The daemon's QMP socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,

    /// Print events (one JSON object a line) until the daemon goes away or Ctrl-C.
    #[arg(long, conflicts_with_all = ["command", "args"])]
    pub events: bool,

    /// The command's arguments as one JSON object; key=value pairs are added to it.
    #[arg(long, value_name = "JSON")]
    pub args: Option<String>,

    /// The QMP command, e.g. query-pool, thin-create, thin-snapshot (query-commands lists them).
    #[arg(required_unless_present = "events")]
    pub command: Option<String>,

    /// Arguments as key=value. A value that is a JSON number, boolean, array or object is
    /// passed as such, anything else as a string; a dotted key (addr.path=...) builds nested
    /// objects.
    #[arg(value_name = "KEY=VALUE")]
    pub pairs: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon closed the connection")]
    Closed,
    #[error("the daemon sent something that is not JSON: {0}")]
    BadJson(#[from] serde_json::Error),
    #[error("{0}")]
    BadArgument(String),
    #[error("qmp_capabilities failed: {0}")]
    Negotiation(Value),
}

/// Parses `key=value` pairs into `into`.
pub fn add_pairs(into: &mut Map<String, Value>, pairs: &[String]) -> Result<(), ClientError> {
    for p in pairs {
        let (key, raw) = p
            .split_once('=')
            .ok_or_else(|| ClientError::BadArgument(format!("'{p}' is not key=value")))?;
        if key.is_empty() {
            return Err(ClientError::BadArgument(format!("'{p}' has an empty key")));
        }
        let value = match serde_json::from_str::<Value>(raw) {
            Ok(v @ (Value::Number(_) | Value::Bool(_) | Value::Array(_) | Value::Object(_))) => v,
            _ => Value::String(raw.to_string()),
        };
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop().unwrap_or(key);
        let mut obj = &mut *into;
        for part in parts {
            let slot = obj
                .entry(part.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            obj = slot.as_object_mut().ok_or_else(|| {
                ClientError::BadArgument(format!("'{part}' in '{key}' is not an object"))
            })?;
        }
        obj.insert(last.to_string(), value);
    }
    Ok(())
}

struct Connection {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Connection {
    fn open(path: &PathBuf) -> Result<Self, ClientError> {
        let writer = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        let reader = BufReader::new(writer.try_clone()?);
        let mut c = Connection { reader, writer };
        c.next()?; // the greeting
        let reply = c.execute("qmp_capabilities", json!({}))?;
        if let Some(err) = reply.get("error") {
            return Err(ClientError::Negotiation(err.clone()));
        }
        Ok(c)
    }

    fn next(&mut self) -> Result<Value, ClientError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(ClientError::Closed);
        }
        Ok(serde_json::from_str(line.trim_end())?)
    }

    /// Sends a command and returns its reply, skipping events that arrive first.
    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, ClientError> {
        let id = "thinblk-ctl";
        let msg = json!({"execute": command, "arguments": arguments, "id": id});
        self.writer.write_all(&serde_json::to_vec(&msg)?)?;
        loop {
            let v = self.next()?;
            if v.get("id").and_then(Value::as_str) == Some(id) {
                return Ok(v);
            }
        }
    }
}

fn print(v: &Value) -> Result<(), ClientError> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string_pretty(v)?)?;
    out.flush()?;
    Ok(())
}

/// Runs `thinblk ctl`; returns the exit status (1 when the daemon answered with an error).
pub fn run(a: &CtlArgs) -> Result<i32, ClientError> {
    let mut conn = Connection::open(&a.socket)?;
    if a.events {
        loop {
            let v = conn.next()?;
            if v.get("event").is_some() {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{}", serde_json::to_string(&v)?)?;
                out.flush()?;
            }
        }
    }
    let mut arguments = match &a.args {
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(m)) => m,
            Ok(_) => {
                return Err(ClientError::BadArgument(
                    "--args must be a JSON object".into(),
                ))
            }
            Err(e) => return Err(ClientError::BadArgument(format!("--args: {e}"))),
        },
        None => Map::new(),
    };
    add_pairs(&mut arguments, &a.pairs)?;
    let command = a.command.as_deref().unwrap_or("query-commands");
    let reply = conn.execute(command, Value::Object(arguments))?;
    if let Some(err) = reply.get("error") {
        let class = err.get("class").and_then(Value::as_str).unwrap_or("Error");
        let desc = err.get("desc").and_then(Value::as_str).unwrap_or("");
        eprintln!("{command}: {class}: {desc}");
        return Ok(1);
    }
    print(reply.get("return").unwrap_or(&Value::Null))?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_become_typed_and_nested_arguments() {
        let mut m = Map::new();
        let pairs: Vec<String> = ["name=vm1", "size=1048576", "force=true", "addr.path=/s"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        add_pairs(&mut m, &pairs).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            Value::Object(m),
            json!({"name": "vm1", "size": 1048576, "force": true, "addr": {"path": "/s"}})
        );
    }

    #[test]
    fn a_pair_without_equals_is_an_error() {
        let mut m = Map::new();
        assert!(add_pairs(&mut m, &["oops".to_string()]).is_err());
    }
}
