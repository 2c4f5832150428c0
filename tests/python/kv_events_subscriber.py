"""Reads heddle's KV-cache events as a consumer of vLLM's reads vLLM's: a ZeroMQ SUB socket
(pyzmq, i.e. libzmq) and msgspec structs laid out as vLLM lays out its KVEventBatch.
Prints one JSON line per event (with the message's topic and sequence number), after a
line `subscribed`; stops after the number of seconds given. `connect` dials a publisher
that binds (Dynamo's relay does so); `bind` waits for publishers to connect (llm-d's
endpoint picker does so).

Usage: kv_events_subscriber.py connect|bind ENDPOINT TOPIC SECONDS
"""

import json
import sys
import time

import msgspec
import zmq


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


def main() -> None:
    mode, endpoint, topic, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    decoder = msgspec.msgpack.Decoder(KVEventBatch)
    socket = zmq.Context().socket(zmq.SUB)
    if mode == "bind":
        socket.bind(endpoint)
    else:
        socket.connect(endpoint)
    socket.setsockopt_string(zmq.SUBSCRIBE, topic)
    print("subscribed", flush=True)
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if not socket.poll(timeout=int(left * 1000) + 1):
            continue
        frames = socket.recv_multipart()
        if len(frames) != 3:
            raise SystemExit(f"expected topic, sequence and payload, got {len(frames)} frames")
        message_topic, seq, payload = frames
        batch = decoder.decode(payload)
        for event in batch.events:
            line = {
                "topic": message_topic.decode(),
                "seq": int.from_bytes(seq, "big"),
                "ts": batch.ts,
                "type": type(event).__name__,
                **msgspec.structs.asdict(event),
            }
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
