//! A minimal QMP client for the live-snapshot measurement: thinblk's control socket and
//! qemu-storage-daemon's monitor speak the same protocol (greeting, `qmp_capabilities`, one
//! JSON reply a line, events interleaved).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Qmp {
    /// Connects and negotiates. Servers open their QMP socket after their exports, so a
    /// missing socket is retried for a few seconds.
    pub fn connect(path: &Path) -> Result<Qmp, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let writer = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("QMP {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let reader = BufReader::new(writer.try_clone().map_err(|e| format!("QMP: {e}"))?);
        let mut q = Qmp {
            reader,
            writer,
            next_id: 0,
        };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("QMP: no greeting but {greeting}"));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QMP: the server closed the connection".into()),
            Ok(_) => serde_json::from_str(line.trim()).map_err(|e| format!("QMP: {e}: {line}")),
            Err(e) => Err(format!("QMP: {e}")),
        }
    }

    /// Runs `command` and returns its `return` value; an error reply is an `Err`.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"execute": command, "arguments": arguments, "id": id});
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| e.to_string())?;
        bytes.push(b'\n');
        self.writer
            .write_all(&bytes)
            .map_err(|e| format!("QMP: {e}"))?;
        loop {
            let v = self.read()?;
            if v.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(e) = v.get("error") {
                let desc = e.get("desc").and_then(Value::as_str).unwrap_or("error");
                return Err(format!("{command}: {desc}"));
            }
            return Ok(v.get("return").cloned().unwrap_or(Value::Null));
        }
    }
}
