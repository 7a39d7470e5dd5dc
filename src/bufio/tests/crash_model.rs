//! Random operation sequences with injected I/O errors and power cuts against a model: reads
//! return the model's contents, errors name a real block and lose nothing, and after a cut the
//! device holds, block by block, something the last successful `write_dirty` allows.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use proptest::prelude::*;

use super::support::*;
use crate::bufio::{BufferCache, BufioError, CrashStore, WriteFault};

const NR_BLOCKS: u64 = 10;
const LIMIT_BLOCKS: usize = 4;

#[derive(Debug, Clone)]
enum Step {
    Read(u64),
    Write(u64, u8),
    New(u64, u8),
    Forget(u64),
    Discard,
    Commit,
    CommitAsync,
    FailWritesAfter(u64),
    FailRead(u64),
    ClearFaults,
    Cut,
    TornCut(u64),
}

fn step() -> impl Strategy<Value = Step> {
    let block = 0..NR_BLOCKS;
    prop_oneof![
        4 => block.clone().prop_map(Step::Read),
        5 => (block.clone(), 1..=255u8).prop_map(|(b, v)| Step::Write(b, v)),
        2 => (block.clone(), 1..=255u8).prop_map(|(b, v)| Step::New(b, v)),
        1 => block.clone().prop_map(Step::Forget),
        1 => Just(Step::Discard),
        3 => Just(Step::Commit),
        1 => Just(Step::CommitAsync),
        1 => (0..4u64).prop_map(Step::FailWritesAfter),
        1 => block.prop_map(Step::FailRead),
        2 => Just(Step::ClearFaults),
        1 => Just(Step::Cut),
        1 => any::<u64>().prop_map(Step::TornCut),
    ]
}

struct Model {
    store: Arc<CrashStore>,
    cache: Option<BufferCache>,
    current: HashMap<u64, u8>,
    /// Values a power cut may leave in each block (the last commit, or more after failures).
    durable: HashMap<u64, BTreeSet<u8>>,
    /// Values given to each block since the last successful commit.
    since_commit: HashMap<u64, BTreeSet<u8>>,
}

impl Model {
    fn new() -> Self {
        let store = Arc::new(CrashStore::new(BS, NR_BLOCKS));
        let cache = BufferCache::new(store.clone(), config(LIMIT_BLOCKS));
        Model {
            store,
            cache: Some(cache),
            current: HashMap::new(),
            durable: (0..NR_BLOCKS).map(|b| (b, BTreeSet::from([0]))).collect(),
            since_commit: HashMap::new(),
        }
    }

    fn cache(&self) -> &BufferCache {
        self.cache.as_ref().unwrap()
    }

    fn value(&self, b: u64) -> u8 {
        self.current.get(&b).copied().unwrap_or(0)
    }

    fn assign(&mut self, b: u64, v: u8) {
        self.current.insert(b, v);
        self.since_commit.entry(b).or_default().insert(v);
    }

    fn check_error(err: &BufioError) {
        match err {
            BufioError::Io { block, .. } => assert!(*block < NR_BLOCKS),
            other => panic!("unexpected error {other:?}"),
        }
    }

    fn committed(&mut self) {
        for b in 0..NR_BLOCKS {
            self.durable.insert(b, BTreeSet::from([self.value(b)]));
        }
        self.since_commit.clear();
    }

    /// After a cut, the device is the truth: check it, then start over from it.
    fn restart(&mut self, torn: bool) {
        self.cache = None;
        for b in 0..NR_BLOCKS {
            let got = self.store.peek(b)[0];
            let allowed = &self.durable[&b];
            let pending = self.since_commit.get(&b);
            let ok = allowed.contains(&got) || (torn && pending.is_some_and(|p| p.contains(&got)));
            assert!(
                ok,
                "block {b} holds {got} after a cut; allowed {allowed:?}, pending {pending:?}"
            );
            self.current.insert(b, got);
        }
        self.committed();
        self.cache = Some(BufferCache::new(self.store.clone(), config(LIMIT_BLOCKS)));
    }

    fn apply(&mut self, step: &Step) {
        match *step {
            Step::Read(b) => match self.cache().read(b) {
                Ok(g) => assert_eq!(&g[..], &filled(self.value(b))[..], "block {b}"),
                Err(e) => Self::check_error(&e),
            },
            Step::Write(b, v) => match self.cache().write(b) {
                Ok(mut g) => {
                    assert_eq!(&g[..], &filled(self.value(b))[..], "block {b}");
                    g.fill(v);
                    drop(g);
                    self.assign(b, v);
                }
                Err(e) => Self::check_error(&e),
            },
            Step::New(b, v) => match self.cache().new_block(b) {
                Ok(mut g) => {
                    g.fill(v);
                    drop(g);
                    self.assign(b, v);
                }
                Err(e) => Self::check_error(&e),
            },
            Step::Forget(b) => {
                self.cache().forget(b);
                self.current.insert(b, self.store.peek(b)[0]);
            }
            Step::Discard => {
                self.cache().discard_dirty();
                for b in 0..NR_BLOCKS {
                    self.current.insert(b, self.store.peek(b)[0]);
                }
            }
            Step::Commit => match self.cache().write_dirty() {
                Ok(()) => self.committed(),
                Err(e) => {
                    Self::check_error(&e);
                    // Unflushed, but a later flush may make any of these durable.
                    for (b, vals) in &self.since_commit {
                        self.durable
                            .entry(*b)
                            .or_default()
                            .extend(vals.iter().copied());
                    }
                }
            },
            Step::CommitAsync => self.cache().write_dirty_async(),
            Step::FailWritesAfter(n) => self.store.fail_after_writes(n, WriteFault::Error),
            Step::FailRead(b) => self.store.fail_read(b),
            Step::ClearFaults => self.store.clear_faults(),
            Step::Cut => {
                // Let queued background work finish first, as the dying cache would.
                self.cache = None;
                self.store.cut_power();
                self.restart(false);
            }
            Step::TornCut(seed) => {
                self.cache = None;
                self.store.cut_power_torn(seed);
                self.restart(true);
            }
        }
        assert!(self.cache().stats().cached_bytes <= (LIMIT_BLOCKS * BS) as u64);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn faults_and_power_cuts_never_lose_a_committed_block(steps in prop::collection::vec(step(), 1..60)) {
        let mut model = Model::new();
        for step in &steps {
            model.apply(step);
        }
        model.store.clear_faults();
        for b in 0..NR_BLOCKS {
            prop_assert_eq!(&model.cache().read(b).unwrap()[..], &filled(model.value(b))[..]);
        }
        // A pending background error may be reported once; the retry must then succeed.
        if model.cache().write_dirty().is_err() {
            model.cache().write_dirty().unwrap();
        }
        model.committed();
        model.cache = None;
        model.store.cut_power();
        model.restart(false);
    }
}
