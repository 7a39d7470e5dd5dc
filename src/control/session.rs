//! One QMP client connection: greeting, capabilities negotiation, then commands.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;

use log::{debug, warn};
use serde_json::{json, Map, Value};

use super::commands;
use super::json_stream::{next_piece, Piece};
use super::protocol::{encode, greeting, reply, QmpError};
use super::writer::ClientWriter;
use crate::daemon::events::Subscription;
use crate::daemon::state::State;

struct Session {
    state: Arc<State>,
    writer: ClientWriter,
    /// Set once `qmp_capabilities` succeeded: the client's events and their writer thread.
    events: Option<(Subscription, Option<JoinHandle<()>>)>,
}

/// Serves one client until it hangs up.
pub fn run(state: Arc<State>, stream: UnixStream) {
    let mut reader = match stream.try_clone() {
        Ok(r) => r,
        Err(e) => {
            warn!("control: cannot clone client socket: {e}");
            return;
        }
    };
    let mut s = Session {
        state,
        writer: ClientWriter::new(stream),
        events: None,
    };
    if s.send(&greeting()).is_err() {
        return;
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    'conn: loop {
        loop {
            let step = next_step(&mut buf);
            if let Step::Reply(v) | Step::Close(v) = &step {
                if s.send(v).is_err() {
                    break 'conn;
                }
            }
            match step {
                Step::Text(text) => {
                    if s.handle(&text).is_err() {
                        break 'conn;
                    }
                }
                Step::Reply(_) => {}
                Step::Wait => break,
                Step::Close(_) => break 'conn,
            }
        }
        match reader.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or(&[])),
        }
    }
    if let Some((sub, thread)) = s.events.take() {
        s.state.events().unsubscribe(sub.token);
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
    debug!("control: client gone");
}

/// What the read loop does next with its buffered bytes.
enum Step {
    /// A complete JSON text, taken off the buffer, to be answered.
    Text(Vec<u8>),
    /// Bytes that were dropped, and the error to send for them.
    Reply(Value),
    /// Read more.
    Wait,
    /// Send this and hang up.
    Close(Value),
}

fn next_step(buf: &mut Vec<u8>) -> Step {
    match next_piece(buf) {
        Piece::Text(n) => Step::Text(buf.drain(..n).collect()),
        Piece::Garbage(n) => {
            buf.drain(..n);
            let err = QmpError::generic("JSON parse error, unexpected character");
            Step::Reply(reply(Err(err), None))
        }
        Piece::Incomplete => Step::Wait,
        Piece::TooLong => {
            let err = QmpError::generic("JSON text too long; closing the connection");
            Step::Close(reply(Err(err), None))
        }
    }
}

/// The replies a client sending `input` and then waiting would get (greeting and events
/// left out), with the same framing and negotiation as a connection but no socket: the seam
/// for fuzzing and tests.
pub fn replies(state: &State, input: &[u8]) -> Vec<Value> {
    let mut buf = input.to_vec();
    let mut negotiated = false;
    let mut out = Vec::new();
    loop {
        match next_step(&mut buf) {
            Step::Text(text) => out.push(respond(state, &mut negotiated, &text)),
            Step::Reply(v) => out.push(v),
            Step::Wait => break,
            Step::Close(v) => {
                out.push(v);
                break;
            }
        }
    }
    out
}

/// The reply to one JSON text. `negotiated` tells whether `qmp_capabilities` has succeeded;
/// it is set when this text completes the negotiation.
fn respond(state: &State, negotiated: &mut bool, text: &[u8]) -> Value {
    let parsed: Result<Value, _> = serde_json::from_slice(text);
    let value = match parsed {
        Ok(v) => v,
        Err(e) => {
            let err = QmpError::generic(format!("JSON parse error, {e}"));
            return reply(Err(err), None);
        }
    };
    let Command { name, args, id } = match frame(value) {
        Ok(f) => f,
        Err((err, id)) => return reply(Err(err), id),
    };
    debug!("control: {name} {args}");
    let result = if *negotiated {
        match commands::find(&name) {
            Some(handler) => handler(state, args),
            None => Err(QmpError::command_not_found(format!(
                "The command {name} has not been found"
            ))),
        }
    } else {
        let r = negotiate(&name, args);
        *negotiated = r.is_ok();
        r
    };
    reply(result, id)
}

/// Before `qmp_capabilities`, nothing else runs and no events are sent.
fn negotiate(name: &str, args: Value) -> Result<Value, QmpError> {
    if name != "qmp_capabilities" {
        return Err(QmpError::command_not_found(
            "Expecting capabilities negotiation with 'qmp_capabilities'",
        ));
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Caps {
        #[serde(default)]
        enable: Vec<String>,
    }
    let caps: Caps = serde_json::from_value(args)
        .map_err(|e| QmpError::generic(format!("invalid arguments: {e}")))?;
    if let Some(c) = caps.enable.first() {
        return Err(QmpError::generic(format!(
            "capability '{c}' is not supported"
        )));
    }
    Ok(json!({}))
}

/// A command object whose shape has been checked.
struct Command {
    name: String,
    args: Value,
    id: Option<Value>,
}

/// A shape error, with the id to echo if the object had one.
type FrameError = (QmpError, Option<Value>);

fn frame(v: Value) -> Result<Command, FrameError> {
    let Value::Object(mut m) = v else {
        return Err((QmpError::generic("QMP input must be a JSON object"), None));
    };
    let id = m.remove("id");
    let fail = |desc: String, id: &Option<Value>| Err((QmpError::generic(desc), id.clone()));
    if let Some(k) = m
        .keys()
        .find(|k| !matches!(k.as_str(), "execute" | "arguments"))
    {
        return fail(format!("QMP input member '{k}' is unexpected"), &id);
    }
    let name = match m.remove("execute") {
        Some(Value::String(s)) => s,
        Some(_) => return fail("QMP input member 'execute' must be a string".into(), &id),
        None => return fail("QMP input lacks member 'execute'".into(), &id),
    };
    let args = match m.remove("arguments") {
        Some(a @ Value::Object(_)) => a,
        Some(_) => return fail("QMP input member 'arguments' must be an object".into(), &id),
        None => Value::Object(Map::new()),
    };
    Ok(Command { name, args, id })
}

impl Session {
    /// Waits for the client to read the reply, unless it is being dropped for falling behind
    /// on its events.
    fn send(&self, v: &Value) -> std::io::Result<()> {
        let queue = self.events.as_ref().map(|(sub, _)| sub.queue.clone());
        self.writer.send(&encode(v), || {
            queue.as_ref().is_some_and(|q| q.overflowed())
        })
    }

    fn handle(&mut self, text: &[u8]) -> std::io::Result<()> {
        let mut negotiated = self.events.is_some();
        let answer = respond(&self.state, &mut negotiated, text);
        if negotiated && self.events.is_none() {
            let sub = self.state.events().subscribe();
            let thread = match self.writer.spawn_events(&sub) {
                Ok(t) => Some(t),
                Err(e) => {
                    warn!("control: cannot start an event writer: {e}");
                    self.state.events().unsubscribe(sub.token);
                    None
                }
            };
            self.events = Some((sub, thread));
        }
        self.send(&answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_wait_for_negotiation_and_replies_echo_ids() {
        let state = State::new(None);
        let r = replies(
            &state,
            br#"{"execute":"query-version","id":1}{"execute":"qmp_capabilities"} }
                {"execute":"block-export-del","arguments":{"id":"x"},"id":"d"}"#,
        );
        assert_eq!(r.len(), 4);
        assert_eq!(r[0]["error"]["class"], "CommandNotFound");
        assert_eq!(r[0]["id"], 1);
        assert_eq!(r[1], json!({"return": {}}));
        assert_eq!(r[2]["error"]["class"], "GenericError");
        assert_eq!(r[3]["error"]["class"], "DeviceNotFound");
        assert_eq!(r[3]["id"], "d");
    }
}
