//! What QMP made that must outlive the daemon: exports added with `block-export-add` and
//! snapshot nodes made with `cow-create` (thin devices are in the pool and its catalog
//! already). Kept in a small JSON file beside the pool (`exports.json`), replaced atomically
//! (temporary file, fsync, rename, fsync of the directory) on every change, so a crash leaves
//! either the old or the new file, never a torn one. `thinblk serve` starts them again.
//!
//! Exports from the command line or a configuration file are not saved: they come back with
//! the command line. A saved export whose id or socket a command-line export also has is left
//! to the command line (not an error).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::export_settings::ExportSettings;
use super::state::ExportConfig;
use crate::socket_access::SocketAccess;

/// The file's format version; a newer one is refused rather than half understood.
const VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum SavedError {
    #[error("reading {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a thinblk state file: {why}", .path.display())]
    Format { path: PathBuf, why: String },
    #[error("saving {}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// An export as saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SavedExport {
    pub id: String,
    pub node: String,
    pub socket: PathBuf,
    pub writable: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    pub poll_us: u32,
    pub submit_batch: u16,
    #[serde(default)]
    pub access: SocketAccess,
}

impl From<&ExportConfig> for SavedExport {
    fn from(c: &ExportConfig) -> Self {
        SavedExport {
            id: c.id.clone(),
            node: c.node.clone(),
            socket: c.socket.clone(),
            writable: c.writable,
            num_queues: c.settings.num_queues,
            queue_size: c.settings.queue_size,
            poll_us: c.settings.poll_us,
            submit_batch: c.settings.submit_batch,
            access: c.access,
        }
    }
}

impl SavedExport {
    pub fn config(&self) -> ExportConfig {
        ExportConfig {
            id: self.id.clone(),
            node: self.node.clone(),
            socket: self.socket.clone(),
            writable: self.writable,
            settings: ExportSettings {
                num_queues: self.num_queues,
                queue_size: self.queue_size,
                poll_us: self.poll_us,
                submit_batch: self.submit_batch,
            },
            access: self.access,
        }
    }
}

/// A `cow-create` snapshot node as saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SavedCow {
    pub name: String,
    pub origin: PathBuf,
    pub store: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<u64>,
    #[serde(default)]
    pub transient: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Contents {
    version: u32,
    #[serde(default)]
    cow_nodes: BTreeMap<String, SavedCow>,
    #[serde(default)]
    exports: BTreeMap<String, SavedExport>,
}

/// The state file and what it holds.
pub struct SavedState {
    path: PathBuf,
    contents: Mutex<Contents>,
}

impl SavedState {
    /// Reads `path` (a missing file is an empty state).
    pub fn open(path: &Path) -> Result<SavedState, SavedError> {
        let contents = match fs::read(path) {
            Ok(bytes) => {
                let c: Contents =
                    serde_json::from_slice(&bytes).map_err(|e| SavedError::Format {
                        path: path.into(),
                        why: e.to_string(),
                    })?;
                if c.version != VERSION {
                    return Err(SavedError::Format {
                        path: path.into(),
                        why: format!("version {} (this thinblk knows {VERSION})", c.version),
                    });
                }
                c
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Contents {
                version: VERSION,
                ..Contents::default()
            },
            Err(source) => {
                return Err(SavedError::Read {
                    path: path.into(),
                    source,
                })
            }
        };
        Ok(SavedState {
            path: path.into(),
            contents: Mutex::new(contents),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn exports(&self) -> Vec<SavedExport> {
        self.contents.lock().exports.values().cloned().collect()
    }

    pub fn cow_nodes(&self) -> Vec<SavedCow> {
        self.contents.lock().cow_nodes.values().cloned().collect()
    }

    pub fn remember_export(&self, config: &ExportConfig) -> Result<(), SavedError> {
        self.change(|c| {
            c.exports.insert(config.id.clone(), config.into());
        })
    }

    /// Forgets export `id`; nothing is written when it was not saved.
    pub fn forget_export(&self, id: &str) -> Result<(), SavedError> {
        if !self.contents.lock().exports.contains_key(id) {
            return Ok(());
        }
        self.change(|c| {
            c.exports.remove(id);
        })
    }

    pub fn remember_cow(&self, cow: SavedCow) -> Result<(), SavedError> {
        self.change(|c| {
            c.cow_nodes.insert(cow.name.clone(), cow);
        })
    }

    pub fn forget_cow(&self, name: &str) -> Result<(), SavedError> {
        if !self.contents.lock().cow_nodes.contains_key(name) {
            return Ok(());
        }
        self.change(|c| {
            c.cow_nodes.remove(name);
        })
    }

    /// Applies `f` and writes the file; if the write fails, memory keeps the old contents
    /// too, so what the daemon believes saved is what the file holds.
    fn change(&self, f: impl FnOnce(&mut Contents)) -> Result<(), SavedError> {
        let mut contents = self.contents.lock();
        let mut next = Contents {
            version: VERSION,
            cow_nodes: contents.cow_nodes.clone(),
            exports: contents.exports.clone(),
        };
        f(&mut next);
        write_atomically(&self.path, &next).map_err(|source| SavedError::Write {
            path: self.path.clone(),
            source,
        })?;
        *contents = next;
        Ok(())
    }
}

/// Writes a temporary file beside `path`, fsyncs it, renames it over `path` and fsyncs the
/// directory, so that after a crash `path` is the old file or the new one, whole.
fn write_atomically(path: &Path, contents: &Contents) -> io::Result<()> {
    let json = serde_json::to_vec_pretty(contents).map_err(io::Error::other)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(&json)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    fs::File::open(&dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(id: &str) -> ExportConfig {
        ExportConfig {
            id: id.into(),
            node: "vm".into(),
            socket: PathBuf::from(format!("/run/{id}.sock")),
            writable: true,
            settings: ExportSettings::default(),
            access: SocketAccess {
                mode: Some(0o660),
                owner: None,
                group: Some(64055),
            },
        }
    }

    #[test]
    fn exports_and_snapshots_survive_a_reopen() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("exports.json");
        let s = SavedState::open(&path).unwrap();
        assert!(s.exports().is_empty());
        s.remember_export(&export("a")).unwrap();
        s.remember_export(&export("b")).unwrap();
        s.forget_export("a").unwrap();
        s.remember_cow(SavedCow {
            name: "c".into(),
            origin: "/img/o".into(),
            store: "/var/c.cow".into(),
            chunk_size: Some(65536),
            transient: false,
        })
        .unwrap();
        let again = SavedState::open(&path).unwrap();
        let exports = again.exports();
        assert_eq!(exports.len(), 1);
        assert_eq!(exports[0].config(), export("b"));
        assert_eq!(again.cow_nodes()[0].name, "c");
        // No temporary file is left beside it.
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_failed_write_changes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("gone").join("exports.json");
        let s = SavedState::open(&path).unwrap();
        assert!(s.remember_export(&export("a")).is_err());
        assert!(s.exports().is_empty());
    }

    #[test]
    fn a_file_from_a_newer_version_or_garbage_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("exports.json");
        fs::write(&path, br#"{"version": 2}"#).unwrap();
        let e = SavedState::open(&path).err().unwrap().to_string();
        assert!(e.contains("version 2"), "{e}");
        fs::write(&path, b"{not json").unwrap();
        assert!(SavedState::open(&path).is_err());
    }
}
