#!/usr/bin/env python3
"""Write a Llama GGUF with random f16 weights at a given shape, taking its tokenizer
(every `tokenizer.*` key: vocabulary, merges, special ids, chat template) from another
GGUF file, so that heddle and llama.cpp serve it exactly like a real model of that shape.

The vocabulary, and so the embedding's row count, is the tokenizer's: with the embedded
SmolLM2 tokenizer a "Llama-3.2-1B shape" model has 49,152 rows instead of 128,256 (the
other 1.0 B weights are the real shape's). Embeddings are tied, as in Llama-3.2-1B.

Weights are N(0, 0.02²) (the usual initialisation scale), norms 1: what matters for speed
is only the shapes and the quantization llama-quantize picks afterwards.

  python random_llama_gguf.py --tokenizer-from SmolLM2.gguf --out random-1b.f16.gguf
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np

# Llama-3.2-1B (config.json of meta-llama/Llama-3.2-1B, public facts).
LLAMA_3_2_1B = dict(layers=16, hidden=2048, ffn=8192, heads=32, kv_heads=8,
                    rope_theta=500000.0, rms_eps=1e-5, context=8192)


def copy_tokenizer(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> int:
    """Copies every tokenizer.* key; returns the vocabulary size."""
    n_vocab = 0
    for field in reader.fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        writer.add_key_value(field.name, value, vtype, sub_type=sub_type)
        if field.name == "tokenizer.ggml.tokens":
            n_vocab = len(value)
    if n_vocab == 0:
        raise SystemExit("the tokenizer source has no tokenizer.ggml.tokens")
    return n_vocab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer-from", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    shape = LLAMA_3_2_1B
    head_dim = shape["hidden"] // shape["heads"]

    reader = gguf.GGUFReader(args.tokenizer_from)
    writer = gguf.GGUFWriter(args.out, "llama")
    writer.add_name("random-llama-3.2-1b-shape")
    n_vocab = copy_tokenizer(reader, writer)
    writer.add_block_count(shape["layers"])
    writer.add_context_length(shape["context"])
    writer.add_embedding_length(shape["hidden"])
    writer.add_feed_forward_length(shape["ffn"])
    writer.add_head_count(shape["heads"])
    writer.add_head_count_kv(shape["kv_heads"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(shape["rope_theta"])
    writer.add_layer_norm_rms_eps(shape["rms_eps"])
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    rng = np.random.default_rng(args.seed)

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    hidden, ffn, kv = shape["hidden"], shape["ffn"], shape["kv_heads"] * head_dim
    ones = np.ones(hidden, dtype=np.float32)
    writer.add_tensor("token_embd.weight", matrix(n_vocab, hidden))
    for i in range(shape["layers"]):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", ones)
        writer.add_tensor(p + "attn_q.weight", matrix(hidden, hidden))
        writer.add_tensor(p + "attn_k.weight", matrix(kv, hidden))
        writer.add_tensor(p + "attn_v.weight", matrix(kv, hidden))
        writer.add_tensor(p + "attn_output.weight", matrix(hidden, hidden))
        writer.add_tensor(p + "ffn_norm.weight", ones)
        writer.add_tensor(p + "ffn_gate.weight", matrix(ffn, hidden))
        writer.add_tensor(p + "ffn_up.weight", matrix(ffn, hidden))
        writer.add_tensor(p + "ffn_down.weight", matrix(hidden, ffn))
    writer.add_tensor("output_norm.weight", ones)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main()
