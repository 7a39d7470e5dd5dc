//! What a job measured, and the numbers a table shows.

/// The raw record of one measured window.
pub struct Measurement {
    pub ios: u64,
    pub bytes: u64,
    pub seconds: f64,
    /// Per-request latency, submission to completion, in nanoseconds.
    pub lat_ns: Vec<u64>,
    /// Server CPU time (user + system) spent in the window, if the server's pid is known.
    pub server_cpu_seconds: Option<f64>,
    /// Set when a first-write job ran out of fresh clusters.
    pub note: Option<String>,
}

/// One cell of a table: throughput, latency percentiles and cost.
#[derive(Clone, Debug)]
pub struct Summary {
    pub iops: f64,
    pub mib_s: f64,
    /// p50, p99, p99.9 in microseconds.
    pub lat_us: [f64; 3],
    pub cpu_us_per_io: Option<f64>,
    pub peak_rss_kib: Option<u64>,
    pub note: Option<String>,
}

/// A cell's outcome: a summary, or why there is none.
pub type Cell = Result<Summary, String>;

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

impl Measurement {
    pub fn summary(mut self) -> Summary {
        self.lat_ns.sort_unstable();
        let us = |p| percentile(&self.lat_ns, p) / 1000.0;
        Summary {
            iops: self.ios as f64 / self.seconds,
            mib_s: self.bytes as f64 / self.seconds / (1 << 20) as f64,
            lat_us: [us(50.0), us(99.0), us(99.9)],
            cpu_us_per_io: self
                .server_cpu_seconds
                .filter(|_| self.ios > 0)
                .map(|s| s * 1e6 / self.ios as f64),
            peak_rss_kib: None,
            note: self.note,
        }
    }
}

fn compact(x: f64) -> String {
    if x >= 100_000.0 {
        format!("{:.0}k", x / 1000.0)
    } else if x >= 10_000.0 {
        format!("{:.1}k", x / 1000.0)
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

impl Summary {
    /// `41.2k IOPS, 161 MiB/s, 22/48/95 µs` (latency p50/p99/p99.9).
    pub fn cell(&self) -> String {
        let [a, b, c] = self.lat_us;
        let mut s = format!(
            "{} IOPS, {} MiB/s, {}/{}/{} µs",
            compact(self.iops),
            compact(self.mib_s),
            compact(a),
            compact(b),
            compact(c)
        );
        if let Some(n) = &self.note {
            s.push_str(&format!(" ({n})"));
        }
        s
    }
}

/// Text for a cell or its failure.
pub fn show(c: &Cell) -> String {
    match c {
        Ok(s) => s.cell(),
        Err(e) if e.starts_with("n/a") => e.clone(),
        Err(e) => format!("failed: {e}"),
    }
}

/// `0.87×` of IOPS, or `-` when either side failed.
pub fn ratio(a: &Cell, b: &Cell) -> String {
    match (a, b) {
        (Ok(a), Ok(b)) if b.iops > 0.0 => format!("{:.2}×", a.iops / b.iops),
        _ => "-".into(),
    }
}

/// CPU µs per I/O and peak RSS in MiB: `12.3 µs, 9 MiB`.
pub fn cost(c: &Cell) -> String {
    match c {
        Ok(s) => {
            let cpu = s
                .cpu_us_per_io
                .map_or("?".into(), |x| format!("{} µs/IO", compact(x)));
            let rss = s
                .peak_rss_kib
                .map_or("?".into(), |k| format!("{:.0} MiB", k as f64 / 1024.0));
            format!("{cpu}, {rss}")
        }
        Err(_) => "-".into(),
    }
}
