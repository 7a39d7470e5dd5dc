//! Events leave the I/O path here. Whoever notices something (a write past a threshold, a
//! failed request, the pool changing mode) hands an [`Event`] to the [`EventBus`] and goes on:
//! the bus only appends it to a bounded queue per listening client, under a lock that no
//! socket I/O ever holds. Each client's writer, on the control side, takes events off its
//! queue, encodes them and writes them, so a client that stops reading only fills its own
//! queue. A queue that overflows closes: that client is dropped (its writer hangs up), and
//! [`EventBus::dropped_listeners`] counts it. Dropping the client rather than skipping events
//! means a client never sees a stream with a silent hole in it; it can reconnect and query.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use log::warn;
use parking_lot::{Condvar, Mutex};
use serde_json::Value;

/// Events a client may have waiting before it is dropped. Events come a few a second at
/// most in normal running (I/O errors are rate-limited per export, thresholds and low-water
/// marks fire once per arming), so only a client that has stopped reading gets near this.
pub const QUEUE_CAPACITY: usize = 1024;

/// Something that happened, with when; its QMP encoding is the control layer's business.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: &'static str,
    pub data: Value,
    /// Since the Unix epoch, taken when the event was sent.
    pub time: Duration,
}

struct Pending {
    events: VecDeque<Arc<Event>>,
    /// No more events will come: unsubscribed, or the queue overflowed.
    closed: bool,
    overflowed: bool,
}

/// One client's events, waiting for its writer.
pub struct EventQueue {
    pending: Mutex<Pending>,
    ready: Condvar,
    capacity: usize,
}

/// What [`EventQueue::next`] found.
#[derive(Debug)]
pub enum Next {
    Event(Arc<Event>),
    /// Nothing came within the timeout.
    Idle,
    /// The queue is closed and empty; `overflowed` tells whether because the client fell
    /// too far behind.
    Closed {
        overflowed: bool,
    },
}

impl EventQueue {
    fn new(capacity: usize) -> Self {
        EventQueue {
            pending: Mutex::new(Pending {
                events: VecDeque::new(),
                closed: false,
                overflowed: false,
            }),
            ready: Condvar::new(),
            capacity,
        }
    }

    /// Appends `event` unless the queue is full; a full queue closes instead (false).
    fn push(&self, event: &Arc<Event>) -> bool {
        let mut p = self.pending.lock();
        if p.closed {
            return false;
        }
        if p.events.len() >= self.capacity {
            p.closed = true;
            p.overflowed = true;
            p.events.clear();
            drop(p);
            self.ready.notify_all();
            return false;
        }
        p.events.push_back(event.clone());
        drop(p);
        self.ready.notify_one();
        true
    }

    /// The next event, waiting up to `timeout` for one.
    pub fn next(&self, timeout: Duration) -> Next {
        let mut p = self.pending.lock();
        if p.events.is_empty() && !p.closed {
            self.ready.wait_for(&mut p, timeout);
        }
        match p.events.pop_front() {
            Some(e) => Next::Event(e),
            None if p.closed => Next::Closed {
                overflowed: p.overflowed,
            },
            None => Next::Idle,
        }
    }

    /// Whether no more events will come (unsubscribed or overflowed).
    pub fn is_closed(&self) -> bool {
        self.pending.lock().closed
    }

    /// Whether the client fell too far behind and is being dropped.
    pub fn overflowed(&self) -> bool {
        self.pending.lock().overflowed
    }

    /// No more events; the writer sees [`Next::Closed`] once it has taken what is queued.
    pub fn close(&self) {
        self.pending.lock().closed = true;
        self.ready.notify_all();
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.pending.lock().events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A client's place on the bus: its token (to unsubscribe) and its queue.
pub struct Subscription {
    pub token: u64,
    pub queue: Arc<EventQueue>,
}

/// Hands events from whoever notices them to every listening client, without waiting for any.
pub struct EventBus {
    listeners: Mutex<Vec<(u64, Arc<EventQueue>)>>,
    next_token: AtomicU64,
    capacity: usize,
    dropped: AtomicU64,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus::with_capacity(QUEUE_CAPACITY)
    }
}

impl EventBus {
    /// A bus whose clients may have `capacity` events waiting each.
    pub fn with_capacity(capacity: usize) -> Self {
        EventBus {
            listeners: Mutex::new(Vec::new()),
            next_token: AtomicU64::new(0),
            capacity: capacity.max(1),
            dropped: AtomicU64::new(0),
        }
    }

    /// Events sent from now on are queued for this subscription.
    pub fn subscribe(&self) -> Subscription {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let queue = Arc::new(EventQueue::new(self.capacity));
        self.listeners.lock().push((token, queue.clone()));
        Subscription { token, queue }
    }

    /// Stops queueing for `token` and closes its queue.
    pub fn unsubscribe(&self, token: u64) {
        self.listeners.lock().retain(|(t, q)| {
            if *t == token {
                q.close();
            }
            *t != token
        });
    }

    /// Queues an event for every listener and returns at once. A listener whose queue is full
    /// is dropped from the bus (its writer then hangs up on the client).
    pub fn send(&self, name: &'static str, data: Value) {
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let event = Arc::new(Event { name, data, time });
        let mut dropped = 0;
        self.listeners.lock().retain(|(_, q)| {
            let kept = q.push(&event);
            dropped += u64::from(!kept);
            kept
        });
        if dropped > 0 {
            self.dropped.fetch_add(dropped, Ordering::Relaxed);
            warn!(
                "dropping {dropped} event listener(s) that fell {} events behind",
                self.capacity
            );
        }
    }

    /// Listeners dropped so far because they fell too far behind.
    pub fn dropped_listeners(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Listeners on the bus now.
    pub fn listeners(&self) -> usize {
        self.listeners.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn take(q: &EventQueue) -> Option<Arc<Event>> {
        match q.next(Duration::ZERO) {
            Next::Event(e) => Some(e),
            _ => None,
        }
    }

    #[test]
    fn every_listener_gets_every_event_in_order() {
        let bus = EventBus::with_capacity(8);
        let (a, b) = (bus.subscribe(), bus.subscribe());
        bus.send("ONE", json!(1));
        bus.send("TWO", json!(2));
        for s in [&a, &b] {
            assert_eq!(take(&s.queue).map(|e| e.name), Some("ONE"));
            assert_eq!(take(&s.queue).map(|e| e.data.clone()), Some(json!(2)));
            assert!(matches!(s.queue.next(Duration::ZERO), Next::Idle));
        }
    }

    #[test]
    fn a_listener_that_falls_behind_is_dropped_and_counted_others_keep_theirs() {
        let bus = EventBus::with_capacity(4);
        let slow = bus.subscribe();
        let fast = bus.subscribe();
        for i in 0..10 {
            bus.send("E", json!(i));
            assert!(take(&fast.queue).is_some(), "event {i}");
        }
        assert_eq!(bus.dropped_listeners(), 1);
        assert_eq!(bus.listeners(), 1);
        assert!(slow.queue.overflowed());
        assert!(matches!(
            slow.queue.next(Duration::ZERO),
            Next::Closed { overflowed: true }
        ));
    }

    #[test]
    fn unsubscribing_closes_the_queue_after_what_is_queued() {
        let bus = EventBus::default();
        let s = bus.subscribe();
        bus.send("E", json!(null));
        bus.unsubscribe(s.token);
        bus.send("LATE", json!(null));
        assert_eq!(take(&s.queue).map(|e| e.name), Some("E"));
        assert!(matches!(
            s.queue.next(Duration::ZERO),
            Next::Closed { overflowed: false }
        ));
        assert_eq!(bus.dropped_listeners(), 0);
    }

    #[test]
    fn a_waiting_writer_wakes_for_an_event() {
        let bus = Arc::new(EventBus::default());
        let s = bus.subscribe();
        let sender = {
            let bus = bus.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                bus.send("LATE", json!(null));
            })
        };
        let got = s.queue.next(Duration::from_secs(10));
        assert!(matches!(got, Next::Event(e) if e.name == "LATE"));
        sender.join().unwrap();
    }
}
