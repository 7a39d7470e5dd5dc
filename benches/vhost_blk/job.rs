//! What one benchmark job does: operation, block size, queue depth, and where the offsets go.

/// Reads or writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
}

/// How a job picks offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Uniformly random, aligned to the block size.
    Random,
    /// One block after another, wrapping at the end.
    Sequential,
    /// A different `cluster`-sized region for every request, in scattered order, so that on a
    /// fresh thin device or qcow2 image each request allocates (until the regions run out).
    FirstWrite { cluster: u64 },
}

/// One row of the benchmark.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub name: String,
    pub op: Op,
    pub pattern: Pattern,
    /// Bytes per request.
    pub bs: usize,
    /// Requests kept in flight.
    pub qd: usize,
}

impl Job {
    pub fn new(op: Op, pattern: Pattern, bs: usize, qd: usize) -> Job {
        let kind = match (pattern, op) {
            (Pattern::Random, Op::Read) => "randread",
            (Pattern::Random, Op::Write) => "randwrite",
            (Pattern::Sequential, Op::Read) => "seqread",
            (Pattern::Sequential, Op::Write) => "seqwrite",
            (Pattern::FirstWrite { .. }, _) => "firstwrite",
        };
        Job {
            name: format!("{kind}-{}k-qd{qd}", bs / 1024),
            op,
            pattern,
            bs,
            qd,
        }
    }

    /// fio's `--rw=` for the same job, if fio has one.
    pub fn fio_rw(&self) -> Option<&'static str> {
        match (self.pattern, self.op) {
            (Pattern::Random, Op::Read) => Some("randread"),
            (Pattern::Random, Op::Write) => Some("randwrite"),
            (Pattern::Sequential, Op::Read) => Some("read"),
            (Pattern::Sequential, Op::Write) => Some("write"),
            (Pattern::FirstWrite { .. }, _) => None,
        }
    }
}

/// The standard jobs: 4 KiB random at QD 1 and 32, 128 KiB sequential at QD 8.
pub fn standard() -> Vec<Job> {
    use {Op::*, Pattern::*};
    vec![
        Job::new(Read, Random, 4096, 1),
        Job::new(Read, Random, 4096, 32),
        Job::new(Write, Random, 4096, 1),
        Job::new(Write, Random, 4096, 32),
        Job::new(Read, Sequential, 128 << 10, 8),
        Job::new(Write, Sequential, 128 << 10, 8),
    ]
}

/// xorshift64*: small, fast and good enough to scatter offsets.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// A prime that scatters cluster indices when used as a stride (Knuth's multiplicative hash).
const SCATTER: u64 = 2_654_435_761;

/// The offsets of one job over a device of `span` bytes.
pub struct Offsets {
    pattern: Pattern,
    bs: u64,
    span: u64,
    rng: Rng,
    count: u64,
    /// Set once a first-write job has used every cluster and starts again.
    pub wrapped: bool,
}

impl Offsets {
    pub fn new(job: &Job, span: u64) -> Offsets {
        Offsets {
            pattern: job.pattern,
            bs: job.bs as u64,
            span,
            rng: Rng::new(0x0074_6869_6e62_6c6b),
            count: 0,
            wrapped: false,
        }
    }

    pub fn next_offset(&mut self) -> u64 {
        let i = self.count;
        self.count += 1;
        let blocks = (self.span / self.bs).max(1);
        match self.pattern {
            Pattern::Random => self.rng.next_u64() % blocks * self.bs,
            Pattern::Sequential => i % blocks * self.bs,
            Pattern::FirstWrite { cluster } => {
                let clusters = (self.span / cluster).max(1);
                if i >= clusters {
                    self.wrapped = true;
                }
                let stride = if clusters.is_multiple_of(SCATTER) {
                    1
                } else {
                    SCATTER
                };
                let c =
                    (u128::from(i % clusters) * u128::from(stride) % u128::from(clusters)) as u64;
                c * cluster
            }
        }
    }
}

/// Checks of the offset generators, run by the smoke test (`cargo test --benches`): a bench
/// target without the test harness has no `#[test]`s.
pub fn self_test() {
    let job = Job::new(Op::Write, Pattern::FirstWrite { cluster: 65536 }, 4096, 1);
    let mut o = Offsets::new(&job, 1024 * 65536);
    let mut seen: Vec<u64> = (0..1024).map(|_| o.next_offset()).collect();
    assert!(!o.wrapped, "first writes wrapped early");
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), 1024, "first writes repeated a cluster");
    o.next_offset();
    assert!(o.wrapped, "first writes did not notice the wrap");

    let job = Job::new(Op::Read, Pattern::Random, 4096, 1);
    let mut o = Offsets::new(&job, 1 << 20);
    for _ in 0..1000 {
        let off = o.next_offset();
        assert!(
            off.is_multiple_of(4096) && off + 4096 <= 1 << 20,
            "bad offset {off}"
        );
    }
}
