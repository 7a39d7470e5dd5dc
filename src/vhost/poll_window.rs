//! How long a queue's worker goes on polling after activity before it sleeps.
//!
//! Polling saves a wakeup (20-30 µs on a VM whose other vCPU is halted) when the next thing
//! comes within the window, and wastes the whole window when it does not. A worker waits for
//! one of two things:
//!
//! - **Completions, while requests are in the device**: it polls the export's whole `poll-us`,
//!   always. A completion that comes after the window still costs the wakeup, and a window
//!   learnt down from late ones lost more than it saved: windows that halved after four late
//!   completions in a row cost first writes at queue depth 1 6-8% of their rate and 4 KiB
//!   reads at queue depth 32 up to 13% (fewer of the completions that do come early were
//!   caught, and each missed one waited for a wakeup before the guest's next request was
//!   submitted), while the CPU per I/O at queue depth 1 was no lower (a wakeup costs CPU
//!   too). Sleeping through part of the device's time and polling the rest (30 µs, then the
//!   window) added 20 µs to every 4 KiB read: on this VM a timer wakes a halted vCPU no faster
//!   than an eventfd does. docs/benchmarks.md has the runs.
//! - **The guest's next request, with nothing in the device**: a guest that thinks between
//!   requests, or an idle one, would have every wait polled for nothing, and here polling
//!   longer can never catch what comes later. So this window is learnt from how polling for it
//!   turned out: a poll that caught a request, or a sleep that ended within `poll-us` of the
//!   last activity (polling longer would have caught it), doubles it; a sleep that lasted past
//!   `poll-us`, the fourth in a row with no catch in between, halves it, down to nothing. A
//!   window of nothing still learns, from sleeps that turn out short. This is close to QEMU's
//!   adaptive polling (`poll-grow`, `poll-shrink`), with polls that paid off counted too.

use std::time::{Duration, Instant};

/// What a worker that found nothing new is waiting for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waiting {
    /// Nothing is in the device: the guest's next request.
    Request,
    /// Requests are in the device: their completions (or more requests).
    Completion,
}

/// The smallest window a growing one starts from: below it a poll costs more in the loop's
/// own passes than it can save.
const MIN_WINDOW: Duration = Duration::from_micros(2);

/// Sleeps past `max` in a row, with no catch in between, before the window halves (and from
/// then on each one more): a busy queue has pauses, and a sleep in one means a kick and a
/// wakeup for the next batch (halving on each cost null exports at queue depth 32 half their
/// rate, and with one catch forgiving one late sleep still 0.90x).
const LATE_STREAK: u8 = 4;

/// One queue's polling windows.
#[derive(Clone, Copy, Debug)]
pub struct PollWindow {
    max: Duration,
    /// How long to poll for the guest's next request.
    requests: Duration,
    /// Sleeps for a request in a row that lasted past `max`, with no poll catching one in
    /// between.
    late_streak: u8,
    /// When the worker last found something before it went to sleep for a request.
    asleep: Option<Instant>,
}

impl PollWindow {
    /// Windows of at most `max` (`poll-us`), starting at `max`: a new queue polls as a fixed
    /// window did until its sleeps show otherwise.
    pub fn new(max: Duration) -> Self {
        PollWindow {
            max,
            requests: max,
            late_streak: 0,
            asleep: None,
        }
    }

    /// How long to poll for `what` after the last activity.
    pub fn window(&self, what: Waiting) -> Duration {
        match what {
            Waiting::Request => self.requests,
            Waiting::Completion => self.max,
        }
    }

    /// Polling for `what` caught it.
    pub fn caught(&mut self, what: Waiting) {
        if what == Waiting::Request {
            self.late_streak = 0;
            self.grow();
        }
    }

    /// The worker stops polling and sleeps; `last_activity` is when it last found something,
    /// `what` what it is waiting for.
    pub fn sleep(&mut self, last_activity: Instant, what: Waiting) {
        self.asleep = (what == Waiting::Request).then_some(last_activity);
    }

    /// The worker leaves off without sleeping for want of work (its turn ended): the next
    /// wakeup says nothing about the window.
    pub fn forget(&mut self) {
        self.asleep = None;
    }

    /// The worker woke at `now`: adapts the window of what it slept for to how long after its
    /// last activity the wakeup came.
    pub fn woke(&mut self, now: Instant) {
        let Some(last) = self.asleep.take() else {
            return;
        };
        if now.saturating_duration_since(last) <= self.max {
            // Polling up to `max` would have caught it.
            self.late_streak = 0;
            self.grow();
        } else if self.late_streak < LATE_STREAK - 1 {
            // A late one among others that polling caught is a busy guest's pause.
            self.late_streak += 1;
        } else {
            self.requests /= 2;
            if self.requests < MIN_WINDOW {
                self.requests = Duration::ZERO;
            }
        }
    }

    fn grow(&mut self) {
        self.requests = (self.requests * 2).max(MIN_WINDOW).min(self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(32);

    fn after(t: Instant, us: u64) -> Instant {
        t + Duration::from_micros(us)
    }

    #[test]
    fn windows_start_at_the_exports_poll_time() {
        let p = PollWindow::new(MAX);
        assert_eq!(p.window(Waiting::Request), MAX);
        assert_eq!(p.window(Waiting::Completion), MAX);
    }

    #[test]
    fn requests_later_than_the_window_stop_their_polling_and_completions_keep_the_whole_window() {
        // A guest that thinks 60 µs between requests: each sleep for its next request lasts
        // past the window. Its completions come late too (a disk's 60 µs), and are polled for
        // in full all the same.
        let mut p = PollWindow::new(MAX);
        let mut t = Instant::now();
        let mut windows = Vec::new();
        for _ in 0..8 {
            p.sleep(t, Waiting::Completion);
            t = after(t, 60);
            p.woke(t);
            p.sleep(t, Waiting::Request);
            t = after(t, 60);
            p.woke(t);
            windows.push(p.window(Waiting::Request).as_micros());
            assert_eq!(p.window(Waiting::Completion), MAX);
        }
        // The first three are a busy guest's pauses as far as it can tell.
        assert_eq!(windows, [32, 32, 32, 16, 8, 4, 2, 0]);
        // Still nothing worth polling for: it stays off.
        p.sleep(t, Waiting::Request);
        p.woke(after(t, 45));
        assert_eq!(p.window(Waiting::Request), Duration::ZERO);
        assert_eq!(p.window(Waiting::Completion), MAX);
    }

    #[test]
    fn a_wakeup_soon_after_giving_up_grows_the_window_back_to_at_most_the_maximum() {
        let mut p = PollWindow::new(MAX);
        let t = Instant::now();
        for _ in 0..10 {
            p.sleep(t, Waiting::Request);
            p.woke(after(t, 100));
        }
        assert_eq!(p.window(Waiting::Request), Duration::ZERO);
        let mut grown = Vec::new();
        for _ in 0..6 {
            p.sleep(t, Waiting::Request);
            p.woke(after(t, 20));
            grown.push(p.window(Waiting::Request).as_micros());
        }
        assert_eq!(grown, [2, 4, 8, 16, 32, 32]);
    }

    #[test]
    fn polls_that_pay_off_keep_a_busy_queues_window_through_the_odd_late_event() {
        let mut p = PollWindow::new(MAX);
        let mut t = Instant::now();
        for _ in 0..100 {
            // One event in four comes late; the others are caught by polling.
            p.sleep(t, Waiting::Request);
            t = after(t, 80);
            p.woke(t);
            for _ in 0..3 {
                p.caught(Waiting::Request);
            }
            assert_eq!(p.window(Waiting::Request), MAX);
        }
    }

    #[test]
    fn a_catch_or_a_short_sleep_starts_the_count_of_late_sleeps_again() {
        let mut p = PollWindow::new(MAX);
        let t = Instant::now();
        for reset in [true, false] {
            for _ in 0..3 {
                p.sleep(t, Waiting::Request);
                p.woke(after(t, 100));
            }
            if reset {
                p.caught(Waiting::Request);
            } else {
                p.sleep(t, Waiting::Request);
                p.woke(after(t, 10));
            }
        }
        assert_eq!(p.window(Waiting::Request), MAX);
    }

    #[test]
    fn a_wakeup_without_a_sleep_or_after_a_turn_changes_nothing() {
        let mut p = PollWindow::new(MAX);
        let t = Instant::now();
        p.woke(after(t, 1000));
        p.sleep(t, Waiting::Request);
        p.forget();
        p.woke(after(t, 1000));
        assert_eq!(p.window(Waiting::Request), MAX);
    }

    #[test]
    fn a_clock_that_seems_to_go_back_counts_as_a_short_sleep() {
        let mut p = PollWindow::new(MAX);
        let t = Instant::now();
        p.sleep(after(t, 50), Waiting::Request);
        p.woke(t);
        assert_eq!(p.window(Waiting::Request), MAX);
    }
}
