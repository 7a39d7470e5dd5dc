//! `thin-mirror {job-id, device, target, sync, base?}`: mirrors a thin device into an NBD
//! export (`target` is an NBD URI: `nbd://HOST:PORT/NAME`, `nbd+unix:///NAME?socket=PATH`,
//! or the name of a writable export of this daemon's NBD server, `nbd-server-add`'s `name`)
//! as a QEMU-style job of type `mirror` (src/mirror/job.rs). The target is connected and
//! checked before the command answers; the copy runs on the job's thread.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use super::{args, thin};
use crate::control::protocol::QmpError;
use crate::daemon::state::State;
use crate::engine::thin::Volumes;
use crate::engine::BlockDevice;
use crate::mirror::{DirtyMap, Mirror, SyncMode, TARGET_IN_FLIGHT};
use crate::nbd::client::{NbdClient, NbdUri, Target};
use crate::nbd::listener::NbdAddr;
use crate::nbd::proto::FLAG_READ_ONLY;

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum Sync {
    Full,
    Top,
    Incremental,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Args {
    job_id: String,
    device: String,
    target: String,
    sync: Sync,
    base: Option<String>,
}

pub(super) fn thin_mirror(state: &State, v: Value) -> Result<Value, QmpError> {
    let a: Args = args(v)?;
    thin(state)?;
    let Some(volumes): Option<Arc<Volumes>> = state.thin().cloned() else {
        return Err(QmpError::generic("no thin pool"));
    };
    if !volumes.exists(&a.device) {
        return Err(QmpError::not_found(format!(
            "no thin device '{}'",
            a.device
        )));
    }
    let sync = match (a.sync, a.base) {
        (Sync::Incremental, Some(base)) => {
            if !volumes.exists(&base) {
                return Err(QmpError::not_found(format!("no thin device '{base}'")));
            }
            SyncMode::Incremental(base)
        }
        (Sync::Incremental, None) => {
            return Err(QmpError::generic("sync 'incremental' needs 'base'"));
        }
        (_, Some(_)) => return Err(QmpError::generic("'base' is for sync 'incremental'")),
        (Sync::Full, None) => SyncMode::Full,
        (Sync::Top, None) => SyncMode::Top,
    };
    if state.jobs().get(&a.job_id).is_some() {
        return Err(QmpError::generic(format!(
            "Job ID '{}' already in use",
            a.job_id
        )));
    }
    let source: Arc<dyn BlockDevice> = volumes.device(&a.device)?;
    let uri = target_uri(state, &a.target, &a.device)?;
    let target = NbdClient::connect(&uri, TARGET_IN_FLIGHT)
        .map_err(|e| QmpError::generic(format!("mirror target: {e}")))?;
    if target.info().has(FLAG_READ_ONLY) {
        return Err(QmpError::generic("mirror target: the export is read-only"));
    }
    if target.size() != source.size() {
        return Err(QmpError::generic(format!(
            "mirror target: {} bytes, the device {}",
            target.size(),
            source.size()
        )));
    }
    let hook = state.write_hook(&a.device);
    if hook.refuses() {
        return Err(QmpError::generic(format!(
            "'{}' was switched over to a mirror's target and takes no writes",
            a.device
        )));
    }
    let dirty = Arc::new(DirtyMap::new(source.size(), volumes.pool().block_size()));
    if !hook.start(dirty.clone()) {
        return Err(QmpError::generic(format!(
            "'{}' is being mirrored already",
            a.device
        )));
    }
    let mirror = Mirror {
        device: a.device,
        source,
        target: Arc::new(target),
        volumes: volumes.clone(),
        hook: hook.clone(),
        dirty,
        sync,
        copying: Default::default(),
    };
    if let Err(e) = state
        .jobs()
        .start(&a.job_id, "mirror", move |job| mirror.run(job))
    {
        hook.stop();
        return Err(QmpError::generic(e.to_string()));
    }
    Ok(json!({}))
}

/// `target` as an NBD URI: one given as such, or a local export's name turned into the URI
/// of this daemon's NBD server (the export must be writable and of another device).
fn target_uri(state: &State, target: &str, device: &str) -> Result<NbdUri, QmpError> {
    if target.contains("://") {
        return NbdUri::parse(target).map_err(|e| QmpError::generic(format!("mirror target: {e}")));
    }
    let Some((addr, exports)) = state.nbd().list() else {
        return Err(QmpError::generic(format!(
            "mirror target '{target}': not an NBD URI, and no NBD server runs here"
        )));
    };
    let Some(export) = exports.iter().find(|e| e.name == target) else {
        return Err(QmpError::not_found(format!(
            "mirror target '{target}': not an NBD URI nor an NBD export here"
        )));
    };
    if !export.writable {
        return Err(QmpError::generic(format!(
            "mirror target '{target}': the export is read-only"
        )));
    }
    if export.node == device {
        return Err(QmpError::generic(format!(
            "mirror target '{target}' is an export of '{device}' itself"
        )));
    }
    let target = match NbdAddr::parse(&addr) {
        NbdAddr::Unix(path) => Target::Unix(path),
        NbdAddr::Tcp(hp) => {
            let (host, port) = hp
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
                .ok_or_else(|| QmpError::generic(format!("the NBD server's address {hp}")))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            Target::Tcp(host.to_string(), port)
        }
    };
    Ok(NbdUri {
        target,
        export: export.name.clone(),
    })
}
