//! Paged KV blocks: the block pool, per-sequence block tables and the prefix cache.
//!
//! The pool only does the bookkeeping; a model runner keeps the actual keys and values
//! at the block indices handed out here. Every full block that has been computed gets a
//! chained hash of (parent block's hash, its token ids), so a new sequence whose prompt
//! starts with the same tokens finds those blocks and skips computing them. Blocks that
//! nobody uses but still hold cached tokens stay findable until the pool needs them;
//! then they are evicted least recently used first. Plain free blocks are handed out
//! before any cached block is evicted.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;

use xxhash_rust::xxh3::Xxh3;

use crate::error::CoreError;
use crate::kv_events::{KvCacheEvent, KvEventLog};
use crate::request::TokenId;

/// Index of a physical KV block.
pub type BlockId = u32;

/// Chained hash of a full block: stable across runs and machines (XXH3 over the
/// little-endian bytes of the parent hash and the token ids), never Rust's randomly
/// seeded default hasher.
pub type BlockHash = u64;

/// The default number of tokens per block.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Seed of the hash chain for a sequence's first block; any fixed value works.
const ROOT_SEED: u64 = 0x6865_6464_6c65_6b76;

/// The hash of a full block whose parent block hashed to `parent` (None for the first).
pub fn block_hash(parent: Option<BlockHash>, tokens: &[TokenId]) -> BlockHash {
    let mut hasher = Xxh3::with_seed(ROOT_SEED);
    hasher.update(&parent.unwrap_or(0).to_le_bytes());
    hasher.update(&[u8::from(parent.is_some())]);
    for t in tokens {
        hasher.update(&t.to_le_bytes());
    }
    hasher.digest()
}

/// What the prefix cache remembers of a block. The parent hash and the tokens are kept
/// so that a hash collision can never hand out the wrong keys and values.
#[derive(Debug)]
struct CachedContent {
    hash: BlockHash,
    parent: Option<BlockHash>,
    tokens: Vec<TokenId>,
}

#[derive(Debug, Default)]
struct Block {
    ref_count: u32,
    cached: Option<CachedContent>,
    /// Key in the evictable set while unused and cached.
    lru_tick: Option<u64>,
}

/// The blocks of one sequence, in order, with the hashes of those registered in the
/// prefix cache. Not `Clone`, and only [`BlockPool::free_table`] ends it, by value: a
/// table cannot be released twice, and one dropped still holding blocks (leaking them)
/// fails a debug assertion.
#[derive(Debug, Default)]
pub struct BlockTable {
    blocks: Vec<BlockId>,
    /// Hash of each leading full block already in the chain (a prefix of `blocks`).
    hashes: Vec<BlockHash>,
}

impl BlockTable {
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

impl Drop for BlockTable {
    fn drop(&mut self) {
        // During a panic the leak is a consequence, not the bug; asserting would abort.
        debug_assert!(
            self.blocks.is_empty() || std::thread::panicking(),
            "a block table holding {} blocks was dropped without BlockPool::free_table",
            self.blocks.len()
        );
    }
}

/// Counters of the pool, for stats and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvStats {
    pub block_size: usize,
    pub total_blocks: usize,
    /// Blocks that can be handed out now (plain free plus unused cached ones).
    pub free_blocks: usize,
    /// Blocks referenced by at least one sequence.
    pub used_blocks: usize,
    /// Blocks holding a prefix-cache entry, used or not.
    pub cached_blocks: usize,
    /// Prompt tokens served from the prefix cache.
    pub prefix_hit_tokens: u64,
    /// Prompt tokens that had to be computed.
    pub prefix_miss_tokens: u64,
}

/// The pool of physical KV blocks.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    blocks: Vec<Block>,
    /// Blocks with no users and no cached content.
    free: Vec<BlockId>,
    /// Unused cached blocks by last use, oldest first.
    evictable: BTreeMap<u64, BlockId>,
    cache: FxHashMap<BlockHash, BlockId>,
    tick: u64,
    hit_tokens: u64,
    miss_tokens: u64,
    /// Changes of the prefix cache, for KV-event subscribers (off unless enabled).
    events: KvEventLog,
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block size must be positive");
        assert!(
            num_blocks <= BlockId::MAX as usize,
            "too many blocks for a u32 block id"
        );
        BlockPool {
            block_size,
            blocks: (0..num_blocks).map(|_| Block::default()).collect(),
            // Reversed so that blocks are handed out from 0 upwards.
            free: (0..num_blocks as BlockId).rev().collect(),
            evictable: BTreeMap::new(),
            cache: FxHashMap::default(),
            tick: 0,
            hit_tokens: 0,
            miss_tokens: 0,
            events: KvEventLog::default(),
        }
    }

    /// Starts recording the prefix cache's changes for [`Self::drain_events`], on a pool
    /// that has cached nothing yet. The first event is [`KvCacheEvent::AllBlocksCleared`]:
    /// a subscriber that heard of an earlier pool (an engine before its restart) forgets it.
    pub fn enable_events(&mut self) {
        debug_assert!(
            self.cache.is_empty(),
            "events start before anything is cached"
        );
        if !self.events.is_enabled() {
            self.events.enable();
            self.events.cleared();
        }
    }

    /// The prefix cache's changes since the last drain, oldest first (none unless
    /// [`Self::enable_events`] was called).
    pub fn drain_events(&mut self) -> Vec<KvCacheEvent> {
        self.events.drain()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks that can be allocated now, evicting unused cached ones if needed.
    pub fn num_allocatable(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks needed to hold `num_tokens` tokens.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.blocks[block as usize].ref_count
    }

    pub fn stats(&self) -> KvStats {
        KvStats {
            block_size: self.block_size,
            total_blocks: self.blocks.len(),
            free_blocks: self.num_allocatable(),
            used_blocks: self.blocks.len() - self.num_allocatable(),
            cached_blocks: self.cache.len(),
            prefix_hit_tokens: self.hit_tokens,
            prefix_miss_tokens: self.miss_tokens,
        }
    }

    /// Grows `table` to hold `num_tokens` tokens. All or nothing: returns false, changing
    /// nothing, when the pool has too few blocks.
    pub fn grow(&mut self, table: &mut BlockTable, num_tokens: usize) -> bool {
        let needed = self
            .blocks_for(num_tokens)
            .saturating_sub(table.blocks.len());
        if needed > self.num_allocatable() {
            return false;
        }
        for _ in 0..needed {
            let block = self.allocate().expect("counted above");
            table.blocks.push(block);
        }
        true
    }

    /// Starts a table for `tokens` from the longest chain of cached full blocks, leaving
    /// at least `min_uncached` tokens uncached (a sequence must compute at least its last
    /// token to get logits). Returns the table and the number of tokens it covers.
    pub fn lookup_prefix(
        &mut self,
        tokens: &[TokenId],
        min_uncached: usize,
    ) -> (BlockTable, usize) {
        let mut table = BlockTable::default();
        let max_blocks = tokens.len().saturating_sub(min_uncached) / self.block_size;
        let mut parent = None;
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let hash = block_hash(parent, chunk);
            let Some(&block) = self.cache.get(&hash) else {
                break;
            };
            let content = self.blocks[block as usize]
                .cached
                .as_ref()
                .expect("cache index points at a cached block");
            if content.parent != parent || content.tokens != chunk {
                break; // a hash collision: never reuse another prefix's values
            }
            self.retain(block);
            table.blocks.push(block);
            table.hashes.push(hash);
            parent = Some(hash);
        }
        let cached_tokens = table.blocks.len() * self.block_size;
        (table, cached_tokens)
    }

    /// Counts a sequence's prompt tokens as prefix-cache hits or misses.
    pub fn record_prefix_lookup(&mut self, hit_tokens: usize, miss_tokens: usize) {
        self.hit_tokens += hit_tokens as u64;
        self.miss_tokens += miss_tokens as u64;
    }

    /// Registers the full blocks of `table` whose tokens (`tokens[..num_computed]`) now
    /// hold computed keys and values, so that later sequences can reuse them.
    pub fn register_computed(
        &mut self,
        table: &mut BlockTable,
        tokens: &[TokenId],
        num_computed: usize,
    ) {
        let full = (num_computed / self.block_size).min(table.blocks.len());
        while table.hashes.len() < full {
            let index = table.hashes.len();
            let chunk = &tokens[index * self.block_size..(index + 1) * self.block_size];
            let parent = table.hashes.last().copied();
            let hash = block_hash(parent, chunk);
            let block = table.blocks[index];
            // If another block already caches this content, this one stays uncached and
            // simply returns to the free list when released.
            if !self.cache.contains_key(&hash) && self.blocks[block as usize].cached.is_none() {
                self.cache.insert(hash, block);
                self.events.stored(hash, parent, chunk);
                self.blocks[block as usize].cached = Some(CachedContent {
                    hash,
                    parent,
                    tokens: chunk.to_vec(),
                });
            }
            table.hashes.push(hash);
        }
    }

    /// Releases every block of a table. Tail blocks are released first so that they are
    /// evicted before the shared head of the prefix.
    pub fn free_table(&mut self, mut table: BlockTable) -> Result<(), CoreError> {
        for block in std::mem::take(&mut table.blocks).into_iter().rev() {
            self.release(block)?;
        }
        Ok(())
    }

    /// Drops one reference to `block`; releasing a block nobody uses is an error.
    pub fn release(&mut self, block: BlockId) -> Result<(), CoreError> {
        let entry = &mut self.blocks[block as usize];
        if entry.ref_count == 0 {
            return Err(CoreError::DoubleRelease(block));
        }
        entry.ref_count -= 1;
        if entry.ref_count == 0 {
            if entry.cached.is_some() {
                self.tick += 1;
                entry.lru_tick = Some(self.tick);
                self.evictable.insert(self.tick, block);
            } else {
                self.free.push(block);
            }
        }
        Ok(())
    }

    fn retain(&mut self, block: BlockId) {
        let entry = &mut self.blocks[block as usize];
        if let Some(tick) = entry.lru_tick.take() {
            self.evictable.remove(&tick);
        }
        entry.ref_count += 1;
    }

    fn allocate(&mut self) -> Option<BlockId> {
        let block = match self.free.pop() {
            Some(block) => block,
            None => {
                let (_, block) = self.evictable.pop_first()?;
                let entry = &mut self.blocks[block as usize];
                entry.lru_tick = None;
                let content = entry.cached.take().expect("evictable blocks are cached");
                self.cache.remove(&content.hash);
                self.events.removed(content.hash);
                block
            }
        };
        self.blocks[block as usize].ref_count = 1;
        Some(block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(n: usize, offset: u32) -> Vec<TokenId> {
        (0..n as u32).map(|i| i + offset).collect()
    }

    /// Allocates and "computes" a sequence of `toks`, registering its full blocks.
    fn compute(pool: &mut BlockPool, toks: &[TokenId]) -> (BlockTable, usize) {
        let (mut table, hit) = pool.lookup_prefix(toks, 1);
        assert!(pool.grow(&mut table, toks.len()));
        pool.register_computed(&mut table, toks, toks.len());
        (table, hit)
    }

    #[test]
    fn hashes_are_stable_and_chained() {
        // Golden value: the same on every run and machine.
        let h = block_hash(None, &[1, 2, 3, 4]);
        assert_eq!(h, block_hash(None, &[1, 2, 3, 4]));
        assert_eq!(h, 0x042d_fe60_c526_bf97, "hash changed: {h:#x}");
        assert_ne!(block_hash(Some(h), &[1, 2, 3, 4]), h);
        assert_ne!(block_hash(None, &[1, 2, 3, 5]), h);
        assert_ne!(block_hash(Some(0), &[1, 2, 3, 4]), h);
    }

    #[test]
    fn grow_allocates_blocks_and_free_returns_them() {
        let mut pool = BlockPool::new(8, 4);
        let mut table = BlockTable::default();
        assert!(pool.grow(&mut table, 1));
        assert_eq!(table.len(), 1);
        assert!(pool.grow(&mut table, 4));
        assert_eq!(table.len(), 1);
        assert!(pool.grow(&mut table, 9));
        assert_eq!(table.blocks(), &[0, 1, 2]);
        assert_eq!(pool.stats().used_blocks, 3);
        assert!(!pool.grow(&mut table, 33), "needs 9 blocks of 8");
        assert_eq!(table.len(), 3, "a failed grow changes nothing");
        pool.free_table(table).unwrap();
        let s = pool.stats();
        assert_eq!((s.free_blocks, s.used_blocks), (8, 0));
    }

    #[test]
    fn releasing_a_free_block_is_an_error() {
        let mut pool = BlockPool::new(2, 4);
        let mut table = BlockTable::default();
        assert!(pool.grow(&mut table, 4));
        let block = table.blocks()[0];
        pool.free_table(table).unwrap();
        assert_eq!(pool.release(block), Err(CoreError::DoubleRelease(block)));
        assert_eq!(pool.stats().free_blocks, 2);
    }

    #[test]
    fn shared_prefix_reuses_blocks() {
        let mut pool = BlockPool::new(16, 4);
        let a: Vec<TokenId> = tokens(10, 100);
        let (table_a, hit_a) = compute(&mut pool, &a);
        assert_eq!(hit_a, 0);
        assert_eq!(pool.stats().cached_blocks, 2, "two full blocks of 4");

        // Same first 8 tokens, different tail.
        let mut b = a[..8].to_vec();
        b.extend([7, 7, 7]);
        let (table_b, hit_b) = compute(&mut pool, &b);
        assert_eq!(hit_b, 8);
        assert_eq!(&table_b.blocks()[..2], &table_a.blocks()[..2]);
        assert_ne!(table_b.blocks()[2], table_a.blocks()[2]);
        assert_eq!(pool.ref_count(table_a.blocks()[0]), 2);

        // A different first block shares nothing, even with equal later blocks.
        let mut c = vec![9, 9, 9, 9];
        c.extend_from_slice(&a[4..]);
        let (table_c, hit_c) = compute(&mut pool, &c);
        assert_eq!(hit_c, 0);
        for t in [table_a, table_b, table_c] {
            pool.free_table(t).unwrap();
        }
        assert_eq!(pool.stats().free_blocks, 16);
    }

    #[test]
    fn a_full_hit_still_leaves_a_token_to_compute() {
        let mut pool = BlockPool::new(8, 4);
        let a = tokens(8, 0);
        let (table, _) = compute(&mut pool, &a);
        pool.free_table(table).unwrap();
        let (table, hit) = pool.lookup_prefix(&a, 1);
        assert_eq!(
            hit, 4,
            "the last block is recomputed so the last token has logits"
        );
        pool.free_table(table).unwrap();
    }

    #[test]
    fn cached_blocks_survive_release_and_are_evicted_lru() {
        let mut pool = BlockPool::new(4, 2);
        // Three sequences of one full block each, released in order a, b, c.
        let seqs = [vec![1, 1], vec![2, 2], vec![3, 3]];
        let mut tables = Vec::new();
        for s in &seqs {
            let mut t = BlockTable::default();
            assert!(pool.grow(&mut t, 2));
            pool.register_computed(&mut t, s, 2);
            tables.push(t);
        }
        for t in tables {
            pool.free_table(t).unwrap();
        }
        let s = pool.stats();
        assert_eq!((s.free_blocks, s.cached_blocks), (4, 3));

        // Touch "a" again so that "b" is now the least recently used.
        let (t, hit) = pool.lookup_prefix(&[1, 1, 0], 1);
        assert_eq!(hit, 2);
        pool.free_table(t).unwrap();

        // The plain free block goes first, then b, then c: a survives.
        let mut grab = BlockTable::default();
        assert!(pool.grow(&mut grab, 2));
        assert_eq!(pool.stats().cached_blocks, 3);
        assert!(pool.grow(&mut grab, 4));
        assert_eq!(pool.lookup_prefix(&[2, 2, 0], 1).1, 0, "b evicted first");
        assert!(pool.grow(&mut grab, 6));
        assert_eq!(pool.lookup_prefix(&[3, 3, 0], 1).1, 0, "then c");
        let (t, hit) = pool.lookup_prefix(&[1, 1, 0], 1);
        assert_eq!(hit, 2, "a, used most recently, is still cached");
        pool.free_table(t).unwrap();
        pool.free_table(grab).unwrap();
        assert_eq!(pool.stats().free_blocks, 4);
    }

    #[test]
    fn cached_blocks_in_use_are_never_evicted() {
        let mut pool = BlockPool::new(2, 2);
        let (table, _) = compute(&mut pool, &[5, 5, 5]);
        let mut other = BlockTable::default();
        assert!(!pool.grow(&mut other, 2), "both blocks are in use");
        pool.free_table(table).unwrap();
        assert!(pool.grow(&mut other, 4));
        pool.free_table(other).unwrap();
    }

    #[test]
    fn events_report_stored_chains_evictions_and_start_cleared() {
        let mut pool = BlockPool::new(3, 2);
        let (table, _) = compute(&mut pool, &[1, 2, 3, 4, 5]);
        assert!(pool.drain_events().is_empty(), "off unless enabled");
        pool.free_table(table).unwrap();

        let mut pool = BlockPool::new(3, 2);
        pool.enable_events();
        let (table, _) = compute(&mut pool, &[1, 2, 3, 4, 5]);
        let first = block_hash(None, &[1, 2]);
        let second = block_hash(Some(first), &[3, 4]);
        assert_eq!(
            pool.drain_events(),
            vec![
                KvCacheEvent::AllBlocksCleared,
                KvCacheEvent::BlockStored {
                    block_hashes: vec![first, second],
                    parent_block_hash: None,
                    token_ids: vec![1, 2, 3, 4],
                    block_size: 2,
                },
            ]
        );
        pool.free_table(table).unwrap();
        // A hit stores nothing new; reusing the blocks for other tokens evicts them.
        let (table, hit) = compute(&mut pool, &[1, 2, 3, 4, 9]);
        assert_eq!(hit, 4);
        assert!(pool.drain_events().is_empty());
        pool.free_table(table).unwrap();
        let mut grab = BlockTable::default();
        assert!(pool.grow(&mut grab, 6));
        assert_eq!(
            pool.drain_events(),
            vec![KvCacheEvent::BlockRemoved {
                block_hashes: vec![second, first]
            }],
            "the tail of the chain is evicted first"
        );
        pool.free_table(grab).unwrap();
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "dropped without BlockPool::free_table")]
    fn a_table_dropped_holding_blocks_fails_in_debug_builds() {
        let mut pool = BlockPool::new(2, 4);
        let mut table = BlockTable::default();
        assert!(pool.grow(&mut table, 4));
        drop(table);
    }

    #[test]
    fn duplicate_content_keeps_the_first_copy() {
        let mut pool = BlockPool::new(4, 2);
        let mut t1 = BlockTable::default();
        let mut t2 = BlockTable::default();
        assert!(pool.grow(&mut t1, 2) && pool.grow(&mut t2, 2));
        pool.register_computed(&mut t1, &[4, 4], 2);
        pool.register_computed(&mut t2, &[4, 4], 2);
        assert_eq!(pool.stats().cached_blocks, 1);
        pool.free_table(t1).unwrap();
        pool.free_table(t2).unwrap();
        let s = pool.stats();
        assert_eq!((s.free_blocks, s.cached_blocks), (4, 1));
    }
}
