//! The device's own limit: the same job run by fio (io_uring, O_DIRECT) on the same file.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::job::Job;
use crate::stats::Summary;

/// Runs `job` with fio on `file` (the first `size` bytes) and reads its JSON report.
pub fn run(
    job: &Job,
    file: &Path,
    size: u64,
    warmup: Duration,
    measure: Duration,
) -> Result<Summary, String> {
    let rw = job.fio_rw().ok_or("fio has no such job")?;
    let out = Command::new("fio")
        .arg(format!("--name={}", job.name))
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--size={size}"))
        .args(["--ioengine=io_uring", "--direct=1", "--time_based=1"])
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={}", job.bs))
        .arg(format!("--iodepth={}", job.qd))
        .arg(format!("--ramp_time={}ms", warmup.as_millis()))
        .arg(format!("--runtime={}ms", measure.as_millis().max(1)))
        .args(["--randrepeat=0", "--lat_percentiles=1"])
        .args(["--percentile_list=50:99:99.9", "--output-format=json"])
        .output()
        .map_err(|e| format!("fio did not start: {e}"))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "fio {}: {}",
            out.status,
            msg.lines().last().unwrap_or("").trim()
        ));
    }
    parse(&out.stdout, job).map_err(|e| format!("fio output: {e}"))
}

fn parse(json: &[u8], job: &Job) -> Result<Summary, String> {
    // fio may print notes before the JSON document.
    let start = json.iter().position(|&b| b == b'{').ok_or("no JSON")?;
    let v: serde_json::Value = serde_json::from_slice(&json[start..]).map_err(|e| e.to_string())?;
    let side = match job.op {
        crate::job::Op::Read => "read",
        crate::job::Op::Write => "write",
    };
    let j = &v["jobs"][0][side];
    let num = |p: &str| j.pointer(p).and_then(|x| x.as_f64());
    let iops = num("/iops").ok_or("no iops")?;
    let bw = num("/bw_bytes").ok_or("no bw_bytes")?;
    // Total latency (submission to completion) where fio has its percentiles, else completion.
    let pct = |k: &str| {
        num(&format!("/lat_ns/percentile/{k}"))
            .or_else(|| num(&format!("/clat_ns/percentile/{k}")))
            .map(|ns| ns / 1000.0)
            .ok_or(format!("no percentile {k}"))
    };
    Ok(Summary {
        iops,
        mib_s: bw / (1 << 20) as f64,
        lat_us: [pct("50.000000")?, pct("99.000000")?, pct("99.900000")?],
        cpu_us_per_io: None,
        peak_rss_kib: None,
        note: None,
    })
}
