//! How an export serves its node: queues, polling, batching. One type for `--export` and
//! QMP `block-export-add`, with its defaults and the one validation both go through (again
//! in `State::add_export`, where every export starts).

use std::time::Duration;

use crate::vhost::{DeviceSettings, MAX_QUEUES, MAX_QUEUE_SIZE};

/// Virtqueues of an export unless asked otherwise.
pub const DEFAULT_QUEUES: u16 = 2;
/// Entries per virtqueue unless asked otherwise.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// How long a queue worker keeps polling after the last request or completion, in µs (as
/// QEMU's iothreads do by default): on small VMs waking a sleeping worker costs more.
pub const DEFAULT_POLL_US: u32 = 32;
/// At most this much polling per queue.
pub const MAX_POLL_US: u32 = 1000;
/// Requests a queue worker hands to io_uring per system call. Small batches let the host
/// device start on the first requests while the worker frames the rest; one batch of a whole
/// queue depth made a virtio disk finish it in one go and then sit idle for the round trip
/// (4 KiB random writes at QD32: 84k IOPS at 32 per call, 114-134k at 4).
pub const DEFAULT_SUBMIT_BATCH: u16 = 4;

/// An export's settings (besides which node, where, and whether writable).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportSettings {
    pub num_queues: u16,
    pub queue_size: u16,
    /// Microseconds each queue worker polls after activity (0: never).
    pub poll_us: u32,
    /// Requests each queue worker hands to io_uring per system call at most.
    pub submit_batch: u16,
}

impl Default for ExportSettings {
    fn default() -> Self {
        ExportSettings {
            num_queues: DEFAULT_QUEUES,
            queue_size: DEFAULT_QUEUE_SIZE,
            poll_us: DEFAULT_POLL_US,
            submit_batch: DEFAULT_SUBMIT_BATCH,
        }
    }
}

/// One of the settings, to name it in errors the way the caller spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    NumQueues,
    QueueSize,
    PollUs,
    SubmitBatch,
}

impl Setting {
    /// Its key in QMP `block-export-add`.
    pub fn qmp_key(self) -> &'static str {
        match self {
            Setting::NumQueues => "num-queues",
            Setting::QueueSize => "queue-size",
            Setting::PollUs => "poll-us",
            Setting::SubmitBatch => "submit-batch",
        }
    }

    /// Its key in `--export`.
    pub fn cli_key(self) -> &'static str {
        match self {
            Setting::NumQueues => "queues",
            other => other.qmp_key(),
        }
    }
}

/// A setting out of its range.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{} {value}: {rule}", .setting.qmp_key())]
pub struct SettingsError {
    pub setting: Setting,
    pub value: u64,
    /// What the value must be, e.g. "must be 1 to 16".
    pub rule: String,
}

impl ExportSettings {
    /// Checks every setting against what the device can do.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let bad = |setting, value: u64, rule: String| {
            Err(SettingsError {
                setting,
                value,
                rule,
            })
        };
        if !(1..=MAX_QUEUES).contains(&self.num_queues) {
            let rule = format!("must be 1 to {MAX_QUEUES}");
            return bad(Setting::NumQueues, self.num_queues.into(), rule);
        }
        if !self.queue_size.is_power_of_two() || self.queue_size > MAX_QUEUE_SIZE {
            let rule = format!("must be a power of two up to {MAX_QUEUE_SIZE}");
            return bad(Setting::QueueSize, self.queue_size.into(), rule);
        }
        if self.poll_us > MAX_POLL_US {
            let rule = format!("must be 0 to {MAX_POLL_US}");
            return bad(Setting::PollUs, self.poll_us.into(), rule);
        }
        if !(1..=MAX_QUEUE_SIZE).contains(&self.submit_batch) {
            let rule = format!("must be 1 to {MAX_QUEUE_SIZE}");
            return bad(Setting::SubmitBatch, self.submit_batch.into(), rule);
        }
        Ok(())
    }

    /// What the vhost device is built with; `serial` is what GET_ID returns.
    pub fn device_settings(&self, serial: &str, read_only: bool) -> DeviceSettings {
        DeviceSettings {
            serial: serial.into(),
            num_queues: self.num_queues,
            queue_size: self.queue_size,
            read_only,
            poll: Duration::from_micros(u64::from(self.poll_us)),
            submit_batch: self.submit_batch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(change: impl FnOnce(&mut ExportSettings)) -> Option<SettingsError> {
        let mut s = ExportSettings::default();
        change(&mut s);
        s.validate().err()
    }

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(ExportSettings::default().validate(), Ok(()));
    }

    #[test]
    fn each_range_is_checked_and_named() {
        let named = |change: fn(&mut ExportSettings), setting, rule: &str| {
            let e = error_of(change).unwrap();
            assert_eq!(e.setting, setting);
            assert!(e.rule.contains(rule), "{e}");
        };
        named(|s| s.num_queues = 0, Setting::NumQueues, "1 to 16");
        named(|s| s.num_queues = 17, Setting::NumQueues, "1 to 16");
        named(|s| s.queue_size = 100, Setting::QueueSize, "power of two");
        named(|s| s.queue_size = 2048, Setting::QueueSize, "up to 1024");
        named(|s| s.queue_size = 0, Setting::QueueSize, "power of two");
        named(|s| s.poll_us = 1001, Setting::PollUs, "0 to 1000");
        named(|s| s.submit_batch = 0, Setting::SubmitBatch, "1 to 1024");
        named(|s| s.submit_batch = 1025, Setting::SubmitBatch, "1 to 1024");
        assert_eq!(error_of(|s| s.poll_us = 0), None);
        assert_eq!(error_of(|s| s.queue_size = 1024), None);
    }

    #[test]
    fn the_device_gets_every_setting() {
        let s = ExportSettings {
            num_queues: 4,
            queue_size: 512,
            poll_us: 10,
            submit_batch: 8,
        };
        let d = s.device_settings("vm1", true);
        assert_eq!(d.serial, "vm1");
        assert_eq!((d.num_queues, d.queue_size, d.submit_batch), (4, 512, 8));
        assert_eq!(d.poll, Duration::from_micros(10));
        assert!(d.read_only);
    }
}
