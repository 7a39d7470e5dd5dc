//! The open-descriptor limit of a daemon that serves many exports.
//!
//! Every export and connection holds a few descriptors (sockets, eventfds, memory region
//! files, an io_uring), so a host with hundreds of VMs passes the usual soft limit of 1024
//! long before the hard one. The soft limit exists for programs that use `select(2)`; this
//! daemon does not, so it takes what the hard limit allows.

use log::{debug, warn};

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the soft limit now in force.
pub fn raise_to_hard() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for the kernel to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        warn!(
            "cannot read the descriptor limit: {}",
            std::io::Error::last_os_error()
        );
        return None;
    }
    if lim.rlim_cur >= lim.rlim_max {
        return Some(lim.rlim_cur);
    }
    let raised = libc::rlimit {
        rlim_cur: lim.rlim_max,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: `raised` is a valid rlimit; raising the soft limit up to the hard one needs no
    // privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        warn!(
            "cannot raise the descriptor limit from {} to {}: {}",
            lim.rlim_cur,
            lim.rlim_max,
            std::io::Error::last_os_error()
        );
        return Some(lim.rlim_cur);
    }
    debug!(
        "descriptor limit raised from {} to {}",
        lim.rlim_cur, lim.rlim_max
    );
    Some(lim.rlim_max)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_soft_limit_becomes_the_hard_one() {
        let now = super::raise_to_hard().unwrap();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: a valid rlimit to fill.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(lim.rlim_cur, lim.rlim_max);
        assert_eq!(now, lim.rlim_max);
    }
}
