//! `--sections queues`: one export served with 1, 2 and 4 queues, each queue driven from its
//! own client thread at the job's depth. Aggregate IOPS beside one queue, and the server's CPU
//! time per I/O against one queue's: shared state in the engine (the pool's metadata lock,
//! gates, allocation) shows as CPU per I/O growing with queues.

use std::path::Path;

use crate::client::Client;
use crate::job::{Job, Op, Pattern};
use crate::server::{cpu_seconds, peak_rss_kib, this_build, Server};
use crate::stats::{show, Cell};
use crate::suite::{alternate, thin_pool, Settings};

const QUEUES: [usize; 3] = [1, 2, 4];

/// What is exported: `null`, the raw file, or the pool's fully provisioned thin disk.
enum Device<'a> {
    Null,
    Raw(&'a Path),
    Thin(&'a Path),
}

pub fn section(s: &Settings, file: &Path, out: &mut String) {
    eprintln!("queues {QUEUES:?}");
    out.push_str(
        "### Several queues (each from its own client thread at the job's depth)\n\n\
         | device: job | 1 queue | 2 queues | 4 queues | CPU per I/O, 2 queues / 1 | 4 queues / 1 |\n\
         |---|---|---|---|---|---|\n",
    );
    let jobs = [
        Job::new(Op::Read, Pattern::Random, 4096, 32),
        Job::new(Op::Write, Pattern::Random, 4096, 32),
    ];
    let pool = thin_pool(s, s.file_size);
    let devices = [
        ("null", Ok(Device::Null)),
        ("raw", Ok(Device::Raw(file))),
        (
            "fully provisioned thin",
            pool.as_deref().map(Device::Thin).map_err(Clone::clone),
        ),
    ];
    for (name, device) in &devices {
        for job in &jobs {
            let run = |queues: usize| -> Cell {
                let device = device.as_ref().map_err(Clone::clone)?;
                measure(s, device, job, queues)
            };
            let [one, two, four] = alternate(
                s.rounds,
                [&|| run(QUEUES[0]), &|| run(QUEUES[1]), &|| run(QUEUES[2])],
            );
            out.push_str(&format!(
                "| {name}: {} | {} | {} | {} | {} | {} |\n",
                job.name,
                show(&one),
                show(&two),
                show(&four),
                cpu_ratio(&two, &one),
                cpu_ratio(&four, &one)
            ));
        }
    }
    out.push('\n');
}

fn measure(s: &Settings, device: &Device, job: &Job, queues: usize) -> Cell {
    let socket = s.socket();
    eprint!(
        "  {:<28} {:<22}",
        format!("thinblk, {queues} queues"),
        job.name
    );
    let (server, span) = match device {
        Device::Null => {
            let spec = format!("null={}", s.null_size);
            let server = Server::thinblk_queues(&this_build(), &spec, &socket, &s.dir, queues);
            (server, s.null_size)
        }
        Device::Raw(file) => {
            let spec = format!("raw={}", file.display());
            let server = Server::thinblk_queues(&this_build(), &spec, &socket, &s.dir, queues);
            (server, s.file_size)
        }
        Device::Thin(pool) => {
            let server = Server::thin_queues(
                &this_build(),
                pool,
                "name=full",
                &[],
                &socket,
                &s.dir,
                queues,
            );
            (server, s.file_size)
        }
    };
    let cell = (|| {
        let server = server?;
        let pid = server.pid();
        let tail = |e: String| format!("{e} ({})", server.log_tail());
        let mut client = Client::connect_queues(&socket, job.qd * job.bs, queues).map_err(tail)?;
        let m = client
            .run_queues(job, span, s.warmup, s.measure, &|| cpu_seconds(pid))
            .map_err(tail)?;
        let mut summary = m.summary();
        summary.peak_rss_kib = peak_rss_kib(pid);
        Ok(summary)
    })();
    eprintln!("{}", show(&cell));
    cell
}

/// CPU time per I/O of `more` over that of `one`.
fn cpu_ratio(more: &Cell, one: &Cell) -> String {
    match (more, one) {
        (Ok(m), Ok(o)) => match (m.cpu_us_per_io, o.cpu_us_per_io) {
            (Some(m), Some(o)) if o > 0.0 => format!("{:.2}×", m / o),
            _ => "?".into(),
        },
        _ => "n/a".into(),
    }
}
