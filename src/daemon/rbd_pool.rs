//! A pool whose metadata and data devices are RBD images (`--metadata rbd:POOL/IMAGE
//! --data rbd:POOL/IMAGE`): connecting to the cluster, creating missing images with the
//! sizes new files get, taking the images' exclusive locks (or taking them over), and opening
//! the pool on them. Ownership is settled here, at open; the I/O path knows nothing of it.
//!
//! The order matters for fencing (see docs/architecture.md, "A pool on RBD"): both locks are
//! ours, and every lock we broke is enforced by the cluster, before the first block of the
//! pool is read, so the pool opens at the last commit its old owner made and nothing the old
//! owner still has in flight can land after that.

use std::sync::Arc;

use crate::engine::rbd::CephOptions;
use crate::engine::thin::{Pool, PoolGeometry, PoolOpenError, PoolOptions};

/// The part of a pool's location that says it lives on RBD.
#[derive(Clone, Debug)]
pub struct RbdPoolSpec {
    /// `POOL/IMAGE` of the metadata image.
    pub metadata: String,
    /// `POOL/IMAGE` of the data image.
    pub data: String,
    /// How to reach the cluster (`--ceph-conf`, `--ceph-id`).
    pub ceph: CephOptions,
    /// Break the locks of a current owner (fencing it) instead of refusing to start.
    pub take_over: bool,
    /// Start without the pool and take it over when told to over QMP (`pool-take-over`),
    /// for a host standing by for the pool's owner (`--standby`; `standby.rs`).
    pub standby: bool,
}

/// The prefix that makes `--metadata`/`--data` name an RBD image.
pub const RBD_PREFIX: &str = "rbd:";

/// `POOL/IMAGE` if `arg` is `rbd:POOL/IMAGE`, with both parts present.
pub fn rbd_image_arg(arg: &str) -> Option<Result<String, String>> {
    let rest = arg.strip_prefix(RBD_PREFIX)?;
    Some(match rest.split_once('/') {
        Some((pool, image)) if !pool.is_empty() && !image.is_empty() && !image.contains('/') => {
            Ok(rest.to_string())
        }
        _ => Err(format!("'{arg}': expected rbd:POOL/IMAGE")),
    })
}

/// The RBD pool that `--metadata` and `--data` name, if they name RBD images (both must, or
/// neither). `--take-over` and `--standby` are only meaningful for such a pool, and exclude
/// each other (a standby takes over later, when told to).
pub fn spec_from_args(
    metadata: Option<&std::path::Path>,
    data: Option<&std::path::Path>,
    ceph: CephOptions,
    take_over: bool,
    standby: bool,
) -> Result<Option<RbdPoolSpec>, String> {
    if take_over && standby {
        return Err(
            "--take-over and --standby exclude each other: a standby takes the pool \
                    over when told to over QMP (pool-take-over)"
                .into(),
        );
    }
    let image = |p: Option<&std::path::Path>| {
        p.and_then(|p| p.to_str())
            .and_then(rbd_image_arg)
            .transpose()
    };
    match (image(metadata)?, image(data)?) {
        (Some(metadata), Some(data)) => Ok(Some(RbdPoolSpec {
            metadata,
            data,
            ceph,
            take_over,
            standby,
        })),
        (None, None) if take_over || standby => Err(format!(
            "--{} needs a pool on RBD (--metadata rbd:POOL/IMAGE --data rbd:POOL/IMAGE)",
            if take_over { "take-over" } else { "standby" }
        )),
        (None, None) => Ok(None),
        _ => Err("--metadata and --data must both be rbd:POOL/IMAGE, or both files".into()),
    }
}

/// Why a pool on RBD could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RbdPoolError {
    #[error("thinblk was built without RBD support (cargo feature `rbd`)")]
    NotBuilt,
    #[error("connecting to the Ceph cluster")]
    Connect(#[source] std::io::Error),
    #[error("rbd:{image}: {what}")]
    Image {
        image: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[cfg(feature = "rbd")]
    #[error(transparent)]
    Ownership(#[from] crate::engine::rbd::lock::OwnershipError),
    #[error("opening the pool on rbd:{metadata}")]
    Pool {
        metadata: String,
        #[source]
        source: PoolOpenError,
    },
}

/// Opens (creating what is missing) the pool on RBD that `spec` names, as its only owner.
#[cfg(not(feature = "rbd"))]
pub fn open(
    _spec: &RbdPoolSpec,
    _geometry: &PoolGeometry,
    _options: PoolOptions,
) -> Result<Arc<Pool>, RbdPoolError> {
    Err(RbdPoolError::NotBuilt)
}

/// Gives up the images of every pool on RBD this process opened, after the pool has been
/// closed (its last commit made): each image's lock is released and the image closed (its
/// watch unregistered) even while the pool is still referenced, so the next daemon starts
/// without `--take-over` and `rbd rm` does not wait for the watch to time out. Later I/O on
/// those images fails (EBADF).
#[cfg(not(feature = "rbd"))]
pub fn release_locks() {}

/// Who holds the locks of the pool's images now (a standby's `query-pool`), without taking
/// them.
#[cfg(not(feature = "rbd"))]
pub fn owners(_spec: &RbdPoolSpec) -> Result<Vec<ImageOwners>, RbdPoolError> {
    Err(RbdPoolError::NotBuilt)
}

/// The owners the last [`open`] fenced (broke the locks of), taken: empty when it found the
/// images free.
#[cfg(not(feature = "rbd"))]
pub fn take_fenced() -> Vec<String> {
    Vec::new()
}

#[cfg(feature = "rbd")]
pub use with_rbd::{open, owners, release_locks, take_fenced};

/// One image of a pool on RBD, as a standby sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageOwners {
    /// `POOL/IMAGE`.
    pub image: String,
    /// False when the image does not exist (yet): the pool was never opened.
    pub exists: bool,
    /// The client addresses that hold its exclusive lock (none: free).
    pub owners: Vec<String>,
}

/// Releases the locks of pools on RBD when dropped. `serve` holds one from its start, so a
/// daemon that fails after its pool opened (an export that cannot start, say) leaves no lock
/// behind that the next daemon would have to take over.
pub struct ReleaseLocksOnDrop;

impl Drop for ReleaseLocksOnDrop {
    fn drop(&mut self) {
        release_locks();
    }
}

#[cfg(feature = "rbd")]
mod with_rbd {
    use std::sync::{Mutex, Weak};

    use log::{info, warn};

    use super::{Arc, ImageOwners, Pool, PoolGeometry, PoolOptions, RbdPoolError, RbdPoolSpec};
    use crate::bufio::RbdStore;
    use crate::engine::rbd::{lock, Cluster, RbdDevice, RbdImage, RbdSpec};

    /// The images whose locks this process took, released and closed by [`release_locks`].
    /// Weak: the pool owns its images, and dropping it (its last reference gone) closes them
    /// too.
    static HELD: Mutex<Vec<(String, Weak<RbdImage>)>> = Mutex::new(Vec::new());

    fn held() -> std::sync::MutexGuard<'static, Vec<(String, Weak<RbdImage>)>> {
        // A panic while the list was held leaves it intact.
        HELD.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The owners the last open fenced, for [`take_fenced`].
    static FENCED: Mutex<Vec<String>> = Mutex::new(Vec::new());

    pub fn take_fenced() -> Vec<String> {
        std::mem::take(&mut *FENCED.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn owners(spec: &RbdPoolSpec) -> Result<Vec<ImageOwners>, RbdPoolError> {
        // The daemon's shared connection: reading who owns a lock makes this client no
        // owner, and it is not the one a take-over fences with.
        let cluster = Cluster::shared(&spec.ceph).map_err(RbdPoolError::Connect)?;
        let mut found = Vec::new();
        for name in [&spec.metadata, &spec.data] {
            let image_err = |what: &'static str| {
                move |source: std::io::Error| RbdPoolError::Image {
                    image: name.to_string(),
                    what,
                    source,
                }
            };
            let rbd: RbdSpec = name.parse().map_err(|e| {
                image_err("naming it")(std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
            })?;
            let io = cluster
                .ioctx(&rbd.pool)
                .map_err(image_err("opening its pool"))?;
            // Writable (librbd reports a lock's owners to writable handles only), which takes
            // no lock: that waits for a write, and nothing is written; closed (with its
            // watch) when dropped below.
            let image = match RbdImage::open(&io, &rbd.image, false) {
                Ok(image) => image,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    found.push(ImageOwners {
                        image: name.clone(),
                        exists: false,
                        owners: Vec::new(),
                    });
                    continue;
                }
                Err(e) => return Err(image_err("opening")(e)),
            };
            found.push(ImageOwners {
                image: name.clone(),
                exists: true,
                owners: lock::owners(&image, name)?,
            });
        }
        Ok(found)
    }

    pub fn open(
        spec: &RbdPoolSpec,
        geometry: &PoolGeometry,
        options: PoolOptions,
    ) -> Result<Arc<Pool>, RbdPoolError> {
        FENCED.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let opened = open_owned(spec, geometry, options);
        if opened.is_err() {
            // Whatever was taken goes back: a daemon that did not start owns nothing.
            release_locks();
        }
        opened
    }

    fn open_owned(
        spec: &RbdPoolSpec,
        geometry: &PoolGeometry,
        options: PoolOptions,
    ) -> Result<Arc<Pool>, RbdPoolError> {
        // A connection of the pool's own (not the daemon's shared one): a take-over fences a
        // client, and it should fence this pool's I/O, not every RBD export of the old daemon.
        let cluster = Cluster::connect(&spec.ceph).map_err(RbdPoolError::Connect)?;
        let meta = open_or_create(&cluster, &spec.metadata, geometry.metadata_size)?;
        let data = open_or_create(&cluster, &spec.data, geometry.data_size)?;
        // Forget the images of pools closed since.
        held().retain(|(_, image)| image.strong_count() > 0);
        for (name, image) in [(&spec.metadata, &meta), (&spec.data, &data)] {
            let claimed = lock::claim(&cluster, image, name, spec.take_over)?;
            if !claimed.fenced.is_empty() {
                warn!(
                    "rbd:{name}: taken over from {} (blocklisted)",
                    claimed.fenced.join(", ")
                );
                let mut fenced = FENCED.lock().unwrap_or_else(|p| p.into_inner());
                for owner in claimed.fenced {
                    if !fenced.contains(&owner) {
                        fenced.push(owner);
                    }
                }
            }
            held().push((name.clone(), Arc::downgrade(image)));
        }
        info!(
            "pool on rbd:{} and rbd:{}: exclusive locks held",
            spec.metadata, spec.data
        );
        let store =
            RbdStore::new(meta, &spec.metadata, 4096).map_err(|source| RbdPoolError::Image {
                image: spec.metadata.clone(),
                what: "reading its size",
                source,
            })?;
        let device = RbdDevice::from_image(data).map_err(|source| RbdPoolError::Image {
            image: spec.data.clone(),
            what: "reading its size",
            source,
        })?;
        Pool::open_with(Arc::new(store), Arc::new(device), geometry, options).map_err(|source| {
            RbdPoolError::Pool {
                metadata: spec.metadata.clone(),
                source,
            }
        })
    }

    /// The image `POOL/IMAGE`, created with `size` bytes when it does not exist.
    fn open_or_create(
        cluster: &Arc<Cluster>,
        name: &str,
        size: u64,
    ) -> Result<Arc<RbdImage>, RbdPoolError> {
        let image_err = |what: &'static str| {
            move |source: std::io::Error| RbdPoolError::Image {
                image: name.to_string(),
                what,
                source,
            }
        };
        let spec: RbdSpec = name.parse().map_err(|e| {
            image_err("naming it")(std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
        })?;
        let io = cluster
            .ioctx(&spec.pool)
            .map_err(image_err("opening its pool"))?;
        let (image, created) =
            RbdImage::open_or_create(&io, &spec.image, size).map_err(image_err("opening"))?;
        if created {
            info!("rbd:{name}: created ({size} bytes)");
        }
        Ok(Arc::new(image))
    }

    pub fn release_locks() {
        let taken = std::mem::take(&mut *held());
        // Images already closed with their pool released their locks then.
        for (name, image) in taken {
            let Some(image) = image.upgrade() else {
                continue;
            };
            if let Err(e) = image.lock_release() {
                // Fenced, or the cluster is gone: the next owner has to take over.
                warn!("rbd:{name}: releasing the exclusive lock: {e}");
            }
            // Now, not when the last reference goes: `serve` returns while its QMP sessions
            // and threads may still hold the pool, and a watch left open lingers in the
            // cluster for 30 s after the process is gone.
            image.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_is_on_rbd_only_when_both_devices_are() {
        let p = |s: &'static str| Some(std::path::Path::new(s));
        let spec = spec_from_args(
            p("rbd:tb/m"),
            p("rbd:tb/d"),
            CephOptions::default(),
            true,
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (spec.metadata.as_str(), spec.data.as_str()),
            ("tb/m", "tb/d")
        );
        assert!(spec.take_over);
        assert!(spec_from_args(
            p("rbd:tb/m"),
            p("/tmp/data"),
            CephOptions::default(),
            false,
            false
        )
        .is_err());
        assert!(spec_from_args(None, p("rbd:tb/d"), CephOptions::default(), false, false).is_err());
        assert!(
            spec_from_args(p("/tmp/m"), None, CephOptions::default(), false, false)
                .unwrap()
                .is_none()
        );
        assert!(spec_from_args(None, None, CephOptions::default(), true, false).is_err());
        // A standby stands by for a pool on RBD, and takes it over only when told to.
        let standby = spec_from_args(
            p("rbd:tb/m"),
            p("rbd:tb/d"),
            CephOptions::default(),
            false,
            true,
        )
        .unwrap()
        .unwrap();
        assert!(standby.standby && !standby.take_over);
        assert!(spec_from_args(None, None, CephOptions::default(), false, true).is_err());
        assert!(spec_from_args(
            p("/tmp/m"),
            p("/tmp/d"),
            CephOptions::default(),
            false,
            true
        )
        .is_err());
        assert!(spec_from_args(
            p("rbd:tb/m"),
            p("rbd:tb/d"),
            CephOptions::default(),
            true,
            true
        )
        .is_err());
    }

    #[test]
    fn rbd_image_args_name_a_pool_and_an_image() {
        assert_eq!(rbd_image_arg("/var/lib/pool/metadata"), None);
        assert_eq!(
            rbd_image_arg("rbd:thinblk/meta"),
            Some(Ok("thinblk/meta".into()))
        );
        for bad in [
            "rbd:",
            "rbd:thinblk",
            "rbd:/meta",
            "rbd:thinblk/",
            "rbd:a/b/c",
        ] {
            assert!(matches!(rbd_image_arg(bad), Some(Err(_))), "{bad}");
        }
    }
}
