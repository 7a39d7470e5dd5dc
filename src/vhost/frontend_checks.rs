//! Every vhost-user request a frontend sends passes here before vhost-user-backend's handler
//! sees it: the one place where the protocol's limits and the frontend's memory and fds are
//! checked. A refused request is answered with an error (a negative REPLY_ACK when the frontend
//! asked for one) and changes nothing; the connection then ends (see `connection.rs`).
//!
//! What is checked, and why:
//! - SET_MEM_TABLE: at most [`MAX_TABLE_REGIONS`] regions; ADD_MEM_REG: no more regions than
//!   GET_MAX_MEM_SLOTS said; every region against its fd and against the others
//!   ([`memory_table`]). With a [`GuestMemoryGuard`], slots of the SIGBUS table are reserved
//!   for the regions before they are mapped (a full table refuses the message) and the mapped
//!   ranges registered after (`sigbus.rs`).
//! - SET_VRING_NUM: a power of two from 1 to the export's queue size (the split ring's index
//!   arithmetic assumes a power of two; virtio 1.2 §2.7).
//! - SET_VRING_KICK/CALL/ERR: eventfds only. A pipe as call fd fills up when nobody reads it
//!   and then blocks the queue's worker in write() forever; a pipe or socket as kick fd is
//!   read 8 bytes at a time. Kick and call eventfds are made non-blocking too: a frontend can
//!   hold its call eventfd's counter at the maximum (a write then blocks) or read its own kick
//!   eventfd before the worker does (the worker's read then blocks), and a worker blocked in a
//!   system call can never be joined, so the export would never serve anyone again. The flag
//!   is on the file description the frontend shares; QEMU and cloud-hypervisor create these
//!   eventfds non-blocking anyway, and libblkio reads its call eventfd only after poll().
//!   A worker that meets a full call eventfd stops (its queue is dead until the frontend
//!   reconnects); nothing else is affected.
//! - SET_PROTOCOL_FEATURES: only features the device offered; the vhost crate gates requests
//!   such as SET_LOG_BASE or SET_INFLIGHT_FD on what the frontend *acked*. Requests for
//!   features this device does not offer are refused here regardless.
//! - SET_LOG_BASE: the log fd within its file and sealed against shrinking, regions on log
//!   pages ([`LogBase::check`]); the handler refuses a log too small for the memory. The log is
//!   given again to regions mapped later. SET_VRING_ADDR with `VHOST_VRING_F_LOG`: the used
//!   ring's log address must be the used ring's guest address, which is where its writes are
//!   logged (`dirty_log.rs`).
//! - GET_INFLIGHT_FD / SET_INFLIGHT_FD (INFLIGHT_SHMFD): at most the device's queues, a
//!   power-of-two queue size within the export's; a region handed back must be a regular
//!   file sealed against shrinking that holds the queues' bytes (`inflight.rs`). Once a
//!   region is attached, every SET_VRING_KICK is followed by a kick of our own, so a ring
//!   restarting after a backend restart resubmits what was in flight without waiting for the
//!   guest (which waits for those very requests).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use log::warn;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as VhostUserError, GpuBackend, Result, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;

use super::dirty_log::LogBase;
use super::guest_memory_guard::{GuestMemoryGuard, Reservation};
use super::inflight::{InflightRegion, Tracker};
use super::memory_table::{self, Proposed, Region, UnsealedMemory, MAX_TABLE_REGIONS};

/// A request handler `H` behind the checks of this module.
pub struct Checked<H> {
    inner: H,
    /// The regions mapped now, as the frontend described them.
    regions: Vec<Region>,
    max_slots: usize,
    max_queue_size: u32,
    /// Protocol features the frontend may ack (REPLY_ACK is added by the vhost crate).
    offered_protocol: u64,
    unsealed: UnsealedMemory,
    guard: Option<GuestMemoryGuard>,
    /// The dirty log, if the frontend gave one.
    log: LogBase,
    /// Where an inflight region goes, and the device's queue count.
    inflight: Option<(std::sync::Arc<Tracker>, u16)>,
}

fn refused(what: String) -> VhostUserError {
    warn!("frontend request refused: {what}");
    VhostUserError::ReqHandlerError(io::Error::new(io::ErrorKind::InvalidInput, what))
}

fn not_offered(request: &'static str) -> VhostUserError {
    refused(format!("{request}: the device does not offer it"))
}

/// Whether `fd` is an eventfd (the only kind of fd a vring's kick, call or err may be).
pub fn is_eventfd(fd: BorrowedFd<'_>) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .is_ok_and(|target| target.as_os_str() == "anon_inode:[eventfd]")
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL only reads the status flags of the borrowed fd.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK != 0 {
        return Ok(());
    }
    // SAFETY: F_SETFL changes only the status flags of the borrowed fd's file description.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl<H: VhostUserBackendReqHandlerMut> Checked<H> {
    /// `max_queue_size`: the largest ring the export allows.
    pub fn new(mut inner: H, max_queue_size: u32, unsealed: UnsealedMemory) -> Result<Self> {
        let max_slots = usize::try_from(inner.get_max_mem_slots()?).unwrap_or(usize::MAX);
        let offered_protocol =
            (inner.get_protocol_features()? | VhostUserProtocolFeatures::REPLY_ACK).bits();
        Ok(Checked {
            inner,
            regions: Vec::new(),
            max_slots,
            max_queue_size,
            offered_protocol,
            unsealed,
            guard: None,
            log: LogBase::default(),
            inflight: None,
        })
    }

    /// Registers every region mapped from now on with `guard` (see `guest_memory_guard.rs`).
    pub fn guard_memory(mut self, guard: GuestMemoryGuard) -> Self {
        self.guard = Some(guard);
        self
    }

    /// Offers INFLIGHT_SHMFD's messages for a device of `num_queues` queues: the region a
    /// frontend asks for or hands back is attached to `tracker`.
    pub fn track_inflight(mut self, tracker: std::sync::Arc<Tracker>, num_queues: u16) -> Self {
        self.inflight = Some((tracker, num_queues));
        self
    }

    fn inflight_limits(&self, request: &'static str) -> Result<(&Tracker, u16, u16)> {
        let (tracker, queues) = self.inflight.as_ref().ok_or_else(|| not_offered(request))?;
        let size = u16::try_from(self.max_queue_size).unwrap_or(u16::MAX);
        Ok((tracker, *queues, size))
    }

    fn reserve(&self, request: &str, regions: usize) -> Result<Reservation> {
        match &self.guard {
            Some(g) => g
                .reserve(regions)
                .map_err(|e| refused(format!("{request}: {e}"))),
            None => Ok(Vec::new()),
        }
    }

    /// After the inner handler saw a memory message (accepted or not: the table it installed,
    /// if any, is what counts).
    fn installed(&mut self, reserved: Reservation) {
        if let Some(g) = &mut self.guard {
            g.installed(reserved);
        }
    }

    fn check_ring_fd(&self, request: &str, index: u8, file: &Option<File>) -> Result<()> {
        match file {
            Some(f) if !is_eventfd(f.as_fd()) => Err(refused(format!(
                "{request} for queue {index}: the fd is not an eventfd"
            ))),
            _ => Ok(()),
        }
    }

    /// [`Self::check_ring_fd`], then makes the eventfd non-blocking (see the module comment).
    fn check_notifier(&self, request: &str, index: u8, file: &Option<File>) -> Result<()> {
        self.check_ring_fd(request, index, file)?;
        if let Some(f) = file {
            set_nonblocking(f.as_fd()).map_err(|e| {
                refused(format!(
                    "{request} for queue {index}: cannot make it non-blocking: {e}"
                ))
            })?;
        }
        Ok(())
    }

    /// After a memory message: the regions just mapped log into the frontend's log, if it
    /// gave one.
    fn log_again(&mut self, request: &str) -> Result<()> {
        let Some(again) = self.log.again() else {
            return Ok(());
        };
        let (log, file) = again.map_err(|e| refused(format!("{request}: {e}")))?;
        LogBase::check(&log, &file, self.regions.iter().map(|r| r.guest))
            .map_err(|e| refused(format!("{request} while logging: {e}")))?;
        self.inner.set_log_base(&log, file)
    }

    fn check_region(&self, p: Proposed, fd: BorrowedFd<'_>, others: &[Region]) -> Result<Region> {
        let region = memory_table::check(p, fd, self.unsealed)
            .map_err(|e| refused(format!("memory region at guest {:#x}: {e}", p.guest)))?;
        memory_table::check_disjoint(&region, others)
            .map_err(|e| refused(format!("memory region at guest {:#x}: {e}", p.guest)))?;
        Ok(region)
    }
}

impl<H: VhostUserBackendReqHandlerMut> VhostUserBackendReqHandlerMut for Checked<H> {
    fn set_owner(&mut self) -> Result<()> {
        self.inner.set_owner()
    }

    fn reset_owner(&mut self) -> Result<()> {
        self.inner.reset_owner()
    }

    fn reset_device(&mut self) -> Result<()> {
        self.inner.reset_device()
    }

    fn get_features(&mut self) -> Result<u64> {
        self.inner.get_features()
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        self.inner.set_features(features)
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        if ctx.len() > MAX_TABLE_REGIONS {
            return Err(refused(format!(
                "SET_MEM_TABLE with {} regions (at most {MAX_TABLE_REGIONS})",
                ctx.len()
            )));
        }
        if ctx.len() != files.len() {
            return Err(refused(format!(
                "SET_MEM_TABLE with {} regions and {} fds",
                ctx.len(),
                files.len()
            )));
        }
        let mut table = Vec::with_capacity(ctx.len());
        for (r, f) in ctx.iter().zip(&files) {
            let p = Proposed {
                guest: r.guest_phys_addr,
                size: r.memory_size,
                user: r.user_addr,
                offset: r.mmap_offset,
            };
            let region = self.check_region(p, f.as_fd(), &table)?;
            table.push(region);
        }
        let reserved = self.reserve("SET_MEM_TABLE", ctx.len())?;
        let reply = self.inner.set_mem_table(ctx, files, postcopy_listening);
        self.installed(reserved);
        let reply = reply?;
        self.regions = table;
        self.log_again("SET_MEM_TABLE")?;
        Ok(reply)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        if !num.is_power_of_two() || num > self.max_queue_size {
            return Err(refused(format!(
                "SET_VRING_NUM {num} for queue {index}: not a power of two from 1 to {}",
                self.max_queue_size
            )));
        }
        self.inner.set_vring_num(index, num)
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        log: u64,
    ) -> Result<()> {
        if flags.contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG) {
            let used_guest = self
                .regions
                .iter()
                .find(|r| used >= r.user && used - r.user < r.size)
                .map(|r| r.guest + (used - r.user));
            if used_guest != Some(log) {
                return Err(refused(format!(
                    "SET_VRING_ADDR for queue {index}: used ring log address {log:#x} is not \
                     the used ring's guest address"
                )));
            }
        }
        self.inner
            .set_vring_addr(index, flags, descriptor, used, available, log)
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        self.inner.set_vring_base(index, base)
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        self.inner.get_vring_base(index)
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.check_notifier("SET_VRING_KICK", index, &fd)?;
        let tracked = self.inflight.as_ref().is_some_and(|(t, _)| t.is_active());
        let wake = fd
            .as_ref()
            .filter(|_| tracked)
            .and_then(|f| f.try_clone().ok());
        self.inner.set_vring_kick(index, fd)?;
        if let Some(mut kick) = wake {
            // The worker recovers the ring on its first pass; a full counter (EAGAIN) is a
            // kick already pending.
            let _ = std::io::Write::write(&mut kick, &1u64.to_ne_bytes());
        }
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.check_notifier("SET_VRING_CALL", index, &fd)?;
        self.inner.set_vring_call(index, fd)
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.check_ring_fd("SET_VRING_ERR", index, &fd)?;
        self.inner.set_vring_err(index, fd)
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        self.inner.get_protocol_features()
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        let extra = features & !self.offered_protocol;
        if extra != 0 {
            return Err(refused(format!(
                "SET_PROTOCOL_FEATURES acks {extra:#x}, which the device did not offer"
            )));
        }
        self.inner.set_protocol_features(features)
    }

    fn get_queue_num(&mut self) -> Result<u64> {
        self.inner.get_queue_num()
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        self.inner.set_vring_enable(index, enable)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        flags: VhostUserConfigFlags,
    ) -> Result<Vec<u8>> {
        self.inner.get_config(offset, size, flags)
    }

    fn set_config(&mut self, offset: u32, buf: &[u8], flags: VhostUserConfigFlags) -> Result<()> {
        self.inner.set_config(offset, buf, flags)
    }

    fn set_backend_req_fd(&mut self, backend: Backend) {
        self.inner.set_backend_req_fd(backend)
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> Result<()> {
        Err(not_offered("GPU_SET_SOCKET"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        Err(not_offered("GET_SHARED_OBJECT"))
    }

    fn get_inflight_fd(&mut self, msg: &VhostUserInflight) -> Result<(VhostUserInflight, File)> {
        let (tracker, max_queues, max_size) = self.inflight_limits("GET_INFLIGHT_FD")?;
        let (num_queues, queue_size) = (msg.num_queues, msg.queue_size);
        let (region, file) = InflightRegion::create(num_queues, queue_size, max_queues, max_size)
            .map_err(|e| refused(format!("GET_INFLIGHT_FD: {e}")))?;
        let size = u64::try_from(region.len()).unwrap_or(u64::MAX);
        tracker.attach(std::sync::Arc::new(region));
        Ok((
            VhostUserInflight::new(size, 0, num_queues, queue_size),
            file,
        ))
    }

    fn set_inflight_fd(&mut self, msg: &VhostUserInflight, file: File) -> Result<()> {
        let (tracker, max_queues, max_size) = self.inflight_limits("SET_INFLIGHT_FD")?;
        let geometry = (msg.num_queues, msg.queue_size);
        let (size, offset) = (msg.mmap_size, msg.mmap_offset);
        let region = InflightRegion::open(&file, size, offset, geometry, (max_queues, max_size))
            .map_err(|e| refused(format!("SET_INFLIGHT_FD: {e}")))?;
        tracker.attach(std::sync::Arc::new(region));
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Ok(u64::try_from(self.max_slots).unwrap_or(u64::MAX))
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy_listening: Option<bool>,
    ) -> Result<Option<VhostUserMemoryRegionBase>> {
        if self.regions.len() >= self.max_slots {
            return Err(refused(format!(
                "ADD_MEM_REG beyond the {} slots of GET_MAX_MEM_SLOTS",
                self.max_slots
            )));
        }
        let p = Proposed {
            guest: region.guest_phys_addr,
            size: region.memory_size,
            user: region.user_addr,
            offset: region.mmap_offset,
        };
        let checked = self.check_region(p, fd.as_fd(), &self.regions)?;
        let reserved = self.reserve("ADD_MEM_REG", 1)?;
        let reply = self.inner.add_mem_region(region, fd, postcopy_listening);
        self.installed(reserved);
        let reply = reply?;
        self.regions.push(checked);
        self.log_again("ADD_MEM_REG")?;
        Ok(reply)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> Result<()> {
        let (guest, size) = (region.guest_phys_addr, region.memory_size);
        let removed = self.inner.remove_mem_region(region);
        self.installed(Vec::new());
        removed?;
        self.regions
            .retain(|r| !(r.guest == guest && r.size == size));
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> Result<Option<File>> {
        Err(not_offered("SET_DEVICE_STATE_FD"))
    }

    fn check_device_state(&mut self) -> Result<()> {
        Err(not_offered("CHECK_DEVICE_STATE"))
    }

    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        Err(not_offered("GET_SHMEM_CONFIG"))
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> Result<()> {
        LogBase::check(log, &file, self.regions.iter().map(|r| r.guest))
            .map_err(|e| refused(format!("SET_LOG_BASE: {e}")))?;
        let kept = file
            .try_clone()
            .map_err(|e| refused(format!("SET_LOG_BASE: cannot keep the log fd: {e}")))?;
        self.inner.set_log_base(log, file)?;
        self.log.keep(log, kept);
        Ok(())
    }
}
