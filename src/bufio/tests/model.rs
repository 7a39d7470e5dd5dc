//! Random operation sequences against a model of block contents: whatever the cache does
//! behind the scenes (eviction, write-back), reads return the model, and after `write_dirty`
//! the store alone holds it.

use std::collections::HashMap;

use proptest::prelude::*;

use super::support::*;
use crate::bufio::{BufferCache, MemStore};

const NR_BLOCKS: u64 = 12;
const LIMIT_BLOCKS: usize = 4;

#[derive(Debug, Clone)]
enum Step {
    Read(u64),
    Get(u64),
    Write(u64, u8),
    New(u64, u8),
    Move(u64, u64, u8),
    Forget(u64),
    WriteDirty,
    Discard,
}

fn step() -> impl Strategy<Value = Step> {
    let block = 0..NR_BLOCKS;
    prop_oneof![
        4 => block.clone().prop_map(Step::Read),
        1 => block.clone().prop_map(Step::Get),
        4 => (block.clone(), any::<u8>()).prop_map(|(b, v)| Step::Write(b, v)),
        2 => (block.clone(), any::<u8>()).prop_map(|(b, v)| Step::New(b, v)),
        1 => (block.clone(), block.clone(), any::<u8>()).prop_map(|(a, b, v)| Step::Move(a, b, v)),
        1 => block.prop_map(Step::Forget),
        1 => Just(Step::WriteDirty),
        1 => Just(Step::Discard),
    ]
}

struct Model {
    store: std::sync::Arc<MemStore>,
    cache: BufferCache,
    blocks: HashMap<u64, u8>,
}

impl Model {
    fn expect(&self, block: u64) -> Vec<u8> {
        filled(self.blocks.get(&block).copied().unwrap_or(0))
    }

    /// What the store holds: the model's value after the cache drops its copy.
    fn reload_from_store(&mut self, block: u64) {
        let v = self.store.peek(block)[0];
        self.blocks.insert(block, v);
    }

    fn apply(&mut self, step: &Step) {
        match *step {
            Step::Read(b) => {
                assert_eq!(&self.cache.read(b).unwrap()[..], &self.expect(b)[..]);
            }
            Step::Get(b) => {
                if let Some(g) = self.cache.get(b) {
                    assert_eq!(&g[..], &self.expect(b)[..]);
                }
            }
            Step::Write(b, v) => {
                let mut g = self.cache.write(b).unwrap();
                assert_eq!(&g[..], &self.expect(b)[..]);
                g.fill(v);
                self.blocks.insert(b, v);
            }
            Step::New(b, v) => {
                self.cache.new_block(b).unwrap().fill(v);
                self.blocks.insert(b, v);
            }
            Step::Move(a, b, v) => {
                let mut g = self.cache.write(a).unwrap();
                g.fill(v);
                self.cache.release_move(g, b).unwrap();
                self.blocks.insert(b, v);
                if a != b {
                    self.reload_from_store(a);
                }
            }
            Step::Forget(b) => {
                self.cache.forget(b);
                self.reload_from_store(b);
            }
            Step::WriteDirty => {
                self.cache.write_dirty().unwrap();
                assert_eq!(self.cache.stats().dirty_blocks, 0);
                for b in 0..NR_BLOCKS {
                    assert_eq!(self.store.peek(b), self.expect(b), "store block {b}");
                }
            }
            Step::Discard => {
                self.cache.discard_dirty();
                for b in 0..NR_BLOCKS {
                    self.reload_from_store(b);
                }
            }
        }
        let stats = self.cache.stats();
        assert!(stats.cached_bytes <= (LIMIT_BLOCKS * BS) as u64);
        assert_eq!(stats.cached_bytes, stats.cached_blocks * BS as u64);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn cache_and_store_always_read_back_the_model(steps in prop::collection::vec(step(), 1..80)) {
        let (store, cache) = mem_cache(NR_BLOCKS, LIMIT_BLOCKS);
        let mut model = Model { store, cache, blocks: HashMap::new() };
        for step in &steps {
            model.apply(step);
        }
        for b in 0..NR_BLOCKS {
            prop_assert_eq!(&model.cache.read(b).unwrap()[..], &model.expect(b)[..]);
        }
        model.cache.write_dirty().unwrap();
        for b in 0..NR_BLOCKS {
            prop_assert_eq!(model.store.peek(b), model.expect(b));
        }
    }
}
