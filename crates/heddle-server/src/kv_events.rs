//! KV-cache events as vLLM publishes them, for exact prefix-aware routers (Dynamo, llm-d):
//! a ZeroMQ PUB socket (`--kv-events-endpoint`) sending one multipart message per batch of
//! events: the topic, the batch's sequence number (8 bytes, big-endian) and the batch in
//! MessagePack, laid out as vLLM's msgspec structs (`array_like`, tagged):
//!
//! ```text
//! KVEventBatch     = [ts: float, events: [event, ...]]
//! BlockStored      = ["BlockStored", block_hashes: [int], parent_block_hash: int | nil,
//!                     token_ids: [int], block_size: int, lora_id: nil, medium: str]
//! BlockRemoved     = ["BlockRemoved", block_hashes: [int], medium: str]
//! AllBlocksCleared = ["AllBlocksCleared"]
//! ```
//!
//! As in vLLM, an endpoint with a wildcard (`tcp://*:5557`, `tcp://[::]:5557`) is bound,
//! for subscribers to connect to (Dynamo's relay does); any other (`tcp://epp:5557`) is
//! connected to a subscriber that binds (llm-d's endpoint picker does), in the background,
//! reconnecting when it goes away.
//!
//! Block hashes are heddle's own chained hashes (unsigned 64-bit integers, see
//! `heddle_core::kv::block_hash`). Engines hand their events to a [`KvEventSink`] after
//! every step, without waiting: when the publisher falls behind, whole batches are
//! dropped, and the gap in sequence numbers tells subscribers that they missed some.
//! Like vLLM's PUB socket, nothing is kept for subscribers that join late (vLLM's replay
//! socket is not offered).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use heddle_core::KvCacheEvent;
use tokio::sync::mpsc;
use zeromq::{Socket, SocketSend, ZmqMessage};

/// Batches waiting for the socket; past this, new batches are dropped.
const QUEUE_BATCHES: usize = 4096;

/// Where KV events are published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEventsConfig {
    /// A ZeroMQ endpoint, `tcp://HOST:PORT`: bound with a wildcard host, else connected.
    pub endpoint: String,
    /// The first frame of every message; subscribers filter on its prefix.
    pub topic: String,
}

/// The storage tier the blocks live in (vLLM's `medium`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Medium {
    Cpu,
    Gpu,
}

impl Medium {
    fn as_str(self) -> &'static str {
        match self {
            Medium::Cpu => "CPU",
            Medium::Gpu => "GPU",
        }
    }
}

/// One numbered batch on its way to the socket.
struct Batch {
    seq: u64,
    ts: f64,
    events: Vec<KvCacheEvent>,
}

/// What engines publish their events through; cheap to clone.
#[derive(Clone)]
pub struct KvEventSink {
    queue: mpsc::Sender<Batch>,
    next_seq: Arc<AtomicU64>,
}

impl KvEventSink {
    /// Queues `events` as one batch, never blocking the engine.
    pub fn publish(&self, events: Vec<KvCacheEvent>) {
        if events.is_empty() {
            return;
        }
        // Numbered even if dropped below, so that subscribers can see the gap.
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let batch = Batch {
            seq,
            ts: unix_seconds(),
            events,
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = self.queue.try_send(batch) {
            tracing::warn!(seq, "KV events dropped: the publisher is behind");
        }
    }
}

/// Opens the PUB socket (binding now, so that a taken port fails the start) and starts
/// the task that sends what the sink queues; the task ends when every sink is dropped.
pub async fn start_publisher(
    config: &KvEventsConfig,
    medium: Medium,
) -> anyhow::Result<KvEventSink> {
    let mut socket = zeromq::PubSocket::new();
    let binds = binds(&config.endpoint);
    if binds {
        let bound = socket
            .bind(&bindable(&config.endpoint))
            .await
            .with_context(|| format!("binding the KV events socket to {}", config.endpoint))?;
        tracing::info!(endpoint = %bound, topic = %config.topic, "publishing KV cache events");
    }
    let (queue, mut batches) = mpsc::channel::<Batch>(QUEUE_BATCHES);
    let topic = config.topic.clone().into_bytes();
    let endpoint = config.endpoint.clone();
    tokio::spawn(async move {
        if !binds {
            // Waits for the subscriber; meanwhile batches queue, then drop.
            match socket.connect(&endpoint).await {
                Ok(()) => tracing::info!(%endpoint, "publishing KV cache events"),
                Err(error) => {
                    tracing::error!(%endpoint, %error, "cannot connect the KV events socket");
                    return;
                }
            }
        }
        while let Some(batch) = batches.recv().await {
            let mut message = ZmqMessage::from(topic.clone());
            message.push_back(batch.seq.to_be_bytes().to_vec().into());
            message.push_back(encode_batch(batch.ts, &batch.events, medium).into());
            if let Err(error) = socket.send(message).await {
                tracing::warn!(%error, seq = batch.seq, "sending KV events failed");
            }
        }
    });
    Ok(KvEventSink {
        queue,
        next_seq: Arc::new(AtomicU64::new(0)),
    })
}

/// vLLM's rule: bind where the endpoint has a wildcard host, connect anywhere else.
fn binds(endpoint: &str) -> bool {
    endpoint.contains('*') || endpoint.contains("::")
}

/// vLLM's default endpoint binds every interface as `tcp://*:PORT`; the socket library
/// wants an address there.
fn bindable(endpoint: &str) -> String {
    match endpoint.strip_prefix("tcp://*:") {
        Some(port) => format!("tcp://0.0.0.0:{port}"),
        None => endpoint.to_string(),
    }
}

fn unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One batch in MessagePack, as vLLM's `KVEventBatch` (see the module's documentation).
pub fn encode_batch(ts: f64, events: &[KvCacheEvent], medium: Medium) -> Vec<u8> {
    use rmp::encode;
    // Writing into a Vec cannot fail.
    fn array(out: &mut Vec<u8>, len: usize) {
        encode::write_array_len(out, len as u32).expect("writing to a Vec");
    }
    fn string(out: &mut Vec<u8>, text: &str) {
        encode::write_str(out, text).expect("writing to a Vec");
    }
    fn uint(out: &mut Vec<u8>, value: u64) {
        encode::write_uint(out, value).expect("writing to a Vec");
    }
    fn uints(out: &mut Vec<u8>, values: impl ExactSizeIterator<Item = u64>) {
        array(out, values.len());
        for value in values {
            uint(out, value);
        }
    }

    let mut out = Vec::with_capacity(64);
    array(&mut out, 2);
    encode::write_f64(&mut out, ts).expect("writing to a Vec");
    array(&mut out, events.len());
    for event in events {
        match event {
            KvCacheEvent::BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
            } => {
                array(&mut out, 7);
                string(&mut out, "BlockStored");
                uints(&mut out, block_hashes.iter().copied());
                match parent_block_hash {
                    Some(parent) => uint(&mut out, *parent),
                    None => encode::write_nil(&mut out).expect("writing to a Vec"),
                }
                uints(&mut out, token_ids.iter().map(|&t| u64::from(t)));
                uint(&mut out, *block_size as u64);
                encode::write_nil(&mut out).expect("writing to a Vec"); // lora_id
                string(&mut out, medium.as_str());
            }
            KvCacheEvent::BlockRemoved { block_hashes } => {
                array(&mut out, 3);
                string(&mut out, "BlockRemoved");
                uints(&mut out, block_hashes.iter().copied());
                string(&mut out, medium.as_str());
            }
            KvCacheEvent::AllBlocksCleared => {
                array(&mut out, 1);
                string(&mut out, "AllBlocksCleared");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_laid_out_as_vllm_lays_it_out() {
        let events = [
            KvCacheEvent::AllBlocksCleared,
            KvCacheEvent::BlockStored {
                block_hashes: vec![1, u64::MAX],
                parent_block_hash: None,
                token_ids: vec![7, 300],
                block_size: 1,
            },
            KvCacheEvent::BlockRemoved {
                block_hashes: vec![5],
            },
        ];
        let bytes = encode_batch(1.5, &events, Medium::Gpu);
        let mut expected = vec![0x92, 0xcb];
        expected.extend_from_slice(&1.5f64.to_be_bytes());
        expected.push(0x93); // three events
        expected.push(0x91);
        expected.push(0xb0); // a 16-byte string
        expected.extend_from_slice(b"AllBlocksCleared");
        expected.extend_from_slice(&[0x97, 0xab]);
        expected.extend_from_slice(b"BlockStored");
        expected.extend_from_slice(&[0x92, 0x01, 0xcf]);
        expected.extend_from_slice(&u64::MAX.to_be_bytes());
        expected.push(0xc0); // no parent
        expected.extend_from_slice(&[0x92, 0x07, 0xcd, 0x01, 0x2c]); // 7, 300
        expected.extend_from_slice(&[0x01, 0xc0, 0xa3]); // block size, no LoRA, "GPU"
        expected.extend_from_slice(b"GPU");
        expected.extend_from_slice(&[0x93, 0xac]);
        expected.extend_from_slice(b"BlockRemoved");
        expected.extend_from_slice(&[0x91, 0x05, 0xa3]);
        expected.extend_from_slice(b"GPU");
        assert_eq!(bytes, expected);
    }

    #[test]
    fn wildcards_bind_and_addresses_connect() {
        assert!(binds("tcp://*:5557"));
        assert!(binds("tcp://[::]:5557"));
        assert!(!binds("tcp://epp.default.svc:5557"));
        assert!(!binds("tcp://127.0.0.1:5557"));
    }

    #[test]
    fn every_interface_is_spelled_as_an_address() {
        assert_eq!(bindable("tcp://*:5557"), "tcp://0.0.0.0:5557");
        assert_eq!(bindable("tcp://127.0.0.1:0"), "tcp://127.0.0.1:0");
    }
}
