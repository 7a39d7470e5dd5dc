//! Every metadata block decoder over one arbitrary 4 KiB block: superblock, btree node (view,
//! owned copy, re-encoding), bitmap, space-map index, and the leaf values. Each decoder sees
//! the block as read and also resealed with its own checksum, so the fuzzer gets past the
//! checksum to the structure.
//!
//! Input: the block (zero-padded to 4 KiB), then parameters (entry numbers, keys, counts).

use super::Input;
use thinblk::engine::pdata::checksum::{self, BlockKind};
use thinblk::engine::pdata::codec::u64_at;
use thinblk::engine::pdata::node::{Node, NodeView};
use thinblk::engine::pdata::space_map::{bitmap, index};
use thinblk::engine::pdata::superblock::{SmRoot, Superblock, BLOCK_SIZE, SPACE_MAP_ROOT_SIZE};
use thinblk::engine::pdata::values::{BlockTime, DeviceDetails, IndexEntry, Value};

fn sealed(block: &[u8], kind: BlockKind, location: u64) -> Vec<u8> {
    let mut b = block.to_vec();
    checksum::seal(&mut b, kind, location);
    b
}

fn superblock(block: &[u8], location: u64) {
    let _ = Superblock::decode(block, location);
    let Ok(sb) = Superblock::decode(&sealed(block, BlockKind::Superblock, location), location)
    else {
        return;
    };
    let mut again = vec![0u8; BLOCK_SIZE];
    sb.encode(&mut again, location);
    assert_eq!(
        Superblock::decode(&again, location),
        Ok(sb),
        "superblock round trip"
    );
}

fn node(block: &[u8], location: u64, key: u64) {
    let Ok(view) = NodeView::new(block, location) else {
        return;
    };
    let ordered = view.check_keys().is_ok();
    for i in 0..=view.nr_entries() {
        let _ = (view.key(i), view.value_bytes(i), view.child(i));
    }
    for vs in [4, 8, 16, 24] {
        let _ = view.expect_value_size(vs);
    }
    if let Some(i) = view.lower_bound(key) {
        assert!(i < view.nr_entries());
        if ordered {
            assert!(view.key(i).is_some_and(|k| k <= key));
        }
    }
    if let Some(i) = view.find_exact(key) {
        assert_eq!(view.key(i), Some(key));
    }
    let owned = Node::from_view(&view);
    assert_eq!(owned.len(), view.nr_entries());
    let _ = (owned.lower_bound(key), owned.value(0), owned.child(0));
    let mut again = vec![0u8; BLOCK_SIZE];
    owned.encode(&mut again);
    let reread = NodeView::new(&again, location).expect("a re-encoded node is valid");
    assert_eq!(Node::from_view(&reread), owned, "node round trip");
}

fn bitmap_block(block: &[u8], input: &mut Input<'_>) {
    let (entry, from, to) = (input.u64(), input.u64() % 20_000, input.u64() % 20_000);
    let c = bitmap::get(block, entry);
    assert!(c <= 3);
    let counts = bitmap::decode_entries(block, u64::from(input.u16()));
    if let Some(&first) = counts.first() {
        assert_eq!(first, bitmap::get(block, 0));
    }
    if let Some(free) = bitmap::find_free(block, from, to) {
        assert!(free >= from && free < to);
        assert_eq!(bitmap::get(block, free), 0);
    }
    let mut copy = block.to_vec();
    let v = input.u8();
    bitmap::set(&mut copy, entry, v);
    if entry < bitmap::ENTRIES_PER_BITMAP {
        assert_eq!(bitmap::get(&copy, entry), v.min(3));
    }
}

fn values(block: &[u8]) {
    fn round_trip<V: Value>(bytes: &[u8]) {
        if let Some(v) = V::unpack(bytes) {
            let mut out = vec![0u8; V::SIZE];
            v.pack(&mut out);
            assert_eq!(V::unpack(&out), Some(v));
        }
    }
    for at in [0usize, 1, 32, 4064, 4090] {
        let bytes = block.get(at..).unwrap_or(&[]);
        round_trip::<u64>(bytes);
        round_trip::<u32>(bytes);
        round_trip::<DeviceDetails>(bytes);
        round_trip::<IndexEntry>(bytes);
        if let Some(v) = BlockTime::unpack(bytes) {
            assert_eq!(BlockTime::from_raw(v.to_raw()), v);
        }
    }
    let field: [u8; SPACE_MAP_ROOT_SIZE] = block
        .get(..SPACE_MAP_ROOT_SIZE)
        .and_then(|f| f.try_into().ok())
        .unwrap_or([0; SPACE_MAP_ROOT_SIZE]);
    let root = SmRoot::from_field(&field);
    assert_eq!(SmRoot::from_field(&root.to_field()), root);
}

pub fn run(data: &[u8]) {
    let mut block = data.get(..BLOCK_SIZE).unwrap_or(data).to_vec();
    block.resize(BLOCK_SIZE, 0);
    let mut input = Input(data.get(BLOCK_SIZE..).unwrap_or(&[]));
    // Where the block says it lives, so the location check can pass too.
    let location = u64_at(&block, 8).unwrap_or(0);

    superblock(&block, location);
    node(&block, location, input.u64());
    node(
        &sealed(&block, BlockKind::Node, location),
        location,
        input.u64(),
    );
    bitmap_block(&block, &mut input);
    let nr_bitmaps = u64::from(input.u16() % 300);
    let _ = index::decode(&block, location, nr_bitmaps);
    let ib = sealed(&block, BlockKind::Index, location);
    if let Ok(entries) = index::decode(&ib, location, nr_bitmaps) {
        assert!(entries.len() as u64 <= nr_bitmaps);
    }
    values(&block);
}
