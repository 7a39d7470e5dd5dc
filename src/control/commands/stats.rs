//! Per-export statistics with QEMU's names and shapes: `query-blockstats` and
//! `block-latency-histogram-set`.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::args;
use crate::control::protocol::QmpError;
use crate::daemon::state::State;
use crate::daemon::stats::{HistogramRequest, Snapshot};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryBlockstats {
    /// QEMU lists every node instead of every device with it; thinblk counts where requests
    /// arrive, at exports, so both list the exports.
    #[serde(rename = "query-nodes")]
    #[allow(dead_code)]
    query_nodes: Option<bool>,
}

/// One `BlockDeviceStats` object, as QEMU 8.1+ returns it.
pub fn device_stats(s: &Snapshot) -> Value {
    let [rd, wr, fl, un] = [0, 1, 2, 3];
    let mut m = Map::new();
    let mut put = |k: &str, v: Value| {
        m.insert(k.to_string(), v);
    };
    put("rd_bytes", json!(s.bytes[rd]));
    put("wr_bytes", json!(s.bytes[wr]));
    put("zone_append_bytes", json!(0));
    put("unmap_bytes", json!(s.bytes[un]));
    put("rd_operations", json!(s.ops[rd]));
    put("wr_operations", json!(s.ops[wr]));
    put("zone_append_operations", json!(0));
    put("flush_operations", json!(s.ops[fl]));
    put("unmap_operations", json!(s.ops[un]));
    put("rd_total_time_ns", json!(s.time_ns[rd]));
    put("wr_total_time_ns", json!(s.time_ns[wr]));
    put("zone_append_total_time_ns", json!(0));
    put("flush_total_time_ns", json!(s.time_ns[fl]));
    put("unmap_total_time_ns", json!(s.time_ns[un]));
    put("wr_highest_offset", json!(s.wr_highest_offset));
    for k in [
        "rd_merged",
        "wr_merged",
        "zone_append_merged",
        "unmap_merged",
    ] {
        put(k, json!(0));
    }
    if let Some(idle) = s.idle_time_ns {
        put("idle_time_ns", json!(idle));
    }
    for (prefix, v) in [("failed", &s.failed), ("invalid", &s.invalid)] {
        put(&format!("{prefix}_rd_operations"), json!(v[rd]));
        put(&format!("{prefix}_wr_operations"), json!(v[wr]));
        put(&format!("{prefix}_zone_append_operations"), json!(0));
        put(&format!("{prefix}_flush_operations"), json!(v[fl]));
        put(&format!("{prefix}_unmap_operations"), json!(v[un]));
    }
    put("account_invalid", json!(true));
    put("account_failed", json!(true));
    put("timed_stats", json!([]));
    let names = [
        "rd_latency_histogram",
        "wr_latency_histogram",
        "flush_latency_histogram",
    ];
    for (name, h) in names.iter().zip(s.histograms.iter()) {
        if let Some(h) = h {
            put(name, json!({ "boundaries": h.boundaries, "bins": h.bins }));
        }
    }
    Value::Object(m)
}

/// A `BlockStats` per export: `device` is the export's id, `node-name` the node it serves.
pub(super) fn query_blockstats(state: &State, v: Value) -> Result<Value, QmpError> {
    let QueryBlockstats { .. } = args(v)?;
    let all: Vec<Value> = state
        .export_stats()
        .into_iter()
        .map(|(config, stats)| {
            json!({
                "device": config.id,
                "qdev": config.id,
                "node-name": config.node,
                "stats": device_stats(&stats.snapshot()),
            })
        })
        .collect();
    Ok(Value::Array(all))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistogramSet {
    id: String,
    boundaries: Option<Vec<u64>>,
    #[serde(rename = "boundaries-read")]
    read: Option<Vec<u64>>,
    #[serde(rename = "boundaries-write")]
    write: Option<Vec<u64>>,
    /// Zone append: accepted for QEMU's clients; no device here has zones.
    #[serde(rename = "boundaries-zap")]
    #[allow(dead_code)]
    zap: Option<Vec<u64>>,
    #[serde(rename = "boundaries-flush")]
    flush: Option<Vec<u64>>,
}

/// Sets, resets or removes an export's latency histograms (QEMU's semantics; see
/// `ExportStats::set_histograms`).
pub(super) fn block_latency_histogram_set(state: &State, v: Value) -> Result<Value, QmpError> {
    let a: HistogramSet = args(v)?;
    let Some((_, stats)) = state.export_stats().into_iter().find(|(c, _)| c.id == a.id) else {
        return Err(QmpError::not_found(format!("Device '{}' not found", a.id)));
    };
    let req = HistogramRequest {
        boundaries: a.boundaries,
        read: a.read,
        write: a.write,
        flush: a.flush,
    };
    stats
        .set_histograms(&req)
        .map_err(|e| QmpError::generic(e.to_string()))?;
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_device_stats_has_every_field_qemu_requires() {
        // The required members of QEMU's BlockDeviceStats (qapi/block-core.json, 8.1+).
        let required = "rd_bytes wr_bytes zone_append_bytes unmap_bytes rd_operations \
            wr_operations zone_append_operations flush_operations unmap_operations \
            rd_total_time_ns wr_total_time_ns zone_append_total_time_ns flush_total_time_ns \
            unmap_total_time_ns wr_highest_offset rd_merged wr_merged zone_append_merged \
            unmap_merged failed_rd_operations failed_wr_operations \
            failed_zone_append_operations failed_flush_operations failed_unmap_operations \
            invalid_rd_operations invalid_wr_operations invalid_zone_append_operations \
            invalid_flush_operations invalid_unmap_operations account_invalid account_failed \
            timed_stats";
        let v = device_stats(&Snapshot::default());
        for k in required.split_whitespace() {
            assert!(v.get(k).is_some(), "{k} missing");
        }
        assert!(v.get("idle_time_ns").is_none(), "absent before any I/O");
        assert_eq!(
            v.as_object().unwrap().len(),
            required.split_whitespace().count()
        );
    }
}
