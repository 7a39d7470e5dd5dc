//! Holding a metadata snapshot for userspace readers (backup, delta), as dm-thin's
//! `reserve_metadata_snap` / `release_metadata_snap` pool messages do.

use super::volumes::{VolumeError, Volumes};

impl Volumes {
    /// Commits and holds a read-only copy of the metadata; returns its superblock's location.
    /// I/O is quiesced meanwhile, so the commit covers only data already on the data device.
    /// Like a snapshot, a reservation that fails part way is taken back alone.
    pub fn reserve_metadata_snap(&self) -> Result<u64, VolumeError> {
        self.change_alone(|m| m.reserve_metadata_snap())
    }

    /// Drops the held metadata snapshot and commits, freeing what only it referenced. A
    /// release that fails part way is taken back alone too.
    pub fn release_metadata_snap(&self) -> Result<(), VolumeError> {
        self.change_alone(|m| m.release_metadata_snap())?;
        self.pool().commit()?;
        Ok(())
    }
}
