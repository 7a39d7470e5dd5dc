//! Progress of long offline operations on a terminal (indicatif), and nothing at all when
//! stderr is not a terminal (scripts, logs, CI). The operations themselves know nothing of
//! it: a thread polls a counter they already keep (metadata blocks read by the cache,
//! exceptions left in a snapshot) and moves the bar.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often the counter is read and the bar redrawn.
const TICK: Duration = Duration::from_millis(100);

/// A bar (or spinner) that lives until dropped; hidden when stderr is not a terminal.
pub struct Progress {
    bar: ProgressBar,
    stop: Arc<AtomicBool>,
    poller: Option<JoinHandle<()>>,
}

/// Whether progress is drawn at all.
pub fn on_terminal() -> bool {
    std::io::stderr().is_terminal()
}

impl Progress {
    /// A bar of `total` `unit`s whose position `position` reads.
    pub fn bar(
        message: &str,
        total: u64,
        unit: &str,
        position: impl Fn() -> u64 + Send + 'static,
    ) -> Progress {
        if !on_terminal() {
            return Progress::hidden();
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        let template = format!(
            "{{msg}} [{{bar:40}}] {{pos}}/{{len}} {unit} ({{percent}}%, {{elapsed}}, eta {{eta}})"
        );
        if let Ok(style) = ProgressStyle::with_template(&template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(message.to_string());
        bar.tick();
        Progress::polling(bar, move |b| b.set_position(position().min(total)))
    }

    /// A spinner with a message, for work whose size is not known.
    pub fn spinner(message: &str) -> Progress {
        if !on_terminal() {
            return Progress::hidden();
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
            bar.set_style(style);
        }
        bar.set_message(message.to_string());
        bar.tick();
        Progress::polling(bar, |b| b.tick())
    }

    fn hidden() -> Progress {
        Progress {
            bar: ProgressBar::hidden(),
            stop: Arc::new(AtomicBool::new(true)),
            poller: None,
        }
    }

    fn polling(bar: ProgressBar, update: impl Fn(&ProgressBar) + Send + 'static) -> Progress {
        let stop = Arc::new(AtomicBool::new(false));
        let (b, s) = (bar.clone(), stop.clone());
        let poller = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || {
                while !s.load(Ordering::Acquire) {
                    update(&b);
                    std::thread::sleep(TICK);
                }
            })
            .ok();
        Progress { bar, stop, poller }
    }

    pub fn set_message(&self, message: &str) {
        self.bar.set_message(message.to_string());
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.poller.take() {
            let _ = t.join();
        }
        self.bar.finish_and_clear();
    }
}

impl Progress {
    /// A writer for lines that must show beside the bar (a checker's findings): each whole
    /// line is written to stderr with the bar cleared, then the bar comes back.
    pub fn line_writer(&self) -> LineWriter {
        LineWriter {
            bar: self.bar.clone(),
            pending: Vec::new(),
        }
    }
}

/// See [`Progress::line_writer`]. Holds no lock on stderr between lines, so the bar's own
/// thread can draw meanwhile.
pub struct LineWriter {
    bar: ProgressBar,
    pending: Vec<u8>,
}

impl LineWriter {
    fn write_lines(&mut self, all: bool) -> std::io::Result<()> {
        let end = if all {
            self.pending.len()
        } else {
            match self.pending.iter().rposition(|&b| b == b'\n') {
                Some(i) => i + 1,
                None => return Ok(()),
            }
        };
        let lines: Vec<u8> = self.pending.drain(..end).collect();
        if lines.is_empty() {
            return Ok(());
        }
        self.bar
            .suspend(|| std::io::Write::write_all(&mut std::io::stderr(), &lines))
    }
}

impl std::io::Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        self.write_lines(false)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.write_lines(true)
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        let _ = self.write_lines(true);
    }
}
