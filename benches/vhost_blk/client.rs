//! The load generator: blkio queues (libblkio's virtio-blk-vhost-user driver) each kept at the
//! job's queue depth for a fixed time, latency recorded per request. One queue is driven from
//! the calling thread; several (`run_queues`) from a thread each.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

use crate::job::{Job, Offsets, Op};
use crate::stats::Measurement;

/// A connected blkio instance with its queues and one mapped buffer region (`per_queue`
/// bytes of it for each queue).
pub struct Client {
    queue: Blkioq,
    others: Vec<Blkioq>,
    per_queue: usize,
    // Kept alive for the queue and the region; blkio frees the region when both are dropped.
    _blkio: Blkio,
    region: MemoryRegion,
    pub capacity: u64,
}

fn err(what: &str) -> impl Fn(blkio::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

impl Client {
    /// Connects to `socket` with one queue and a buffer region of at least `buf_len` bytes.
    pub fn connect(socket: &Path, buf_len: usize) -> Result<Client, String> {
        Client::connect_queues(socket, buf_len, 1)
    }

    /// Connects to `socket` with `queues` queues and `buf_len` bytes of buffers for each.
    pub fn connect_queues(socket: &Path, buf_len: usize, queues: usize) -> Result<Client, String> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user").map_err(err("blkio"))?;
        let path = socket.to_str().ok_or("socket path is not UTF-8")?;
        blkio.set_str("path", path).map_err(err("path"))?;
        blkio.connect().map_err(err("connect"))?;
        let n = i32::try_from(queues.max(1)).map_err(|_| "too many queues")?;
        blkio.set_i32("num-queues", n).map_err(err("num-queues"))?;
        let mut started = blkio.start().map_err(err("start"))?.queues;
        if started.len() != queues.max(1) {
            return Err(format!("blkio started {} queues", started.len()));
        }
        let queue = started.remove(0);
        let capacity = blkio.get_u64("capacity").map_err(err("capacity"))?;
        let align = blkio
            .get_u64("mem-region-alignment")
            .map_err(err("alignment"))? as usize;
        let per_queue = buf_len.div_ceil(align.max(1)) * align.max(1);
        let len = per_queue * queues.max(1);
        let region = blkio
            .alloc_mem_region(len)
            .map_err(err("alloc_mem_region"))?;
        blkio
            .map_mem_region(&region)
            .map_err(err("map_mem_region"))?;
        // SAFETY: blkio allocated `len` bytes at `addr` for this client; nothing is in flight.
        unsafe { std::ptr::write_bytes(region.addr as *mut u8, 0x5a, region.len) };
        Ok(Client {
            queue,
            others: started,
            per_queue,
            _blkio: blkio,
            region,
            capacity,
        })
    }

    /// Writes the first `span` bytes sequentially (provisioning every block of a thin disk),
    /// `chunk` bytes per request, keeping `qd` requests in flight.
    pub fn fill(&mut self, span: u64, chunk: usize, qd: usize) -> Result<(), String> {
        let mut next = 0u64;
        let mut in_flight = 0usize;
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..qd.max(1)).map(|_| MaybeUninit::uninit()).collect();
        while next < span || in_flight > 0 {
            while in_flight < qd && next < span {
                // The data does not matter, so requests in flight may share buffers.
                let slot = in_flight;
                let len = chunk.min((span - next) as usize);
                let buf = (self.region.addr + slot * chunk) as *mut u8;
                self.queue.write(next, buf, len, slot, ReqFlags::empty());
                next += len as u64;
                in_flight += 1;
            }
            let n = self
                .queue
                .do_io(&mut completions, 1, None, None)
                .map_err(err("do_io"))?;
            for c in completions.iter().take(n) {
                // SAFETY: do_io initialised the first `n` completions.
                let ret = unsafe { c.assume_init_ref() }.ret;
                if ret != 0 {
                    return Err(format!("fill: write failed ({ret})"));
                }
            }
            in_flight -= n;
        }
        self.queue.flush(0, ReqFlags::empty());
        let n = self
            .queue
            .do_io(&mut completions, 1, None, None)
            .map_err(err("do_io"))?;
        if n != 1 {
            return Err("fill: no flush completion".into());
        }
        Ok(())
    }

    /// Runs `job` for `warmup` then `measure`, over the first `span` bytes of the device.
    /// `cpu` samples the server's CPU time at the start and end of the measured window.
    pub fn run(
        &mut self,
        job: &Job,
        span: u64,
        warmup: Duration,
        measure: Duration,
        cpu: &dyn Fn() -> Option<f64>,
    ) -> Result<Measurement, String> {
        let window_start = Instant::now() + warmup;
        let window_end = window_start + measure;
        let mut cpu_start = None;
        let mut cpu_end = None;
        let (mut ios, mut lat_ns) = (0u64, Vec::with_capacity(1 << 20));
        let wrapped = self.drive(job, span, &mut |started, now| {
            if now >= window_start && cpu_start.is_none() {
                cpu_start = Some(cpu());
            }
            if now >= window_end && cpu_end.is_none() {
                cpu_end = Some(cpu());
            }
            if now >= window_start && now < window_end {
                ios += 1;
                lat_ns.push(now.duration_since(started).as_nanos() as u64);
            }
            now < window_end
        })?;
        let server_cpu_seconds = match (cpu_start.flatten(), cpu_end.flatten()) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        Ok(Measurement {
            ios,
            bytes: ios * job.bs as u64,
            seconds: measure.as_secs_f64(),
            lat_ns,
            server_cpu_seconds,
            note: wrapped.then(|| "ran out of fresh clusters: later writes were overwrites".into()),
        })
    }

    /// Keeps `job`'s queue full over the first `span` bytes and calls `done(submitted,
    /// completed)` for every request; once it has returned false nothing more is submitted
    /// and the requests in flight are reaped (and still reported). Returns whether a
    /// first-write job ran out of clusters.
    pub fn drive(
        &mut self,
        job: &Job,
        span: u64,
        done: &mut dyn FnMut(Instant, Instant) -> bool,
    ) -> Result<bool, String> {
        let lane = Lane {
            base: self.region.addr,
            len: self.per_queue,
            capacity: self.capacity,
        };
        lane.drive(&mut self.queue, job, span, done)
    }

    /// Runs `job` on every queue at once, each from its own thread at the job's queue depth,
    /// for `warmup` then `measure`; one measurement of them all (IOPS and latencies of every
    /// queue, the server's CPU time over the window).
    pub fn run_queues(
        &mut self,
        job: &Job,
        span: u64,
        warmup: Duration,
        measure: Duration,
        cpu: &dyn Fn() -> Option<f64>,
    ) -> Result<Measurement, String> {
        let window_start = Instant::now() + warmup;
        let window_end = window_start + measure;
        let lanes: Vec<Lane> = (0..=self.others.len())
            .map(|q| Lane {
                base: self.region.addr + q * self.per_queue,
                len: self.per_queue,
                capacity: self.capacity,
            })
            .collect();
        let queues = std::iter::once(&mut self.queue).chain(self.others.iter_mut());
        let (results, cpu_seconds) = std::thread::scope(|scope| {
            let threads: Vec<_> = queues
                .zip(lanes)
                .map(|(queue, lane)| {
                    scope.spawn(move || {
                        let (mut ios, mut lat_ns) = (0u64, Vec::with_capacity(1 << 20));
                        let wrapped = lane.drive(queue, job, span, &mut |started, now| {
                            if now >= window_start && now < window_end {
                                ios += 1;
                                lat_ns.push(now.duration_since(started).as_nanos() as u64);
                            }
                            now < window_end
                        })?;
                        Ok::<_, String>((ios, lat_ns, wrapped))
                    })
                })
                .collect();
            std::thread::sleep(window_start.saturating_duration_since(Instant::now()));
            let a = cpu();
            std::thread::sleep(window_end.saturating_duration_since(Instant::now()));
            let b = cpu();
            let results: Vec<_> = threads
                .into_iter()
                .map(|t| {
                    t.join()
                        .unwrap_or_else(|_| Err("a queue's thread panicked".into()))
                })
                .collect();
            (results, a.zip(b).map(|(a, b)| b - a))
        });
        let (mut ios, mut lat_ns, mut wrapped) = (0, Vec::new(), false);
        for r in results {
            let (n, lat, w) = r?;
            ios += n;
            lat_ns.extend(lat);
            wrapped |= w;
        }
        Ok(Measurement {
            ios,
            bytes: ios * job.bs as u64,
            seconds: measure.as_secs_f64(),
            lat_ns,
            server_cpu_seconds: cpu_seconds,
            note: wrapped.then(|| "ran out of fresh clusters: later writes were overwrites".into()),
        })
    }
}

/// One queue's share of the buffer region.
struct Lane {
    base: usize,
    len: usize,
    capacity: u64,
}

impl Lane {
    fn submit(&self, queue: &mut Blkioq, job: &Job, slot: usize, offset: u64) {
        let buf = (self.base + slot * job.bs) as *mut u8;
        match job.op {
            Op::Read => queue.read(offset, buf, job.bs, slot, ReqFlags::empty()),
            Op::Write => queue.write(offset, buf, job.bs, slot, ReqFlags::empty()),
        }
    }

    fn drive(
        &self,
        queue: &mut Blkioq,
        job: &Job,
        span: u64,
        done: &mut dyn FnMut(Instant, Instant) -> bool,
    ) -> Result<bool, String> {
        if job.qd * job.bs > self.len {
            return Err("buffer region too small for the job".into());
        }
        let span = span.min(self.capacity);
        let mut offsets = Offsets::new(job, span);
        let mut started = vec![Instant::now(); job.qd];
        for (slot, t) in started.iter_mut().enumerate() {
            let offset = offsets.next_offset();
            self.submit(queue, job, slot, offset);
            *t = Instant::now();
        }
        let mut in_flight = job.qd;
        let mut more = true;
        let mut completions: Vec<_> = (0..job.qd)
            .map(|_| MaybeUninit::<Completion>::uninit())
            .collect();
        while in_flight > 0 {
            let mut timeout = Duration::from_secs(30);
            let n = queue
                .do_io(&mut completions, 1, Some(&mut timeout), None)
                .map_err(err("do_io"))?;
            if n == 0 {
                return Err("no completion within 30 s".into());
            }
            let now = Instant::now();
            for c in &completions[..n] {
                // SAFETY: do_io wrote `n` completions into the first `n` slots.
                let c = unsafe { c.assume_init_ref() };
                if c.ret != 0 {
                    return Err(format!("request failed: errno {}", -c.ret));
                }
                let slot = c.user_data;
                in_flight -= 1;
                let keep = done(started[slot], now);
                more = more && keep;
                if more {
                    let offset = offsets.next_offset();
                    self.submit(queue, job, slot, offset);
                    started[slot] = Instant::now();
                    in_flight += 1;
                }
            }
        }
        Ok(offsets.wrapped)
    }
}
