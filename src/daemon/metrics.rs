//! `--metrics ADDR`: the exports' statistics and the pool's gauges in the Prometheus text
//! format (OpenMetrics, encoded by the prometheus-client crate), served by a small HTTP/1.1
//! server thread: `GET /metrics` (or `/`) answers, anything else is 404 or 405. Read on every
//! scrape from the same counters `query-blockstats` reads; nothing extra on the I/O path.

use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use log::{debug, info};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::state::State;
use super::stats::Snapshot;
use crate::engine::thin::PoolMode;

/// Longest request head a scrape may send.
const MAX_HEAD: usize = 8192;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

const OPS: [&str; 4] = ["read", "write", "flush", "unmap"];

struct Metrics {
    state: Weak<State>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("thinblk metrics")
    }
}

type Labels = Vec<(&'static str, String)>;

/// One metric family: its descriptor, then a value per label set.
fn family<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    values: &[(Labels, M)],
) -> fmt::Result {
    if values.is_empty() {
        return Ok(());
    }
    let mut m: MetricEncoder = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in values {
        v.encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

/// A counter per export and operation type.
fn per_op<N>(
    all: &[(Labels, Snapshot)],
    value: impl Fn(&Snapshot, usize) -> N,
) -> Vec<(Labels, ConstCounter<N>)> {
    let mut out = Vec::new();
    for (labels, s) in all {
        for (i, op) in OPS.iter().enumerate() {
            let mut l = labels.clone();
            l.push(("op", op.to_string()));
            out.push((l, ConstCounter::new(value(s, i))));
        }
    }
    out
}

fn pick(v: &[u64; 4], i: usize) -> u64 {
    v.get(i).copied().unwrap_or(0)
}

fn gauge(v: u64) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX))
}

impl Metrics {
    fn exports(&self, enc: &mut DescriptorEncoder, state: &State) -> fmt::Result {
        let all: Vec<(Labels, Snapshot)> = state
            .export_stats()
            .into_iter()
            .map(|(c, s)| (vec![("export", c.id), ("node", c.node)], s.snapshot()))
            .collect();
        let counter = MetricType::Counter;
        family(
            enc,
            "thinblk_export_operations",
            "Requests completed successfully (QEMU's *_operations)",
            counter,
            &per_op(&all, |s, i| pick(&s.ops, i)),
        )?;
        family(
            enc,
            "thinblk_export_bytes",
            "Bytes of successful requests (QEMU's *_bytes)",
            counter,
            &per_op(&all, |s, i| pick(&s.bytes, i)),
        )?;
        let seconds = per_op(&all, |s, i| pick(&s.time_ns, i) as f64 / 1e9);
        family(
            enc,
            "thinblk_export_io_time_seconds",
            "Time requests took from submission to completion (QEMU's *_total_time_ns)",
            counter,
            &seconds,
        )?;
        family(
            enc,
            "thinblk_export_failed_operations",
            "Requests the device failed",
            counter,
            &per_op(&all, |s, i| pick(&s.failed, i)),
        )?;
        family(
            enc,
            "thinblk_export_invalid_operations",
            "Requests refused before reaching the device (out of range, malformed)",
            counter,
            &per_op(&all, |s, i| pick(&s.invalid, i)),
        )?;
        let idle: Vec<_> = all
            .iter()
            .filter_map(|(l, s)| Some((l.clone(), ConstGauge::new(s.idle_time_ns? as f64 / 1e9))))
            .collect();
        family(
            enc,
            "thinblk_export_idle_seconds",
            "Time since the last request completed (absent before the first)",
            MetricType::Gauge,
            &idle,
        )?;
        let highest: Vec<_> = all
            .iter()
            .map(|(l, s)| (l.clone(), gauge(s.wr_highest_offset)))
            .collect();
        family(
            enc,
            "thinblk_export_write_highest_offset_bytes",
            "The end of the furthest write",
            MetricType::Gauge,
            &highest,
        )
    }

    fn pool(&self, enc: &mut DescriptorEncoder, state: &State) -> fmt::Result {
        let Some(thin) = state.thin() else {
            return Ok(());
        };
        let pool = thin.pool();
        let mode = pool.mode();
        let (data, data_free, meta, meta_free) = {
            let m = pool.meta();
            (
                m.data_dev_size(),
                m.free_data_blocks(),
                m.metadata_dev_size(),
                m.free_metadata_blocks(),
            )
        };
        let none: Labels = Vec::new();
        let g = MetricType::Gauge;
        for (name, help, v) in [
            ("thinblk_pool_data_blocks", "Data blocks in the pool", data),
            (
                "thinblk_pool_data_free_blocks",
                "Free data blocks",
                data_free,
            ),
            (
                "thinblk_pool_metadata_blocks",
                "Metadata blocks (4 KiB)",
                meta,
            ),
            (
                "thinblk_pool_metadata_free_blocks",
                "Free metadata blocks",
                meta_free,
            ),
            (
                "thinblk_pool_block_size_bytes",
                "Bytes of a data block",
                pool.block_size(),
            ),
        ] {
            family(enc, name, help, g, &[(none.clone(), gauge(v))])?;
        }
        let modes: Vec<_> = [
            PoolMode::Write,
            PoolMode::OutOfDataSpace,
            PoolMode::ReadOnly,
            PoolMode::Fail,
        ]
        .iter()
        .map(|m| {
            let l: Labels = vec![("mode", m.as_str().to_string())];
            (l, gauge(u64::from(*m == mode)))
        })
        .collect();
        family(
            enc,
            "thinblk_pool_mode",
            "1 for the mode the pool is in",
            g,
            &modes,
        )?;
        let t = pool.commit_times();
        family(
            enc,
            "thinblk_pool_commits",
            "Metadata commits",
            MetricType::Counter,
            &[(none.clone(), ConstCounter::new(t.count))],
        )?;
        family(
            enc,
            "thinblk_pool_commit_seconds",
            "Time spent committing metadata",
            MetricType::Counter,
            &[(none.clone(), ConstCounter::new(t.total_ns as f64 / 1e9))],
        )?;
        family(
            enc,
            "thinblk_pool_last_commit_seconds",
            "How long the last metadata commit took",
            g,
            &[(none, ConstGauge::new(t.last_ns as f64 / 1e9))],
        )
    }
}

impl Collector for Metrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let Some(state) = self.state.upgrade() else {
            return Ok(());
        };
        self.exports(&mut enc, &state)?;
        self.pool(&mut enc, &state)
    }
}

/// The metrics text of `state` as a scrape gets it.
pub fn render(state: &Arc<State>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Metrics {
        state: Arc::downgrade(state),
    }));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        debug!("encoding metrics: {e}");
    }
    out
}

/// The running server; dropping it stops the thread (at its next connection or within a
/// second).
pub struct MetricsServer {
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MetricsServer {
    pub fn start(addr: SocketAddr, state: &Arc<State>) -> std::io::Result<MetricsServer> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let weak = Arc::downgrade(state);
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || serve(listener, weak, stopping))?;
        info!("metrics at http://{addr}/metrics");
        Ok(MetricsServer {
            stop,
            addr,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wakes the accept so that the thread sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(listener: TcpListener, state: Weak<State>, stop: Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        let Ok(conn) = conn else { continue };
        // One scrape at a time: Prometheus scrapes every few seconds.
        if let Err(e) = answer(conn, &state) {
            debug!("metrics request: {e}");
        }
    }
}

/// Reads one request head and answers it; the connection then closes.
fn answer(conn: TcpStream, state: &Weak<State>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(READ_TIMEOUT))?;
    conn.set_write_timeout(Some(READ_TIMEOUT))?;
    let mut reader = BufReader::new(conn.try_clone()?).take(MAX_HEAD as u64);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    // The rest of the head, up to the empty line.
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    let (status, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics" | "/") => match state.upgrade() {
            Some(s) => ("200 OK", render(&s)),
            None => ("503 Service Unavailable", String::new()),
        },
        ("GET", _) => ("404 Not Found", "not found\n".to_string()),
        _ => ("405 Method Not Allowed", "only GET\n".to_string()),
    };
    let mut conn = conn;
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}
