//! A daemon standing by for a pool on RBD (`serve --metadata rbd:... --data rbd:... --standby`):
//! it runs its QMP socket (and its exports of other devices) without the pool, reports who owns
//! the pool (`query-pool`), and takes it over when told to (`pool-take-over`): the owner is
//! fenced as with `--take-over` (see docs/architecture.md, "A pool on RBD"), the pool opens at
//! its last commit, and the thin exports of the command line (or `--config`) and the saved
//! ones start then. Until then nothing of the pool is open, and its thin exports do not run.
//!
//! A take-over that fails (the cluster unreachable, the images gone) leaves the daemon
//! standing by, to be told again. Whether the owner is lost is for an operator or a manager to
//! decide, never inferred here (see `engine/rbd/lock.rs`).

use std::sync::{Arc, Weak};

use log::{error, info, warn};
use parking_lot::Mutex;

use super::rbd_pool::{self, ImageOwners};
use super::state::State;
use super::{nbd, restore, saved, start_export, PoolLocation};
use crate::export_spec::{Backing, ExportSpec};

/// Set by an upgrade's exec when the pool of a standby that took it over was ours: the new
/// process, started with the same `--standby`, opens the pool at once (its locks were released
/// for it, so there is nothing to fence).
pub const OWNED_ENV: &str = "THINBLK_STANDBY_OWNED";

/// What a standby takes over, and what it starts then.
pub struct Standby {
    loc: PoolLocation,
    /// The thin exports asked for at start, started by the take-over.
    deferred: Vec<ExportSpec>,
    /// Whether `--nbd` serves them read-only too, as it does the exports started at once.
    nbd: bool,
    state: Weak<State>,
    /// Held for a whole take-over: a second one waits, then finds the pool taken.
    taking: Mutex<()>,
}

/// What a take-over did.
#[derive(Debug, Default)]
pub struct TakenOver {
    /// The owners whose locks were broken (their Ceph clients blocklisted); empty when the
    /// pool was free.
    pub fenced: Vec<String>,
    /// The exports that started.
    pub exports: Vec<String>,
    /// The exports that did not start, with why (the pool is ours all the same).
    pub failed: Vec<(String, String)>,
}

/// Why a take-over did not happen.
#[derive(Debug, thiserror::Error)]
pub enum TakeOverError {
    #[error("this daemon owns the pool already")]
    AlreadyOwner,
    #[error("the daemon is stopping")]
    Stopping,
    #[error("taking the pool over: {0}")]
    Open(String),
}

/// The exports of the command line to start now, and those (the thin ones) a standby starts
/// once it owns the pool.
pub fn split_exports(exports: &[ExportSpec]) -> (Vec<ExportSpec>, Vec<ExportSpec>) {
    exports
        .iter()
        .cloned()
        .partition(|e| !matches!(e.backing, Backing::Thin { .. }))
}

/// Whether an upgrade handed this process a pool it owned in its standby (see [`OWNED_ENV`]).
pub fn owned_by_upgrade() -> bool {
    std::env::var_os(OWNED_ENV).is_some_and(|v| v == "1")
}

/// The environment an upgrade's exec adds: that the pool was ours, if it was.
pub fn upgrade_env(state: &State) -> Vec<(&'static str, &'static str)> {
    match (state.standby(), state.thin()) {
        (Some(_), Some(_)) => vec![(OWNED_ENV, "1")],
        _ => Vec::new(),
    }
}

impl Standby {
    pub fn new(
        loc: PoolLocation,
        deferred: Vec<ExportSpec>,
        nbd: bool,
        state: &Arc<State>,
    ) -> Arc<Standby> {
        Arc::new(Standby {
            loc,
            deferred,
            nbd,
            state: Arc::downgrade(state),
            taking: Mutex::new(()),
        })
    }

    /// `POOL/IMAGE` of the metadata and the data image.
    pub fn images(&self) -> (String, String) {
        match &self.loc.rbd {
            Some(spec) => (spec.metadata.clone(), spec.data.clone()),
            None => Default::default(),
        }
    }

    /// Who holds the pool's images now, asked of the cluster.
    pub fn owners(&self) -> Result<Vec<ImageOwners>, String> {
        let spec = self.loc.rbd.as_ref().ok_or("the pool is not on RBD")?;
        rbd_pool::owners(spec).map_err(|e| error_chain(&e))
    }

    /// Fences the pool's owner, opens the pool at its last commit, and starts the exports
    /// that waited for it.
    pub fn take_over(&self) -> Result<TakenOver, TakeOverError> {
        let _one = self.taking.lock();
        let state = self.state.upgrade().ok_or(TakeOverError::Stopping)?;
        if state.thin().is_some() {
            return Err(TakeOverError::AlreadyOwner);
        }
        let mut loc = self.loc.clone();
        if let Some(spec) = &mut loc.rbd {
            spec.take_over = true;
        }
        info!("pool-take-over: fencing the owner of the pool and opening it");
        let thin = super::open_pool(&loc).map_err(|e| TakeOverError::Open(error_chain(&e)))?;
        let fenced = rbd_pool::take_fenced();
        state.set_thin(thin);
        let mut done = TakenOver {
            fenced,
            ..TakenOver::default()
        };
        for spec in &self.deferred {
            match start_export(spec, Some(&self.loc), state.thin(), &state) {
                Ok(()) => done.exports.push(spec.id.clone()),
                Err(e) => {
                    error!("export {}: not started after the take-over: {e}", spec.id);
                    done.failed.push((spec.id.clone(), error_chain(&e)));
                }
            }
        }
        if self.nbd {
            for spec in self
                .deferred
                .iter()
                .filter(|s| done.exports.contains(&s.id))
            {
                let cfg = nbd::NbdExportConfig {
                    device: match &spec.backing {
                        Backing::Thin { name, .. } => name.clone(),
                        _ => spec.id.clone(),
                    },
                    name: Some(spec.id.clone()),
                    ..Default::default()
                };
                if let Err(e) = state.nbd().add(&state, cfg) {
                    warn!("export {}: not served over NBD: {e}", spec.id);
                }
            }
        }
        match saved::SavedState::open(&self.loc.saved) {
            Ok(saved) => {
                restore::restore(&state, &saved);
                state.set_saved(saved);
            }
            // The pool is ours all the same; exports made over QMP are not saved then.
            Err(e) => error!("after the take-over: saved exports not restored: {e}"),
        }
        info!(
            "pool-take-over: the pool is ours{}; {} export(s) started",
            if done.fenced.is_empty() {
                String::new()
            } else {
                format!(" (fenced {})", done.fenced.join(", "))
            },
            done.exports.len()
        );
        Ok(done)
    }
}

/// `e` and its sources, as one line (QMP errors say why, not only what).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_thin_exports_wait_for_the_pool() {
        let specs: Vec<ExportSpec> = ["name=vm,size=1G", "null=1G,socket=/tmp/n.sock"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let (now, later) = split_exports(&specs);
        assert_eq!(now.len(), 1);
        assert!(matches!(now[0].backing, Backing::Null(_)));
        assert_eq!(later.len(), 1);
        assert!(matches!(later[0].backing, Backing::Thin { .. }));
    }

    #[test]
    fn an_error_says_why() {
        let e = super::super::ServeError::RbdPool(rbd_pool::RbdPoolError::Connect(
            std::io::Error::new(std::io::ErrorKind::TimedOut, "rados_connect: timed out"),
        ));
        let text = error_chain(&e);
        assert!(text.contains("rados_connect: timed out"), "{text}");
    }
}
