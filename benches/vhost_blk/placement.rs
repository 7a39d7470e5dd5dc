//! Where the client and the servers run. On a small VM a wakeup across vCPUs can cost tens of
//! microseconds (the idle vCPU is halted in the hypervisor) while one on the same vCPU is a
//! context switch, so leaving placement to the scheduler makes every cell a coin toss between
//! the two. Both servers and fio get the same placement.

use std::sync::atomic::{AtomicI32, Ordering};

/// Where the servers run relative to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Placement {
    /// Client (and fio) on CPU 0, the server on CPU 1: a server on its own core, as in a
    /// deployment.
    Split,
    /// Client, fio and server all on CPU 0: the vhost path's own cost, without cross-CPU
    /// wakeups.
    Same,
    /// Wherever the scheduler puts them.
    None,
}

/// The CPU a server is started on, or -1 for any.
static SERVER_CPU: AtomicI32 = AtomicI32::new(-1);

/// Pins process (or thread) `pid`, 0 for the caller, to `cpu`.
pub fn pin_to(pid: libc::pid_t, cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes inside `set` (it ignores CPUs past the set's size).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let r = unsafe { libc::sched_setaffinity(pid, std::mem::size_of_val(&set), &set) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Pins the calling thread (the client) and records where servers go. Returns what it did.
pub fn apply(p: Placement) -> Result<String, String> {
    // SAFETY: sysconf has no memory effects.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let server = match p {
        Placement::None => return Ok("placement left to the scheduler".into()),
        Placement::Split if cpus < 2 => {
            return Ok("one CPU: placement left to the scheduler".into())
        }
        Placement::Split => 1,
        Placement::Same => 0,
    };
    pin_to(0, 0).map_err(|e| format!("pinning the client to CPU 0: {e}"))?;
    SERVER_CPU.store(server, Ordering::Release);
    Ok(format!("client and fio on CPU 0, servers on CPU {server}"))
}

/// The CPU servers are pinned to, if any.
pub fn server_cpu() -> Option<usize> {
    usize::try_from(SERVER_CPU.load(Ordering::Acquire)).ok()
}
