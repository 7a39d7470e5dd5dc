//! Writing to a QMP client: its replies from the session thread, its events from a writer
//! thread of its own that drains the client's queue on the event bus. Only these threads ever
//! wait for the client to read; whoever sends an event never does.

use std::io::{ErrorKind, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, warn};
use parking_lot::Mutex;

use super::protocol::{encode, event_at};
use crate::daemon::events::{EventQueue, Next, Subscription};

/// How long one write waits for the client before the writer looks whether it should give up.
const WRITE_PATIENCE: Duration = Duration::from_millis(100);

/// The sending half of a client connection, shared by its replies and its events.
#[derive(Clone)]
pub struct ClientWriter {
    stream: Arc<Mutex<UnixStream>>,
}

impl ClientWriter {
    pub fn new(stream: UnixStream) -> Self {
        // Writes wake up now and then, so a writer can notice that its client was dropped.
        let _ = stream.set_write_timeout(Some(WRITE_PATIENCE));
        ClientWriter {
            stream: Arc::new(Mutex::new(stream)),
        }
    }

    /// Writes all of `bytes`, waiting for the client as long as it takes unless `give_up`
    /// says to stop (checked whenever the client has not read for a while).
    pub fn send(&self, bytes: &[u8], give_up: impl Fn() -> bool) -> std::io::Result<()> {
        let mut stream = self.stream.lock();
        let mut rest = bytes;
        while !rest.is_empty() {
            match stream.write(rest) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => rest = rest.get(n..).unwrap_or_default(),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if give_up() {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Starts the thread that writes the events of `sub` to this client. It ends when the
    /// queue closes; if the queue overflowed it hangs up on the client.
    pub fn spawn_events(&self, sub: &Subscription) -> std::io::Result<JoinHandle<()>> {
        let writer = self.clone();
        let queue = sub.queue.clone();
        let hangup = self.stream.lock().try_clone()?;
        std::thread::Builder::new()
            .name("qmp-events".into())
            .spawn(move || write_events(&writer, &queue, &hangup))
    }
}

fn write_events(writer: &ClientWriter, queue: &EventQueue, hangup: &UnixStream) {
    loop {
        match queue.next(Duration::from_secs(1)) {
            Next::Event(e) => {
                let bytes = encode(&event_at(e.name, e.data.clone(), e.time));
                // A closed queue means the client is gone or dropped: stop waiting for it.
                if let Err(err) = writer.send(&bytes, || queue.is_closed()) {
                    debug!("control: event writer stops: {err}");
                    break;
                }
            }
            Next::Idle => {}
            Next::Closed { .. } => break,
        }
    }
    if queue.overflowed() {
        warn!("control: a QMP client fell too far behind on events; hanging up on it");
        // The session's reader then sees the connection end and cleans up.
        let _ = hangup.shutdown(Shutdown::Both);
    }
}
