//! Names and sizes of thin devices. The dm-thin format has no place for them, so they live in
//! a small JSON file beside the metadata, replaced atomically (write, fsync, rename, fsync dir).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One named thin device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub id: u64,
    /// Virtual size in bytes.
    pub size: u64,
    /// The device this one is a snapshot of, when it was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// Creation time, seconds since the epoch.
    #[serde(default)]
    pub created: u64,
    /// An external origin: a file or block device, read-only, that unmapped blocks read from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_path: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    #[serde(default)]
    pub devices: BTreeMap<String, Entry>,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a device catalog: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

impl Catalog {
    /// Reads the catalog; a missing file is an empty catalog.
    pub fn load(path: &Path) -> Result<Catalog, CatalogError> {
        match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| CatalogError::Parse {
                path: path.display().to_string(),
                source,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Catalog::default()),
            Err(source) => Err(CatalogError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    /// Replaces the file so that a crash leaves the old catalog or the new one, never a mix.
    pub fn save(&self, path: &Path) -> Result<(), CatalogError> {
        let io_err = |source| CatalogError::Io {
            path: path.display().to_string(),
            source,
        };
        let tmp = tmp_path(path);
        let bytes = serde_json::to_vec_pretty(self).map_err(|source| CatalogError::Parse {
            path: path.display().to_string(),
            source,
        })?;
        let mut f = fs::File::create(&tmp).map_err(io_err)?;
        f.write_all(&bytes).map_err(io_err)?;
        f.sync_all().map_err(io_err)?;
        fs::rename(&tmp, path).map_err(io_err)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err)?;
        }
        Ok(())
    }

    pub fn name_of(&self, id: u64) -> Option<&str> {
        self.devices
            .iter()
            .find(|(_, e)| e.id == id)
            .map(|(n, _)| n.as_str())
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_catalog_loads_back_and_a_missing_one_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("devices.json");
        assert_eq!(Catalog::load(&path).unwrap(), Catalog::default());
        let mut c = Catalog::default();
        c.devices.insert(
            "disk0".into(),
            Entry {
                id: 1,
                size: 1 << 30,
                origin: None,
                created: 5,
                origin_path: Some("/img/golden.raw".into()),
            },
        );
        c.save(&path).unwrap();
        assert_eq!(Catalog::load(&path).unwrap(), c);
        assert_eq!(c.name_of(1), Some("disk0"));
        assert!(!tmp_path(&path).exists());
    }

    #[test]
    fn garbage_is_an_error_not_an_empty_catalog() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("devices.json");
        fs::write(&path, b"{nope").unwrap();
        assert!(matches!(
            Catalog::load(&path),
            Err(CatalogError::Parse { .. })
        ));
    }
}
