//! Btree nodes: a 32-byte header, `max_entries` u64 keys, then `max_entries` values.
//!
//! [`NodeView`] reads a node in place (lookups allocate nothing); [`Node`] is an owned copy
//! that the mutation code edits and encodes back.

use super::codec::{on_disk, u64_at};
use super::error::FormatError;
use super::superblock::BLOCK_SIZE;

pub const INTERNAL_NODE: u32 = 1;
pub const LEAF_NODE: u32 = 2;

on_disk! {
    /// The header of every btree node.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct NodeHeader {
        pub csum: u32,
        pub flags: u32,
        pub blocknr: u64,
        pub nr_entries: u32,
        pub max_entries: u32,
        pub value_size: u32,
        pub padding: u32,
    }
}

pub const NODE_HEADER_SIZE: usize = NodeHeader::SIZE;

/// The kernel's rule: as many entries as fit, rounded down to a multiple of 3.
pub const fn max_entries_for(value_size: usize) -> usize {
    let n = (BLOCK_SIZE - NODE_HEADER_SIZE) / (8 + value_size);
    3 * (n / 3)
}

/// A node read in place. Construction checks the header; [`NodeView::check_keys`] the keys.
#[derive(Debug, Clone, Copy)]
pub struct NodeView<'a> {
    bytes: &'a [u8],
    location: u64,
    header: NodeHeader,
}

impl<'a> NodeView<'a> {
    /// Checks the header of the node read from `location` (not its checksum: the block
    /// manager did that) and that the keys and values fit in the block.
    pub fn new(bytes: &'a [u8], location: u64) -> Result<Self, FormatError> {
        let block = location;
        if bytes.len() != BLOCK_SIZE {
            return Err(FormatError::BadLength {
                block,
                len: bytes.len(),
                expected: BLOCK_SIZE,
            });
        }
        let header = NodeHeader::decode(bytes).ok_or(FormatError::BadLength {
            block,
            len: bytes.len(),
            expected: NODE_HEADER_SIZE,
        })?;
        if header.flags != INTERNAL_NODE && header.flags != LEAF_NODE {
            return Err(FormatError::BadNodeFlags {
                block,
                flags: header.flags,
            });
        }
        let (max, vs) = (header.max_entries as usize, header.value_size as usize);
        let fits = vs
            .checked_add(8)
            .and_then(|per| per.checked_mul(max))
            .is_some_and(|b| b <= BLOCK_SIZE - NODE_HEADER_SIZE);
        if max == 0 || max % 3 != 0 || vs == 0 || !fits {
            return Err(FormatError::BadMaxEntries {
                block,
                max_entries: header.max_entries,
                value_size: header.value_size,
            });
        }
        if header.nr_entries > header.max_entries {
            return Err(FormatError::TooManyEntries {
                block,
                nr_entries: header.nr_entries,
                max_entries: header.max_entries,
            });
        }
        if header.flags == INTERNAL_NODE && vs != 8 {
            return Err(FormatError::BadValueSize {
                block,
                found: header.value_size,
                expected: 8,
            });
        }
        Ok(NodeView {
            bytes,
            location,
            header,
        })
    }

    /// Checks that the keys strictly increase.
    pub fn check_keys(&self) -> Result<(), FormatError> {
        let mut prev: Option<u64> = None;
        for i in 0..self.nr_entries() {
            let k = self.key(i).ok_or(FormatError::KeysOutOfOrder {
                block: self.location,
                index: i,
            })?;
            if prev.is_some_and(|p| p >= k) {
                return Err(FormatError::KeysOutOfOrder {
                    block: self.location,
                    index: i,
                });
            }
            prev = Some(k);
        }
        Ok(())
    }

    /// Checks the values are `expected` bytes each (leaves; internal nodes are always 8).
    pub fn expect_value_size(&self, expected: usize) -> Result<(), FormatError> {
        let want = if self.is_leaf() { expected } else { 8 };
        if self.header.value_size as usize != want {
            return Err(FormatError::BadValueSize {
                block: self.location,
                found: self.header.value_size,
                expected: u32::try_from(want).unwrap_or(u32::MAX),
            });
        }
        Ok(())
    }

    pub fn header(&self) -> &NodeHeader {
        &self.header
    }
    pub fn location(&self) -> u64 {
        self.location
    }
    pub fn is_leaf(&self) -> bool {
        self.header.flags == LEAF_NODE
    }
    pub fn nr_entries(&self) -> usize {
        self.header.nr_entries as usize
    }
    pub fn max_entries(&self) -> usize {
        self.header.max_entries as usize
    }
    pub fn value_size(&self) -> usize {
        self.header.value_size as usize
    }

    pub fn key(&self, i: usize) -> Option<u64> {
        if i >= self.nr_entries() {
            return None;
        }
        u64_at(self.bytes, NODE_HEADER_SIZE + 8 * i)
    }

    pub fn value_bytes(&self, i: usize) -> Option<&'a [u8]> {
        if i >= self.nr_entries() {
            return None;
        }
        let vs = self.value_size();
        let at = NODE_HEADER_SIZE + 8 * self.max_entries() + vs * i;
        self.bytes.get(at..at + vs)
    }

    /// An internal node's child block.
    pub fn child(&self, i: usize) -> Option<u64> {
        self.value_bytes(i).and_then(|v| u64_at(v, 0))
    }

    /// Index of the last key `<= key`, or `None` if every key is greater.
    pub fn lower_bound(&self, key: u64) -> Option<usize> {
        // Binary search over keys[0..nr): find the number of keys <= key.
        let (mut lo, mut hi) = (0usize, self.nr_entries());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.key(mid) {
                Some(k) if k <= key => lo = mid + 1,
                _ => hi = mid,
            }
        }
        lo.checked_sub(1)
    }

    /// Index of `key` if present.
    pub fn find_exact(&self, key: u64) -> Option<usize> {
        let i = self.lower_bound(key)?;
        (self.key(i) == Some(key)).then_some(i)
    }
}

/// An owned, editable node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub leaf: bool,
    pub max_entries: usize,
    pub value_size: usize,
    pub keys: Vec<u64>,
    /// `keys.len() * value_size` bytes.
    pub values: Vec<u8>,
}

impl Node {
    /// An empty node with the kernel's `max_entries` for `value_size`.
    pub fn new(leaf: bool, value_size: usize) -> Node {
        Node {
            leaf,
            max_entries: max_entries_for(value_size),
            value_size,
            keys: Vec::new(),
            values: Vec::new(),
        }
    }

    /// An empty node shaped like `other` (same kind, value size and capacity).
    pub fn empty_like(other: &Node) -> Node {
        Node {
            keys: Vec::new(),
            values: Vec::new(),
            ..other.clone()
        }
    }

    pub fn from_view(v: &NodeView<'_>) -> Node {
        let n = v.nr_entries();
        let mut keys = Vec::with_capacity(n + 1);
        let mut values = Vec::with_capacity((n + 1) * v.value_size());
        for i in 0..n {
            if let (Some(k), Some(val)) = (v.key(i), v.value_bytes(i)) {
                keys.push(k);
                values.extend_from_slice(val);
            }
        }
        Node {
            leaf: v.is_leaf(),
            max_entries: v.max_entries(),
            value_size: v.value_size(),
            keys,
            values,
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn value(&self, i: usize) -> &[u8] {
        let vs = self.value_size;
        self.values.get(i * vs..(i + 1) * vs).unwrap_or(&[])
    }

    /// An internal node's child block (0 if out of range: callers index within `len()`).
    pub fn child(&self, i: usize) -> u64 {
        u64_at(self.value(i), 0).unwrap_or(0)
    }

    pub fn set_value(&mut self, i: usize, v: &[u8]) {
        let vs = self.value_size;
        if let Some(dst) = self.values.get_mut(i * vs..(i + 1) * vs) {
            dst.copy_from_slice(v);
        }
    }

    pub fn insert_at(&mut self, i: usize, key: u64, v: &[u8]) {
        let vs = self.value_size;
        let i = i.min(self.keys.len());
        self.keys.insert(i, key);
        let at = i * vs;
        self.values.splice(
            at..at,
            v.iter().copied().chain(std::iter::repeat(0)).take(vs),
        );
    }

    pub fn remove_at(&mut self, i: usize) {
        if i < self.keys.len() {
            let vs = self.value_size;
            self.keys.remove(i);
            self.values.drain(i * vs..(i + 1) * vs);
        }
    }

    /// Removes entries `[from..to)`.
    pub fn remove_range(&mut self, from: usize, to: usize) {
        let to = to.min(self.keys.len());
        if from < to {
            let vs = self.value_size;
            self.keys.drain(from..to);
            self.values.drain(from * vs..to * vs);
        }
    }

    /// Splits off entries `[at..)` into a new node.
    pub fn split_off(&mut self, at: usize) -> Node {
        let at = at.min(self.keys.len());
        let keys = self.keys.split_off(at);
        let values = self.values.split_off(at * self.value_size);
        Node {
            keys,
            values,
            ..Node::empty_like(self)
        }
    }

    /// Appends all of `other`'s entries.
    pub fn append(&mut self, other: &mut Node) {
        self.keys.append(&mut other.keys);
        self.values.append(&mut other.values);
    }

    /// Moves the first `n` entries of `right` to the end of `self`.
    pub fn take_front(&mut self, right: &mut Node, n: usize) {
        let n = n.min(right.keys.len());
        self.keys.extend(right.keys.drain(..n));
        self.values
            .extend(right.values.drain(..n * right.value_size));
    }

    /// Moves the last `n` entries of `self` to the front of `right`.
    pub fn give_back(&mut self, right: &mut Node, n: usize) {
        let n = n.min(self.keys.len());
        let at = self.keys.len() - n;
        let keys: Vec<u64> = self.keys.drain(at..).collect();
        let values: Vec<u8> = self.values.drain(at * self.value_size..).collect();
        right.keys.splice(0..0, keys);
        right.values.splice(0..0, values);
    }

    /// Index of the last key `<= key`.
    pub fn lower_bound(&self, key: u64) -> Option<usize> {
        self.keys.partition_point(|&k| k <= key).checked_sub(1)
    }

    /// Writes the node (header without checksum/blocknr, keys, values) over the whole block.
    pub fn encode(&self, block: &mut [u8]) {
        block.fill(0);
        let header = NodeHeader {
            csum: 0,
            flags: if self.leaf { LEAF_NODE } else { INTERNAL_NODE },
            blocknr: 0,
            nr_entries: u32::try_from(self.keys.len()).unwrap_or(u32::MAX),
            max_entries: u32::try_from(self.max_entries).unwrap_or(u32::MAX),
            value_size: u32::try_from(self.value_size).unwrap_or(u32::MAX),
            padding: 0,
        };
        header.encode(block);
        let keys_at = NODE_HEADER_SIZE;
        if let Some(dst) = block.get_mut(keys_at..keys_at + 8 * self.keys.len()) {
            for (chunk, k) in dst.chunks_exact_mut(8).zip(&self.keys) {
                chunk.copy_from_slice(&k.to_le_bytes());
            }
        }
        let vals_at = NODE_HEADER_SIZE + 8 * self.max_entries;
        if let Some(dst) = block.get_mut(vals_at..vals_at + self.values.len()) {
            dst.copy_from_slice(&self.values);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_entries_follow_the_kernel_rule() {
        assert_eq!(max_entries_for(8), 252);
        assert_eq!(max_entries_for(24), 126);
        assert_eq!(max_entries_for(16), 168);
        assert_eq!(max_entries_for(4), 336);
    }

    #[test]
    fn encoded_node_reads_back_through_a_view() {
        let mut n = Node::new(true, 8);
        for k in [5u64, 1, 9] {
            let i = n.keys.partition_point(|&x| x < k);
            n.insert_at(i, k, &(k * 10).to_le_bytes());
        }
        let mut b = vec![0u8; BLOCK_SIZE];
        n.encode(&mut b);
        let v = NodeView::new(&b, 3).expect("valid");
        v.check_keys().expect("ordered");
        assert_eq!(v.nr_entries(), 3);
        assert_eq!(v.find_exact(5), Some(1));
        assert_eq!(v.find_exact(6), None);
        assert_eq!(v.lower_bound(0), None);
        assert_eq!(v.lower_bound(100), Some(2));
        assert_eq!(v.value_bytes(2), Some(&90u64.to_le_bytes()[..]));
        assert_eq!(Node::from_view(&v), n);
    }

    #[test]
    fn header_lies_are_reported_not_trusted() {
        let n = Node::new(true, 8);
        let mut b = vec![0u8; BLOCK_SIZE];
        n.encode(&mut b);
        let mut bad = b.clone();
        bad[16..20].copy_from_slice(&300u32.to_le_bytes());
        assert!(matches!(
            NodeView::new(&bad, 1),
            Err(FormatError::TooManyEntries { block: 1, .. })
        ));
        let mut bad = b.clone();
        bad[20..24].copy_from_slice(&253u32.to_le_bytes());
        assert!(matches!(
            NodeView::new(&bad, 1),
            Err(FormatError::BadMaxEntries { .. })
        ));
        let mut bad = b.clone();
        bad[4..8].copy_from_slice(&3u32.to_le_bytes());
        assert!(matches!(
            NodeView::new(&bad, 1),
            Err(FormatError::BadNodeFlags { .. })
        ));
        let mut bad = b;
        bad[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(NodeView::new(&bad, 1).is_err());
    }

    #[test]
    fn unordered_keys_are_rejected() {
        let mut n = Node::new(true, 8);
        n.insert_at(0, 5, &[0; 8]);
        n.insert_at(1, 5, &[0; 8]);
        let mut b = vec![0u8; BLOCK_SIZE];
        n.encode(&mut b);
        let v = NodeView::new(&b, 2).expect("header fine");
        assert_eq!(
            v.check_keys(),
            Err(FormatError::KeysOutOfOrder { block: 2, index: 1 })
        );
    }
}
