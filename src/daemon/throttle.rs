//! I/O limits as QEMU's throttle options mean them (`block-set-io-throttle`): leaky buckets
//! for bytes and operations per second, for reads, writes and their total, each with an
//! optional burst (`*_max` units per second for up to `*_max_length` seconds).
//!
//! A bucket fills by what each admitted request costs and leaks at `avg` per second. A
//! request may go while the bucket holds less than its size: `max * max_length` units when a
//! burst is set, else a tenth of a second's worth (QEMU's allowance for guests that issue
//! I/O in clumps). With a burst longer than a second, a second bucket leaking at `max` holds
//! the burst itself to `max` per second. A request that must wait waits `extra / rate`,
//! where `extra` is how far the fullest bucket is over its size. `iops_size`: a request
//! bigger than this counts as `size / iops_size` operations.
//!
//! Exports in the same group share one set of buckets; an export's group is its id unless
//! named. Only reads and writes (write-zeroes among them) are limited, as in QEMU.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Buckets, in this order throughout.
pub const BUCKETS: usize = 6;
pub const BPS_TOTAL: usize = 0;
pub const BPS_READ: usize = 1;
pub const BPS_WRITE: usize = 2;
pub const OPS_TOTAL: usize = 3;
pub const OPS_READ: usize = 4;
pub const OPS_WRITE: usize = 5;

/// QEMU's `THROTTLE_VALUE_MAX`.
const VALUE_MAX: u64 = 1_000_000_000_000_000;

/// One bucket's limits: `avg` units per second, bursts at `max` for `burst_length` seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limit {
    pub avg: u64,
    pub max: u64,
    pub burst_length: u64,
}

/// A group's limits, as `block-set-io-throttle` gives them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub buckets: [Limit; BUCKETS],
    pub iops_size: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LimitsError {
    #[error("bps/iops/max total values and read/write values cannot be used at the same time")]
    TotalAndSplit,
    #[error("bps/iops/max values must be within [0, {VALUE_MAX}]")]
    TooBig,
    #[error("the burst length cannot be 0")]
    ZeroBurstLength,
    #[error("burst length set without burst rate")]
    BurstLengthWithoutMax,
    #[error("bps_max/iops_max require corresponding bps/iops values")]
    MaxWithoutAvg,
    #[error("bps_max/iops_max cannot be lower than bps/iops")]
    MaxBelowAvg,
    #[error("burst length too high for this burst rate")]
    BurstTooLong,
}

impl Limits {
    /// Whether any limit is set (all zero: no throttling).
    pub fn enabled(&self) -> bool {
        self.buckets.iter().any(|b| b.avg > 0)
    }

    /// QEMU's checks (`throttle_is_valid`), with its messages.
    pub fn validate(&self) -> Result<(), LimitsError> {
        let b = &self.buckets;
        for (total, read, write) in [
            (BPS_TOTAL, BPS_READ, BPS_WRITE),
            (OPS_TOTAL, OPS_READ, OPS_WRITE),
        ] {
            let set = |i: usize, f: fn(&Limit) -> u64| b.get(i).is_some_and(|l| f(l) > 0);
            for f in [|l: &Limit| l.avg, |l: &Limit| l.max] {
                if set(total, f) && (set(read, f) || set(write, f)) {
                    return Err(LimitsError::TotalAndSplit);
                }
            }
        }
        if self.iops_size > VALUE_MAX {
            return Err(LimitsError::TooBig);
        }
        for l in b {
            if l.avg > VALUE_MAX || l.max > VALUE_MAX {
                return Err(LimitsError::TooBig);
            }
            if l.burst_length == 0 {
                return Err(LimitsError::ZeroBurstLength);
            }
            if l.max > 0 && l.burst_length > VALUE_MAX / l.max {
                return Err(LimitsError::BurstTooLong);
            }
            if l.max > 0 && l.avg == 0 {
                return Err(LimitsError::MaxWithoutAvg);
            }
            if l.max > 0 && l.max < l.avg {
                return Err(LimitsError::MaxBelowAvg);
            }
            if l.burst_length > 1 && l.max == 0 {
                return Err(LimitsError::BurstLengthWithoutMax);
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Default)]
struct Bucket {
    limit: Limit,
    level: f64,
    burst_level: f64,
}

impl Bucket {
    fn leak(&mut self, secs: f64) {
        self.level = (self.level - self.limit.avg as f64 * secs).max(0.0);
        if self.limit.burst_length > 1 {
            self.burst_level = (self.burst_level - self.limit.max as f64 * secs).max(0.0);
        }
    }

    /// Seconds the next request must wait.
    fn wait(&self) -> f64 {
        let l = self.limit;
        if l.avg == 0 {
            return 0.0;
        }
        let (size, burst_size) = if l.max == 0 {
            (l.avg as f64 / 10.0, 0.0)
        } else {
            (l.max as f64 * l.burst_length as f64, l.max as f64 / 10.0)
        };
        let extra = self.level - size;
        if extra > 0.0 {
            return extra / l.avg as f64;
        }
        if l.burst_length > 1 {
            let extra = self.burst_level - burst_size;
            if extra > 0.0 {
                return extra / l.max as f64;
            }
        }
        0.0
    }

    fn fill(&mut self, units: f64) {
        self.level += units;
        if self.limit.burst_length > 1 {
            self.burst_level += units;
        }
    }
}

struct Buckets {
    limits: Limits,
    b: [Bucket; BUCKETS],
    last_leak: Instant,
}

impl Buckets {
    fn new(limits: Limits, now: Instant) -> Self {
        let mut b = [Bucket::default(); BUCKETS];
        for (b, l) in b.iter_mut().zip(limits.buckets.iter()) {
            b.limit = *l;
        }
        Buckets {
            limits,
            b,
            last_leak: now,
        }
    }

    fn leak(&mut self, now: Instant) {
        let secs = now.saturating_duration_since(self.last_leak).as_secs_f64();
        self.last_leak = self.last_leak.max(now);
        if secs > 0.0 {
            for b in &mut self.b {
                b.leak(secs);
            }
        }
    }

    fn relevant(write: bool) -> [usize; 4] {
        if write {
            [BPS_TOTAL, OPS_TOTAL, BPS_WRITE, OPS_WRITE]
        } else {
            [BPS_TOTAL, OPS_TOTAL, BPS_READ, OPS_READ]
        }
    }

    fn wait(&self, write: bool) -> f64 {
        Self::relevant(write)
            .iter()
            .filter_map(|&i| self.b.get(i))
            .map(Bucket::wait)
            .fold(0.0, f64::max)
    }

    fn account(&mut self, write: bool, bytes: u64) {
        let size = self.limits.iops_size;
        let units = if size > 0 && bytes > size {
            bytes as f64 / size as f64
        } else {
            1.0
        };
        let [bps_total, ops_total, bps_dir, ops_dir] = Self::relevant(write);
        for (i, n) in [
            (bps_total, bytes as f64),
            (ops_total, units),
            (bps_dir, bytes as f64),
            (ops_dir, units),
        ] {
            if let Some(b) = self.b.get_mut(i) {
                b.fill(n);
            }
        }
    }
}

/// One throttle group's buckets.
pub struct Throttle {
    pub name: String,
    buckets: Mutex<Buckets>,
}

impl Throttle {
    fn new(name: &str, limits: Limits) -> Self {
        Throttle {
            name: name.into(),
            buckets: Mutex::new(Buckets::new(limits, Instant::now())),
        }
    }

    /// Admits a request of `bytes` at `now` (counting it), or says when to ask again.
    pub fn admit(&self, write: bool, bytes: u64, now: Instant) -> Option<Instant> {
        let mut b = self.buckets.lock();
        b.leak(now);
        let wait = b.wait(write);
        if wait > 0.0 {
            // At least a microsecond, so that rounding never asks again at once.
            let wait = Duration::from_secs_f64(wait.min(3600.0)).max(Duration::from_micros(1));
            return Some(now + wait);
        }
        b.account(write, bytes);
        None
    }

    pub fn limits(&self) -> Limits {
        self.buckets.lock().limits.clone()
    }

    /// New limits; the buckets start empty, as in QEMU.
    fn set(&self, limits: Limits) {
        *self.buckets.lock() = Buckets::new(limits, Instant::now());
    }
}

/// The group an export is in, if it is throttled. Queues look at `enabled` (one relaxed
/// load) on every request and at the group only when it is set.
#[derive(Default)]
pub struct ThrottleSlot {
    enabled: AtomicBool,
    group: Mutex<Option<Arc<Throttle>>>,
}

impl ThrottleSlot {
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub fn group(&self) -> Option<Arc<Throttle>> {
        self.group.lock().clone()
    }

    fn put(&self, g: Option<Arc<Throttle>>) {
        let mut slot = self.group.lock();
        self.enabled.store(g.is_some(), Ordering::Relaxed);
        *slot = g;
    }
}

/// The daemon's throttle groups, by name; a group lives while an export is in it.
#[derive(Default)]
pub struct ThrottleGroups {
    groups: Mutex<HashMap<String, Weak<Throttle>>>,
}

impl ThrottleGroups {
    /// Puts `slot` in group `name` with `limits` (which then hold for the whole group), or
    /// with no limits takes it out of any group.
    pub fn apply(
        &self,
        slot: &ThrottleSlot,
        name: &str,
        limits: Limits,
    ) -> Result<(), LimitsError> {
        limits.validate()?;
        if !limits.enabled() {
            slot.put(None);
            return Ok(());
        }
        let mut groups = self.groups.lock();
        groups.retain(|_, g| g.strong_count() > 0);
        let group = match groups.get(name).and_then(Weak::upgrade) {
            Some(g) => {
                g.set(limits);
                g
            }
            None => {
                let g = Arc::new(Throttle::new(name, limits));
                groups.insert(name.into(), Arc::downgrade(&g));
                g
            }
        };
        slot.put(Some(group));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(i: usize, avg: u64, max: u64, burst_length: u64) -> Limits {
        let mut l = Limits {
            buckets: [Limit {
                avg: 0,
                max: 0,
                burst_length: 1,
            }; BUCKETS],
            iops_size: 0,
        };
        l.buckets[i] = Limit {
            avg,
            max,
            burst_length,
        };
        l
    }

    /// Requests admitted in `secs` of simulated time when a client always has one waiting
    /// and asks again exactly when told.
    fn admitted(t: &Throttle, write: bool, bytes: u64, secs: f64) -> u64 {
        let start = Instant::now();
        let end = start + Duration::from_secs_f64(secs);
        let mut now = start;
        let mut n = 0;
        while now < end {
            match t.admit(write, bytes, now) {
                None => n += 1,
                Some(at) => now = at,
            }
        }
        n
    }

    #[test]
    fn an_iops_limit_holds_after_a_tenth_of_a_second_of_burst() {
        let t = Throttle::new("g", limits(OPS_TOTAL, 100, 0, 1));
        let n = admitted(&t, false, 4096, 10.0);
        // 100/s for 10 s, plus the bucket's 10 operations of allowance, plus the one that
        // tips it over.
        assert!((1000..=1012).contains(&n), "{n}");
    }

    #[test]
    fn a_bps_limit_counts_bytes_and_only_its_direction() {
        let t = Throttle::new("g", limits(BPS_WRITE, 1 << 20, 0, 1));
        let n = admitted(&t, true, 64 << 10, 5.0);
        assert!((80..=83).contains(&n), "16 per second: {n}");
        assert_eq!(
            t.admit(false, 1 << 30, Instant::now()),
            None,
            "reads are free"
        );
    }

    #[test]
    fn a_burst_runs_at_max_for_its_length_then_falls_to_avg() {
        let t = Throttle::new("g", limits(OPS_READ, 10, 100, 2));
        // During the burst: at most max per second (plus a tenth of a second's allowance).
        let first = admitted(&t, false, 512, 1.0);
        assert!((100..=112).contains(&first), "{first}");
        let n = admitted(&t, false, 512, 10.0);
        // The burst bucket (max * length = 200) fills, then 10/s.
        assert!(n < 250, "{n}");
    }

    #[test]
    fn iops_size_makes_big_requests_count_as_several() {
        let mut l = limits(OPS_TOTAL, 100, 0, 1);
        l.iops_size = 4096;
        let t = Throttle::new("g", l);
        let n = admitted(&t, false, 16384, 10.0);
        assert!((250..=255).contains(&n), "{n}");
    }

    #[test]
    fn limits_are_checked_as_qemu_checks_them() {
        let mut l = limits(BPS_TOTAL, 100, 0, 1);
        assert_eq!(l.validate(), Ok(()));
        l.buckets[BPS_READ].avg = 5;
        assert_eq!(l.validate(), Err(LimitsError::TotalAndSplit));
        assert_eq!(
            limits(OPS_READ, 0, 5, 1).validate(),
            Err(LimitsError::MaxWithoutAvg)
        );
        assert_eq!(
            limits(OPS_READ, 10, 5, 1).validate(),
            Err(LimitsError::MaxBelowAvg)
        );
        assert_eq!(
            limits(OPS_READ, 10, 0, 5).validate(),
            Err(LimitsError::BurstLengthWithoutMax)
        );
        assert_eq!(
            limits(OPS_READ, 10, 20, 0).validate(),
            Err(LimitsError::ZeroBurstLength)
        );
        assert_eq!(
            limits(OPS_READ, VALUE_MAX + 1, 0, 1).validate(),
            Err(LimitsError::TooBig)
        );
    }

    #[test]
    fn exports_in_one_group_share_its_buckets_and_zero_limits_leave_it() {
        let groups = ThrottleGroups::default();
        let (a, b) = (ThrottleSlot::default(), ThrottleSlot::default());
        groups.apply(&a, "g", limits(OPS_TOTAL, 10, 0, 1)).unwrap();
        groups.apply(&b, "g", limits(OPS_TOTAL, 20, 0, 1)).unwrap();
        assert!(a.enabled() && b.enabled());
        let (ga, gb) = (a.group().unwrap(), b.group().unwrap());
        assert!(Arc::ptr_eq(&ga, &gb));
        assert_eq!(
            ga.limits().buckets[OPS_TOTAL].avg,
            20,
            "the last setting holds"
        );
        groups.apply(&a, "g", Limits::default()).unwrap_err();
        let mut off = limits(OPS_TOTAL, 0, 0, 1);
        off.buckets[OPS_TOTAL].avg = 0;
        groups.apply(&a, "g", off).unwrap();
        assert!(!a.enabled() && a.group().is_none());
    }
}
