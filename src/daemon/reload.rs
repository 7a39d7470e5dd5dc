//! SIGHUP with `--config`: the exports the configuration asks for (file and command line
//! together, as at start) are compared by id with those it asked for before. An id no longer
//! asked for is stopped (and its raw, null or cow node closed); a new id is started; an id
//! whose export changed in any key is stopped and started again. A saved export (made over
//! QMP) that a configured one of the same id or socket stood in for starts once that one is
//! dropped. Exports made over QMP and
//! everything else (pool, control socket, socket defaults, cache, timeouts) stay as they are
//! until the next start. An export that fails to start is logged; the others go on.

use std::sync::Arc;

use log::{error, info};

use super::state::State;
use super::{remove_node_of, start_export, PoolLocation};
use crate::engine::thin::Volumes;
use crate::export_spec::ExportSpec;

/// What starting an export needs.
pub(crate) struct Env<'a> {
    pub pool: Option<&'a PoolLocation>,
    pub thin: Option<&'a Arc<Volumes>>,
    pub state: &'a Arc<State>,
}

/// Moves from the exports `before` to `wanted`; returns what now counts as configured:
/// `wanted` less the exports that failed to start (so the next reload tries them again).
pub(crate) fn apply(env: &Env, before: &[ExportSpec], wanted: Vec<ExportSpec>) -> Vec<ExportSpec> {
    let mut stopped = 0;
    for old in before {
        let same = wanted.iter().find(|w| w.id == old.id);
        if same == Some(old) {
            continue;
        }
        match env.state.remove_configured_export(&old.id) {
            Ok(()) => stopped += 1,
            Err(e) => info!("reload: export {} was not running: {e}", old.id),
        }
        remove_node_of(old, env.state);
    }
    let mut configured = Vec::with_capacity(wanted.len());
    let mut started = 0;
    for spec in wanted {
        let unchanged = before.contains(&spec);
        if !unchanged {
            if let Err(e) = start_export(&spec, env.pool, env.thin, env.state) {
                error!("reload: export {} not started: {e}", spec.id);
                continue;
            }
            started += 1;
        }
        configured.push(spec);
    }
    // A saved export the configuration's export of the same id or socket kept from starting
    // starts now that the configuration dropped that one.
    if let Some(saved) = env.state.saved() {
        started += super::restore::restore(env.state, saved);
    }
    info!("reload: {stopped} export(s) stopped, {started} started");
    configured
}
