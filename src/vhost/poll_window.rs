//! How long a queue's worker goes on polling after activity before it sleeps, learnt per queue
//! from what its sleeps show.
//!
//! Polling saves a wakeup (20-30 µs on a VM whose other vCPU is halted) when the next thing
//! comes within the window, and wastes the whole window when it does not. A worker waits for
//! one of two things, and they come at very different times: the guest's next request after a
//! completion (a few µs to tens of µs, the guest's own reaction), and, while requests are in
//! the device, their completions (a host disk's 60 µs and more for a 4 KiB read at queue depth
//! 1, or a request of 128 KiB). A fixed window that suits the first is burnt in full for the
//! second on every request: at queue depth 1 on a file a worker was on its CPU for nearly all
//! of each request's time, more than qemu-storage-daemon spends per request.
//!
//! So each kind of wait has its own window, at most the export's `poll-us`, learnt from how
//! polling for it turned out: a poll that caught what it waited for, or a sleep that ended
//! within `poll-us` of the last activity (polling longer would have caught it), doubles the
//! window; a sleep that lasted past `poll-us` (the whole window was burnt for nothing), the
//! fourth in a row with no catch in between, halves it, down to nothing. A window of nothing still learns, from sleeps that turn out short. A busy queue,
//! where polls mostly catch something, keeps its full window through late events; a wait that polling never serves stops costing CPU after a few requests. This
//! is close to QEMU's adaptive polling (`poll-grow`, `poll-shrink`), with the two kinds kept
//! apart and polls that paid off counted too.

use std::time::{Duration, Instant};

/// What a worker that found nothing new is waiting for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waiting {
    /// Nothing is in the device: the guest's next request.
    Request,
    /// Requests are in the device: their completions (or more requests).
    Completion,
}

impl Waiting {
    fn index(self) -> usize {
        match self {
            Waiting::Request => 0,
            Waiting::Completion => 1,
        }
    }
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
    windows: [Duration; 2],
    /// Sleeps in a row, per kind, that lasted past `max` with no poll catching anything in
    /// between.
    late_streak: [u8; 2],
    /// The last activity before the worker went to sleep, and what it then waited for.
    asleep: Option<(Instant, Waiting)>,
}

impl PollWindow {
    /// Windows of at most `max` (`poll-us`), starting at `max`: a new queue polls as a fixed
    /// window did until its sleeps show otherwise.
    pub fn new(max: Duration) -> Self {
        PollWindow {
            max,
            windows: [max; 2],
            late_streak: [0; 2],
            asleep: None,
        }
    }

    /// How long to poll for `what` after the last activity.
    pub fn window(&self, what: Waiting) -> Duration {
        self.windows[what.index()]
    }

    /// Polling for `what` caught it.
    pub fn caught(&mut self, what: Waiting) {
        self.late_streak[what.index()] = 0;
        self.grow(what);
    }

    /// The worker stops polling and sleeps; `last_activity` is when it last found something,
    /// `what` what it is waiting for.
    pub fn sleep(&mut self, last_activity: Instant, what: Waiting) {
        self.asleep = Some((last_activity, what));
    }

    /// The worker leaves off without sleeping for want of work (its turn ended): the next
    /// wakeup says nothing about the window.
    pub fn forget(&mut self) {
        self.asleep = None;
    }

    /// The worker woke at `now`: adapts the window of what it slept for to how long after its
    /// last activity the wakeup came.
    pub fn woke(&mut self, now: Instant) {
        let Some((last, what)) = self.asleep.take() else {
            return;
        };
        let i = what.index();
        if now.saturating_duration_since(last) <= self.max {
            // Polling up to `max` would have caught it.
            self.late_streak[i] = 0;
            self.grow(what);
        } else if self.late_streak[i] < LATE_STREAK - 1 {
            // A late one among others that polling caught is a busy queue's pause.
            self.late_streak[i] += 1;
        } else {
            let w = &mut self.windows[i];
            *w /= 2;
            if *w < MIN_WINDOW {
                *w = Duration::ZERO;
            }
        }
    }

    fn grow(&mut self, what: Waiting) {
        let w = &mut self.windows[what.index()];
        *w = (*w * 2).max(MIN_WINDOW).min(self.max);
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
    fn completions_slower_than_the_window_stop_their_polling_and_leave_the_requests_window() {
        // A disk's 60 µs reads at queue depth 1: each sleep for a completion lasts past the
        // window, each wait for the guest's next request is caught by polling (no sleep).
        let mut p = PollWindow::new(MAX);
        let mut t = Instant::now();
        let mut windows = Vec::new();
        for _ in 0..8 {
            p.sleep(t, Waiting::Completion);
            t = after(t, 60);
            p.woke(t);
            windows.push(p.window(Waiting::Completion).as_micros());
        }
        // The first three are a busy queue's pauses as far as it can tell.
        assert_eq!(windows, [32, 32, 32, 16, 8, 4, 2, 0]);
        assert_eq!(p.window(Waiting::Completion), Duration::ZERO);
        assert_eq!(p.window(Waiting::Request), MAX);
        // Still nothing worth polling for: it stays off.
        p.sleep(t, Waiting::Completion);
        p.woke(after(t, 45));
        assert_eq!(p.window(Waiting::Completion), Duration::ZERO);
    }

    #[test]
    fn a_wakeup_soon_after_giving_up_grows_the_window_back_to_at_most_the_maximum() {
        let mut p = PollWindow::new(MAX);
        let t = Instant::now();
        for _ in 0..10 {
            p.sleep(t, Waiting::Completion);
            p.woke(after(t, 100));
        }
        assert_eq!(p.window(Waiting::Completion), Duration::ZERO);
        let mut grown = Vec::new();
        for _ in 0..6 {
            p.sleep(t, Waiting::Completion);
            p.woke(after(t, 20));
            grown.push(p.window(Waiting::Completion).as_micros());
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
                p.sleep(t, Waiting::Completion);
                p.woke(after(t, 100));
            }
            if reset {
                p.caught(Waiting::Completion);
            } else {
                p.sleep(t, Waiting::Completion);
                p.woke(after(t, 10));
            }
        }
        assert_eq!(p.window(Waiting::Completion), MAX);
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
