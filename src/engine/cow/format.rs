//! dm-snapshot's persistent on-disk format (the kernel's dm-snap-persistent.c), in chunks:
//!
//! ```text
//! chunk 0                 header: le32 magic "SnAp" (0x70416e53), le32 valid, le32 version (1),
//!                         le32 chunk size in 512-byte sectors; the rest of the chunk is unused
//! chunk 1                 metadata area 0: chunk_size / 16 pairs (le64 old_chunk, le64 new_chunk)
//! chunks 2 ..= 1 + E      the data chunks area 0 describes (E = exceptions per area)
//! chunk 2 + E             metadata area 1, then its E data chunks, and so on
//! ```
//!
//! An area ends at the first pair whose new_chunk is 0 (chunk 0 is the header, never data);
//! a full area is followed by the next one. Data chunks are handed out in order, skipping the
//! metadata chunks.

use super::CowError;

pub const SNAP_MAGIC: u32 = 0x7041_6e53;
pub const DISK_VERSION: u32 = 1;
pub const MIN_CHUNK: u64 = 4 << 10;
pub const MAX_CHUNK: u64 = 512 << 10;
pub const DEFAULT_CHUNK: u64 = 64 << 10;
/// Bytes of one (old_chunk, new_chunk) pair.
pub const ENTRY: u64 = 16;
/// Chunks before metadata area 0.
const HEADER_CHUNKS: u64 = 1;

/// Checks a chunk size in bytes.
pub fn check_chunk_size(bytes: u64) -> Result<u64, CowError> {
    if bytes.is_power_of_two() && (MIN_CHUNK..=MAX_CHUNK).contains(&bytes) {
        Ok(bytes)
    } else {
        Err(CowError::BadChunkSize(bytes))
    }
}

/// The header in chunk 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub valid: bool,
    /// Bytes.
    pub chunk_size: u64,
}

impl Header {
    pub const LEN: usize = 16;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        let sectors = (self.chunk_size / 512) as u32;
        let fields = [SNAP_MAGIC, u32::from(self.valid), DISK_VERSION, sectors];
        for (dst, v) in b.chunks_exact_mut(4).zip(fields) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// `Ok(None)`: all zeros, a store never formatted.
    pub fn decode(b: &[u8; Self::LEN]) -> Result<Option<Header>, CowError> {
        if b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        let field = |i: usize| {
            let mut w = [0u8; 4];
            w.copy_from_slice(&b[i * 4..i * 4 + 4]);
            u32::from_le_bytes(w)
        };
        let (magic, valid, version, sectors) = (field(0), field(1), field(2), field(3));
        if magic != SNAP_MAGIC {
            return Err(CowError::NotAStore(magic));
        }
        if version != DISK_VERSION {
            return Err(CowError::BadVersion(version));
        }
        let chunk_size = check_chunk_size(u64::from(sectors) * 512)?;
        Ok(Some(Header {
            valid: valid != 0,
            chunk_size,
        }))
    }
}

/// Where areas and data chunks lie for one chunk size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub chunk_size: u64,
    pub per_area: u64,
}

impl Layout {
    pub fn new(chunk_size: u64) -> Self {
        Layout {
            chunk_size,
            per_area: chunk_size / ENTRY,
        }
    }

    fn stride(&self) -> u64 {
        self.per_area + 1
    }

    /// The chunk holding metadata area `area`.
    pub fn area_location(&self, area: u64) -> u64 {
        HEADER_CHUNKS + self.stride() * area
    }

    /// The first data chunk of a new store.
    pub fn first_data_chunk(&self) -> u64 {
        HEADER_CHUNKS + 1
    }

    /// Whether `chunk` may hold data: not the header, not a metadata area.
    pub fn is_data_chunk(&self, chunk: u64) -> bool {
        chunk > HEADER_CHUNKS && !(chunk - HEADER_CHUNKS).is_multiple_of(self.stride())
    }

    /// The first data chunk at or after `chunk`.
    pub fn skip_metadata(&self, chunk: u64) -> u64 {
        if self.is_data_chunk(chunk) {
            chunk
        } else {
            chunk.max(HEADER_CHUNKS) + 1
        }
    }

    /// Store chunks needed to hold `data_chunks` exceptions, with the spare area zeroed ahead.
    pub fn chunks_for(&self, data_chunks: u64) -> u64 {
        let areas = data_chunks.div_ceil(self.per_area) + 1;
        HEADER_CHUNKS + areas + data_chunks
    }
}

/// One (old_chunk, new_chunk) pair of an area.
pub fn decode_entry(area: &[u8], index: u64) -> Option<(u64, u64)> {
    let at = usize::try_from(index * ENTRY).ok()?;
    let b = area.get(at..at + ENTRY as usize)?;
    let mut old = [0u8; 8];
    let mut new = [0u8; 8];
    old.copy_from_slice(&b[..8]);
    new.copy_from_slice(&b[8..]);
    Some((u64::from_le_bytes(old), u64::from_le_bytes(new)))
}

/// Writes a pair (or, with (0, 0), clears it).
pub fn encode_entry(area: &mut [u8], index: u64, old: u64, new: u64) {
    let Ok(at) = usize::try_from(index * ENTRY) else {
        return;
    };
    if let Some(b) = area.get_mut(at..at + ENTRY as usize) {
        b[..8].copy_from_slice(&old.to_le_bytes());
        b[8..].copy_from_slice(&new.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_in_the_kernel_layout() {
        let h = Header {
            valid: true,
            chunk_size: 8 << 10,
        };
        let b = h.encode();
        assert_eq!(&b[..4], b"SnAp");
        assert_eq!(&b[4..], &[1, 0, 0, 0, 1, 0, 0, 0, 16, 0, 0, 0]);
        assert_eq!(Header::decode(&b).unwrap(), Some(h));
        assert_eq!(Header::decode(&[0; 16]).unwrap(), None);
    }

    #[test]
    fn bad_headers_are_refused() {
        let mut b = Header {
            valid: true,
            chunk_size: 4096,
        }
        .encode();
        b[12] = 3; // 1536 bytes: not a power of two
        assert!(matches!(Header::decode(&b), Err(CowError::BadChunkSize(_))));
        b[0] = b'X';
        assert!(matches!(Header::decode(&b), Err(CowError::NotAStore(_))));
    }

    #[test]
    fn areas_and_data_chunks_interleave_as_in_the_kernel() {
        let l = Layout::new(4096); // 256 pairs per area
        assert_eq!(l.area_location(0), 1);
        assert_eq!(l.area_location(1), 258);
        assert!(!l.is_data_chunk(0) && !l.is_data_chunk(1) && !l.is_data_chunk(258));
        assert!(l.is_data_chunk(2) && l.is_data_chunk(257) && l.is_data_chunk(259));
        assert_eq!(l.skip_metadata(258), 259);
        assert_eq!(l.skip_metadata(0), 2);
        assert_eq!(l.chunks_for(256), 1 + 2 + 256);
    }

    #[test]
    fn chunk_sizes_are_powers_of_two_from_4k_to_512k() {
        assert!(check_chunk_size(4096).is_ok());
        assert!(check_chunk_size(512 << 10).is_ok());
        assert!(check_chunk_size(2048).is_err());
        assert!(check_chunk_size(1 << 20).is_err());
        assert!(check_chunk_size(12288).is_err());
    }
}
