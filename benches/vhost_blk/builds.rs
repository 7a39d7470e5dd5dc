//! `--baseline PATH`: this build of thinblk against another binary (usually main's), in turn,
//! on the same files, so a change is judged by ratios from one run and not by tables from
//! different hours of a disk whose speed drifts.

use std::path::Path;

use crate::images::CLUSTER;
use crate::job::{Job, Op, Pattern};
use crate::server::{this_build, Server};
use crate::stats::{cost, ratio, show, Cell};
use crate::suite::{alternate, Settings};

/// Virtual size of the fresh thin devices first writes go to.
const FRESH_SIZE: u64 = 16 << 30;

/// One row: the same measurement with both binaries, `rounds` times in turn.
fn row(
    s: &Settings,
    out: &mut String,
    what: &str,
    run: &dyn Fn(&Path, &str) -> Cell,
    baseline: &Path,
) {
    let new = this_build();
    let [t, b] = alternate(
        s.rounds,
        [&|| run(&new, "this build"), &|| run(baseline, "baseline")],
    );
    out.push_str(&format!(
        "| {what} | {} | {} | {} | {} | {} |\n",
        show(&t),
        show(&b),
        ratio(&t, &b),
        cost(&t),
        cost(&b)
    ));
}

/// Raw, null, fully provisioned thin and first-write rows for both binaries.
pub fn section(s: &Settings, file: &Path, baseline: &Path, out: &mut String) {
    eprintln!("this build vs {}", baseline.display());
    out.push_str(&format!(
        "### This build vs baseline `{}`, one queue\n\n\
         | row | this build | baseline | this/baseline | this build's cost | baseline's cost |\n\
         |---|---|---|---|---|---|\n",
        baseline.display()
    ));
    let raw = format!("raw={}", file.display());
    let null = format!("null={}", s.null_size);
    for job in &s.jobs {
        for (name, backing, span) in [("raw", &raw, s.file_size), ("null", &null, s.null_size)] {
            let run = |bin: &Path, who: &str| {
                s.measure(&format!("{name} {who}"), job, span, |sock| {
                    Server::thinblk_of(bin, backing, sock, &s.dir)
                })
            };
            row(s, out, &format!("{name}: {}", job.name), &run, baseline);
        }
    }
    // One pool, provisioned once, read and written by both binaries: the same data file.
    let pool = crate::suite::thin_pool(s, s.file_size);
    for job in &s.jobs {
        let thin = |bin: &Path, who: &str| -> Cell {
            let pool = pool.as_ref().map_err(Clone::clone)?;
            s.measure(&format!("thin full {who}"), job, s.file_size, |sock| {
                Server::thin_of(bin, pool, "name=full", &[], sock, &s.dir)
            })
        };
        row(
            s,
            out,
            &format!("fully provisioned thin: {}", job.name),
            &thin,
            baseline,
        );
    }
    let first = [
        Job::new(Op::Write, Pattern::FirstWrite { cluster: CLUSTER }, 4096, 1),
        Job::new(
            Op::Write,
            Pattern::FirstWrite { cluster: CLUSTER },
            4096,
            32,
        ),
        Job::new(Op::Write, Pattern::Sequential, 128 << 10, 8),
    ];
    // Each first-write measurement gets a pool of its own, removed after it: a 4 KiB first
    // write takes a whole 64 KiB block, so a few seconds of them fill gigabytes.
    let fresh_pool = s.dir.join("fresh-pool");
    for job in &first {
        let thin = |bin: &Path, who: &str| -> Cell {
            let _ = std::fs::remove_dir_all(&fresh_pool);
            let cell = s.measure(&format!("thin fresh {who}"), job, FRESH_SIZE, |sock| {
                let spec = format!("name=fresh,size={FRESH_SIZE}");
                Server::thin_of(bin, &fresh_pool, &spec, &[], sock, &s.dir)
            });
            let _ = std::fs::remove_dir_all(&fresh_pool);
            cell
        };
        row(
            s,
            out,
            &format!("first writes: {}", job.name),
            &thin,
            baseline,
        );
    }
    out.push('\n');
}
