//! Changes of the prefix cache, recorded for routers that track which replica holds which
//! blocks (exact prefix-aware routing, as Dynamo and llm-d do it with vLLM's KV events).
//!
//! The block pool records each change here as it happens; the server drains the log after
//! every step and publishes it. Nothing is recorded unless the log was enabled, so a
//! server without a subscriber pays nothing. Consecutive blocks of one chain are reported
//! in one event, as vLLM reports them: the first block's parent, then every block's hash
//! and all their tokens in order.

use crate::kv::BlockHash;
use crate::request::TokenId;

/// One change of the prefix cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvCacheEvent {
    /// Full blocks whose keys and values are now cached and can be reused by any prompt
    /// that starts with the same tokens. `block_hashes` form a chain: the first block's
    /// parent is `parent_block_hash` (None: it starts a sequence), every later block's
    /// parent is the block before it. `token_ids` holds `block_size` tokens per block.
    BlockStored {
        block_hashes: Vec<BlockHash>,
        parent_block_hash: Option<BlockHash>,
        token_ids: Vec<TokenId>,
        block_size: usize,
    },
    /// Cached blocks evicted: their hashes find nothing any more.
    BlockRemoved { block_hashes: Vec<BlockHash> },
    /// The cache holds none of the blocks reported before this event.
    AllBlocksCleared,
}

/// The events not yet drained, in the order the changes happened.
#[derive(Debug, Default)]
pub(crate) struct KvEventLog {
    enabled: bool,
    pending: Vec<KvCacheEvent>,
}

impl KvEventLog {
    pub(crate) fn enable(&mut self) {
        self.enabled = true;
    }

    pub(crate) fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// A block of `tokens` with hash `hash`, child of `parent`, is now cached.
    pub(crate) fn stored(
        &mut self,
        hash: BlockHash,
        parent: Option<BlockHash>,
        tokens: &[TokenId],
    ) {
        if !self.enabled {
            return;
        }
        if let Some(KvCacheEvent::BlockStored {
            block_hashes,
            token_ids,
            block_size,
            ..
        }) = self.pending.last_mut()
        {
            // The previous event ends in this block's parent: the chain goes on.
            if parent.is_some()
                && block_hashes.last() == parent.as_ref()
                && *block_size == tokens.len()
            {
                block_hashes.push(hash);
                token_ids.extend_from_slice(tokens);
                return;
            }
        }
        self.pending.push(KvCacheEvent::BlockStored {
            block_hashes: vec![hash],
            parent_block_hash: parent,
            token_ids: tokens.to_vec(),
            block_size: tokens.len(),
        });
    }

    /// The block with hash `hash` was evicted.
    pub(crate) fn removed(&mut self, hash: BlockHash) {
        if !self.enabled {
            return;
        }
        if let Some(KvCacheEvent::BlockRemoved { block_hashes }) = self.pending.last_mut() {
            block_hashes.push(hash);
            return;
        }
        self.pending.push(KvCacheEvent::BlockRemoved {
            block_hashes: vec![hash],
        });
    }

    pub(crate) fn cleared(&mut self) {
        if self.enabled {
            self.pending.push(KvCacheEvent::AllBlocksCleared);
        }
    }

    /// The events recorded since the last drain, oldest first.
    pub(crate) fn drain(&mut self) -> Vec<KvCacheEvent> {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled() -> KvEventLog {
        let mut log = KvEventLog::default();
        log.enable();
        log
    }

    #[test]
    fn nothing_is_recorded_unless_enabled() {
        let mut log = KvEventLog::default();
        log.stored(1, None, &[1, 2]);
        log.removed(1);
        log.cleared();
        assert!(log.drain().is_empty());
    }

    #[test]
    fn a_chain_of_blocks_is_one_event_and_a_new_chain_another() {
        let mut log = enabled();
        log.stored(10, None, &[1, 2]);
        log.stored(11, Some(10), &[3, 4]);
        log.stored(20, Some(99), &[5, 6]);
        assert_eq!(
            log.drain(),
            vec![
                KvCacheEvent::BlockStored {
                    block_hashes: vec![10, 11],
                    parent_block_hash: None,
                    token_ids: vec![1, 2, 3, 4],
                    block_size: 2,
                },
                KvCacheEvent::BlockStored {
                    block_hashes: vec![20],
                    parent_block_hash: Some(99),
                    token_ids: vec![5, 6],
                    block_size: 2,
                },
            ]
        );
        assert!(log.drain().is_empty(), "a drain empties the log");
    }

    #[test]
    fn removals_in_a_row_are_one_event_and_order_is_kept() {
        let mut log = enabled();
        log.removed(1);
        log.removed(2);
        log.stored(3, None, &[7]);
        log.removed(4);
        log.cleared();
        assert_eq!(
            log.drain(),
            vec![
                KvCacheEvent::BlockRemoved {
                    block_hashes: vec![1, 2]
                },
                KvCacheEvent::BlockStored {
                    block_hashes: vec![3],
                    parent_block_hash: None,
                    token_ids: vec![7],
                    block_size: 1,
                },
                KvCacheEvent::BlockRemoved {
                    block_hashes: vec![4]
                },
                KvCacheEvent::AllBlocksCleared,
            ]
        );
    }
}
