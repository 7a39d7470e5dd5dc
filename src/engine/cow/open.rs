//! Opening a COW device from files: the origin read-only, the store created when missing.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::format::{Layout, DEFAULT_CHUNK};
use super::{CowDevice, CowError, MergeReport, PersistentStore, TransientStore};
use crate::engine::raw::{RawDevice, RawOptions};
use crate::engine::BlockDevice;

/// How to open a COW device.
#[derive(Clone, Debug, Default)]
pub struct CowOptions {
    /// Bytes; an existing persistent store keeps its own (and must match if given).
    pub chunk_size: Option<u64>,
    /// Exceptions in memory only: the store's contents are ignored and lost at close.
    pub transient: bool,
    /// Size of a store file created now; default: enough to copy the whole origin.
    pub store_size: Option<u64>,
    /// O_DIRECT on the files.
    pub direct: bool,
}

/// A COW device and the paths it was opened from.
pub struct CowFiles {
    pub device: Arc<CowDevice>,
    pub origin: PathBuf,
    pub store: PathBuf,
    /// Holds an exclusive flock on the store while the device lives.
    _lock: File,
}

/// Takes an exclusive lock on the store so two processes never append to it at once.
fn lock_store(path: &Path) -> Result<File, CowError> {
    let f = File::open(path).map_err(file_err(path))?;
    // SAFETY: flock takes a descriptor we own for the duration of the call and two flags.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        let e = if e.kind() == io::ErrorKind::WouldBlock {
            io::Error::new(e.kind(), "the store is in use by another process")
        } else {
            e
        };
        return Err(file_err(path)(e));
    }
    Ok(f)
}

fn file_err(path: &Path) -> impl FnOnce(io::Error) -> CowError + '_ {
    move |source| CowError::File {
        path: path.display().to_string(),
        source,
    }
}

/// Bytes of a store that can hold a copy of every chunk of an origin of `origin_size`.
pub fn store_size_for(origin_size: u64, chunk_size: u64) -> u64 {
    Layout::new(chunk_size).chunks_for(origin_size.div_ceil(chunk_size)) * chunk_size
}

/// Opens `origin` read-only and the store at `store` (created sparse if missing).
pub fn open_cow(origin: &Path, store: &Path, opts: &CowOptions) -> Result<CowFiles, CowError> {
    let origin_dev = RawDevice::open(
        origin,
        RawOptions {
            read_only: true,
            direct: opts.direct,
        },
    )
    .map_err(file_err(origin))?;
    let chunk = opts.chunk_size.unwrap_or(DEFAULT_CHUNK);
    if !store.exists() {
        let size = opts
            .store_size
            .unwrap_or_else(|| store_size_for(origin_dev.size(), chunk));
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(store)
            .map_err(file_err(store))?;
        f.set_len(size).map_err(file_err(store))?;
    }
    let lock = lock_store(store)?;
    let store_dev: Arc<dyn BlockDevice> = Arc::new(
        RawDevice::open(
            store,
            RawOptions {
                read_only: false,
                direct: opts.direct,
            },
        )
        .map_err(file_err(store))?,
    );
    let origin_dev: Arc<dyn BlockDevice> = Arc::new(origin_dev);
    let device = if opts.transient {
        let s = TransientStore::new(store_dev, chunk)?;
        CowDevice::new(origin_dev, Box::new(s), Default::default())
    } else {
        let o = PersistentStore::open_or_create(store_dev, opts.chunk_size, DEFAULT_CHUNK)?;
        CowDevice::new(origin_dev, Box::new(o.store), o.table)
    };
    Ok(CowFiles {
        device: Arc::new(device),
        origin: origin.to_path_buf(),
        store: store.to_path_buf(),
        _lock: lock,
    })
}

/// Merges the existing store at `store` into `origin` with no device serving it (the
/// origin is opened writable). Interrupted, it can simply be run again.
pub fn merge_offline(origin: &Path, store: &Path) -> Result<MergeReport, CowError> {
    if !store.exists() {
        return Err(file_err(store)(io::ErrorKind::NotFound.into()));
    }
    let opts = CowOptions {
        direct: true,
        ..CowOptions::default()
    };
    open_cow(origin, store, &opts)?.merge()
}

impl CowFiles {
    /// Merges into the origin file, opened writable for the purpose.
    pub fn merge(&self) -> Result<MergeReport, CowError> {
        let target = RawDevice::open(
            &self.origin,
            RawOptions {
                read_only: false,
                direct: true,
            },
        )
        .map_err(file_err(&self.origin))?;
        self.device.merge(Arc::new(target))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_in_use_cannot_be_opened_twice_and_a_new_one_fits_the_origin() {
        let dir = tempfile::tempdir().unwrap();
        let origin = dir.path().join("origin");
        std::fs::write(&origin, vec![5u8; 1 << 20]).unwrap();
        let store = dir.path().join("store");
        let opts = CowOptions {
            chunk_size: Some(4096),
            ..CowOptions::default()
        };
        let first = open_cow(&origin, &store, &opts).unwrap();
        assert_eq!(
            std::fs::metadata(&store).unwrap().len(),
            store_size_for(1 << 20, 4096)
        );
        assert!(matches!(
            open_cow(&origin, &store, &opts),
            Err(CowError::File { .. })
        ));
        drop(first);
        assert!(open_cow(&origin, &store, &opts).is_ok());
    }
}
