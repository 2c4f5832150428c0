#!/usr/bin/env python3
"""Produce llama.cpp reference outputs for heddle's tests.

Runs the embedded model (SmolLM2-135M-Instruct, GGUF Q4_1) under llama.cpp, through
llama-cpp-python, and writes crates/heddle-model/tests/data/llamacpp_reference.json:

  * for a set of chat conversations: the prompt rendered with the GGUF's own chat
    template, its token ids, 32 greedily generated ids (pure argmax over raw logits,
    continuing past end-of-generation tokens), and for every position of
    prompt + generated the top-10 log-probabilities, the log-probability of the next
    token in the sequence, the max logit and the logsumexp of the logits;
  * llama.cpp's tokenization of a set of plain strings;
  * the GGUF's tokenizer facts (pre-tokenizer, special ids, chat template);
  * per case, the same again ("f64": greedy ids, positions) from an exact float64
    forward pass over the dequantized GGUF weights written here in numpy. llama.cpp
    quantizes activations to 8 bits inside its quantized matmuls and keeps K/V in f16,
    and this small model amplifies such rounding: its log-probabilities sit ~0.1 nats
    (up to ~0.5 among the top 10) from the exact values, and different llama.cpp
    settings (batch vs one-token decode, flash attention, f32 KV) disagree with one
    another by as much. An f32 implementation that dequantizes weights lands within
    ~1e-4 of the f64 numbers, so they are the tight target; llama.cpp the loose one.

Usage (after scripts/reference/setup-llama-cpp.sh and scripts/fetch-model.sh):

  .venv-ref/bin/python scripts/reference/make_reference.py [--model PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import gguf
import jinja2
import jinja2.sandbox
import numpy as np

import llama_cpp

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = REPO_ROOT / "crates/heddle-model/tests/data/llamacpp_reference.json"
N_GENERATE = 32
TOP_K = 10
SEED = 1234
DECIMALS = 5

LONG_TEXT = (
    "The Great Barrier Reef, off the coast of Queensland in Australia, is the largest "
    "coral reef system in the world. It is made of nearly three thousand individual "
    "reefs and about nine hundred islands stretched over some 2,300 kilometres. The "
    "reef can be seen from outer space and is built by billions of tiny organisms "
    "known as coral polyps. It supports a wide diversity of life, including many "
    "vulnerable or endangered species, and was selected as a World Heritage Site in "
    "1981. Rising sea temperatures have caused several mass bleaching events, and "
    "scientists warn that the reef's future depends on how quickly global emissions "
    "fall."
)

CASES = [
    ("system_user", [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]),
    ("user_only", [
        {"role": "user", "content": "Write a haiku about the ocean."},
    ]),
    ("multi_turn", [
        {"role": "system", "content": "You are a friendly assistant."},
        {"role": "user", "content": "Hi! My name is Ada."},
        {"role": "assistant", "content": "Hello Ada! How can I help you today?"},
        {"role": "user", "content": "What is my name, and how many letters does it have?"},
    ]),
    ("code", [
        {"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."},
    ]),
    ("code_review_tabs", [
        {"role": "system", "content": "You are a careful C code reviewer."},
        {"role": "user", "content": (
            "Find the bug:\n```c\nint sum(int *a, int n) {\n\tint s = 0;\n"
            "\tfor (int i = 0; i <= n; i++)\n\t\ts += a[i];\n\treturn s;\n}\n```"
        )},
    ]),
    ("french_accents_emoji", [
        {"role": "user", "content": (
            "Explique-moi pourquoi le ciel est bleu, s'il te plaît. 🌤️ "
            "Ça m'intéresse beaucoup ! Merci 😊"
        )},
    ]),
    ("japanese", [
        {"role": "user", "content": "日本の首都はどこですか？簡単に答えてください。"},
    ]),
    ("numbers", [
        {"role": "user", "content": (
            "What is 1234 + 5678? Also, 3.14159 × 2 = ? List the primes below 30: "
            "2, 3, 5, 7, ..."
        )},
    ]),
    ("very_short", [
        {"role": "user", "content": "Hi"},
    ]),
    ("long_summary", [
        {"role": "system", "content": "You summarize texts in one sentence."},
        {"role": "user", "content": "Summarize this:\n\n" + LONG_TEXT},
    ]),
    ("json_output", [
        {"role": "user", "content": (
            'Return only a JSON object with keys "name" and "age" for a 30 year old '
            "named Bob."
        )},
    ]),
    ("whitespace_edges", [
        {"role": "user", "content": "   Leading spaces,  double  spaces and a trailing newline\n"},
    ]),
]

TOKENIZATION_STRINGS = [
    "Hello world",
    "Hello, world! How are you?",
    "Héllo wörld, ça va? naïve café Zürich",
    "I ❤️ Rust 🦀🚀 — “quotes” and ‘apostrophes’",
    "12345 67.89",
    "3.14159 1000000 123456789012 0x1F -42 1,234,567",
    "   leading spaces",
    "trailing spaces   ",
    " a  b   c    d",
    "line one\nline two\n\n\nline four\r\nend\n",
    "def f(x):\n\treturn x * 2\n\n\tif x:\n\t\tpass  # tab\tinside",
    "don't won't it's I'm we'll they've she'd DON'T",
    "日本語のテキストです。",
    "Привет, мир! Ελληνικά",
    "HTTP/1.1 200 OK\r\nContent-Length: 42",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after<|im_end|>",
    "",
    " ",
    "\n",
]


def log(*a):
    print("[make_reference]", *a, file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_model_path() -> Path:
    base = os.environ.get("HEDDLE_MODEL_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "heddle", "models")
    return Path(base) / MODEL_FILE


def r(x: float) -> float:
    return round(float(x), DECIMALS)


def render_template(template: str, messages, bos: str, eos: str) -> str:
    """Render like transformers' apply_chat_template does (sandboxed, trim/lstrip blocks)."""

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    out = env.from_string(template).render(
        messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos)
    # The same template under jinja's defaults must give the same text; if it did not,
    # the whitespace-control flags would matter and the choice would need recording.
    plain = jinja2.Environment().from_string(template).render(
        messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos,
        raise_exception=raise_exception)
    assert plain == out, "template output depends on trim_blocks/lstrip_blocks"
    return out


def native_template(model, messages) -> str | None:
    """llama.cpp's own (C++) rendering of the model's template, for comparison."""
    arr = (llama_cpp.llama_chat_message * len(messages))()
    keep = []
    for i, m in enumerate(messages):
        role, content = m["role"].encode(), m["content"].encode()
        keep += [role, content]
        arr[i].role, arr[i].content = role, content
    tmpl = llama_cpp.llama_model_chat_template(model, None)
    if not tmpl:
        return None
    size = 1 << 16
    buf = (llama_cpp.ctypes.c_char * size)()
    n = llama_cpp.llama_chat_apply_template(tmpl, arr, len(messages), True, buf, size)
    if n < 0:
        return None
    return bytes(buf[:n]).decode("utf-8")


def log_softmax_rows(logits: np.ndarray):
    x = logits.astype(np.float64)
    mx = x.max(axis=-1, keepdims=True)
    lse = mx + np.log(np.exp(x - mx).sum(axis=-1, keepdims=True))
    return x - lse, lse[..., 0], mx[..., 0]


def position_records(logits: np.ndarray, seq: list[int]):
    lp, lse, mx = log_softmax_rows(logits)
    out = []
    for i in range(len(seq)):
        row = lp[i]
        # sort by logit descending, ties by lower id (stable sort of -logit)
        top = np.argsort(-logits[i], kind="stable")[:TOP_K]
        out.append({
            "top": [[int(t), r(row[t])] for t in top],
            "next_logprob": r(row[seq[i + 1]]) if i + 1 < len(seq) else None,
            "logsumexp": r(lse[i]),
            "max_logit": r(mx[i]),
        })
    return out, lp


class ExactModel:
    """Float64 Llama forward pass over the GGUF's dequantized weights (numpy, KV cache).

    Follows llama.cpp's "llama" architecture: RMSNorm, RoPE on adjacent pairs (the GGUF
    converter permutes Q/K rows for that), grouped-query attention, SwiGLU MLP, output
    projection tied to token_embd when the file has no output.weight.
    """

    def __init__(self, path: Path):
        rd = gguf.GGUFReader(str(path))
        f = lambda k: rd.fields[k].contents()
        self.n_layer = int(f("llama.block_count"))
        self.n_embd = int(f("llama.embedding_length"))
        self.n_head = int(f("llama.attention.head_count"))
        self.n_head_kv = int(f("llama.attention.head_count_kv"))
        self.eps = float(f("llama.attention.layer_norm_rms_epsilon"))
        self.rope_base = float(f("llama.rope.freq_base"))
        self.head_dim = self.n_embd // self.n_head
        self.w = {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64)
                  for t in rd.tensors}
        self.out_w = self.w.get("output.weight", self.w["token_embd.weight"])
        self.reset()

    def reset(self):
        self.cache = [(np.zeros((0, self.n_head_kv, self.head_dim)),) * 2
                      for _ in range(self.n_layer)]
        self.n_past = 0

    def _rms(self, x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w

    def _rope(self, v, pos):
        half = np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim
        ang = pos[:, None] * self.rope_base ** -half[None, :]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        a, b = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
        return out

    def eval(self, tokens) -> np.ndarray:
        """Appends tokens to the cache; returns the logits after each of them."""
        w, hd, nh, nkv = self.w, self.head_dim, self.n_head, self.n_head_kv
        t = len(tokens)
        pos = np.arange(self.n_past, self.n_past + t, dtype=np.float64)
        n_all = self.n_past + t
        # causal mask: new token i (absolute position n_past+i) sees positions <= itself
        mask = np.where(np.arange(n_all)[None, :] > pos[:, None], -np.inf, 0.0)
        x = w["token_embd.weight"][tokens]
        for l in range(self.n_layer):
            p = f"blk.{l}."
            h = self._rms(x, w[p + "attn_norm.weight"])
            q = self._rope((h @ w[p + "attn_q.weight"].T).reshape(t, nh, hd), pos)
            k = self._rope((h @ w[p + "attn_k.weight"].T).reshape(t, nkv, hd), pos)
            v = (h @ w[p + "attn_v.weight"].T).reshape(t, nkv, hd)
            k_all = np.concatenate([self.cache[l][0], k])
            v_all = np.concatenate([self.cache[l][1], v])
            self.cache[l] = (k_all, v_all)
            rep = nh // nkv
            kk, vv = np.repeat(k_all, rep, axis=1), np.repeat(v_all, rep, axis=1)
            att = np.einsum("thd,shd->hts", q, kk) / np.sqrt(hd) + mask
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            o = np.einsum("hts,shd->thd", att, vv).reshape(t, self.n_embd)
            x = x + o @ w[p + "attn_output.weight"].T
            h = self._rms(x, w[p + "ffn_norm.weight"])
            g = h @ w[p + "ffn_gate.weight"].T
            x = x + ((g / (1.0 + np.exp(-g))) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
        self.n_past = n_all
        return self._rms(x, w["output_norm.weight"]) @ self.out_w.T


def exact_case(exact: ExactModel, llm, prompt_ids, llama_greedy, eog_ids, llama_logits, name):
    exact.reset()
    rows = [exact.eval(prompt_ids)]
    greedy = []
    for _ in range(N_GENERATE):
        tok = int(np.argmax(rows[-1][-1]))
        greedy.append(tok)
        rows.append(exact.eval([tok]))
    logits = np.concatenate(rows)
    seq = prompt_ids + greedy
    positions, lp = position_records(logits, seq)
    # How far llama.cpp's batch logprobs are from exact, over the exact top-10, prompt part.
    n = len(prompt_ids)
    llama_lp, _, _ = log_softmax_rows(llama_logits[:n])
    top = np.argsort(-lp[:n], axis=-1)[:, :TOP_K]
    d = np.abs(np.take_along_axis(llama_lp - lp[:n], top, -1))
    diverge = next((i for i, (a, b) in enumerate(zip(greedy, llama_greedy)) if a != b), None)
    text = llm.detokenize(greedy, special=True).decode("utf-8", "replace")
    log(f"  f64 {name}: llama.cpp vs f64 over prompt top-10 |dlogprob| mean {d.mean():.3f} "
        f"max {d.max():.3f}; greedy differs from llama.cpp's from {diverge}; -> {text!r}")
    return {
        "greedy_ids": greedy,
        "greedy_text": llm.detokenize(greedy).decode("utf-8", "replace"),
        "eos_positions": [i for i, t in enumerate(greedy) if t in eog_ids],
        "first_divergence_from_llamacpp_greedy": diverge,
        "llamacpp_prompt_top10_abs_logprob_diff": {"mean": r(d.mean()), "max": r(d.max())},
        "positions": positions,
    }


def dump(obj, depth=0) -> str:
    """JSON with one line per position / message / scalar list, so the file stays small
    and its diffs readable."""
    compact = dict(ensure_ascii=False, separators=(",", ":"))
    leaf = lambda v: not isinstance(v, (dict, list))
    if (leaf(obj) or (isinstance(obj, dict) and ("top" in obj or all(map(leaf, obj.values()))))
            or (isinstance(obj, list) and all(map(leaf, obj)))):
        return json.dumps(obj, **compact)
    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(obj, dict):
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {dump(v, depth + 1)}"
                 for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    items = [inner + dump(v, depth + 1) for v in obj]
    return "[\n" + ",\n".join(items) + "\n" + pad + "]"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=default_model_path())
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    if not args.model.is_file():
        sys.exit(f"model not found at {args.model}: run scripts/fetch-model.sh")
    t0 = time.time()
    llm = llama_cpp.Llama(
        model_path=str(args.model), n_ctx=1024, n_batch=1024, n_ubatch=1024,
        logits_all=True, seed=SEED, n_threads=2, n_threads_batch=2, verbose=False)
    model = llm._model
    vocab = model.vocab
    meta = llm.metadata
    n_vocab = llm.n_vocab()

    template = meta["tokenizer.chat_template"]
    bos_id, eos_id, eot_id = model.token_bos(), model.token_eos(), model.token_eot()
    add_bos = bool(model.add_bos_token())
    piece = lambda t: llama_cpp.llama_vocab_get_text(vocab, t).decode("utf-8", "replace")
    eog_ids = [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    special = []
    for t in range(n_vocab):
        attr = llama_cpp.llama_vocab_get_attr(vocab, t)
        if attr & (llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED):
            kind = "control" if attr & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL else "user_defined"
            special.append([t, piece(t), kind])
    bos_text = piece(bos_id) if bos_id >= 0 else ""
    eos_text = piece(eos_id) if eos_id >= 0 else ""
    log(f"loaded in {time.time() - t0:.1f}s: n_vocab={n_vocab} bos={bos_id} eos={eos_id} "
        f"eot={eot_id} add_bos={add_bos} eog={eog_ids} pre={meta.get('tokenizer.ggml.pre')}")

    gguf = {
        "general.architecture": meta.get("general.architecture"),
        "general.name": meta.get("general.name"),
        "tokenizer.ggml.model": meta.get("tokenizer.ggml.model"),
        "tokenizer.ggml.pre": meta.get("tokenizer.ggml.pre"),
        "n_vocab": n_vocab,
        "bos_token_id": bos_id, "bos_token": bos_text,
        "eos_token_id": eos_id, "eos_token": eos_text,
        "eot_token_id": eot_id,
        "eog_token_ids": eog_ids,
        "add_bos_token": add_bos,
        "add_eos_token": bool(model.add_eos_token()),
        "special_tokens": special,
        "chat_template": template,
        # every raw tokenizer.* / general.* string key llama.cpp exposes (arrays excluded)
        "metadata": {k: v for k, v in sorted(meta.items())
                     if k.startswith(("tokenizer.ggml.", "general.", "llama."))
                     and k != "tokenizer.chat_template"},
    }

    log("dequantizing weights for the float64 reference")
    exact = ExactModel(args.model)

    cases = []
    for name, messages in CASES:
        rendered = render_template(template, messages, bos_text, eos_text)
        native = native_template(model.model, messages)
        prompt_ids = llm.tokenize(rendered.encode("utf-8"), add_bos=True, special=True)

        # Greedy generation: pure argmax over the raw logits, one token at a time.
        llm.reset()
        llm.eval(prompt_ids)
        greedy = []
        for _ in range(N_GENERATE):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            greedy.append(tok)
            llm.eval([tok])
        incremental = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)

        # Teacher forcing: the whole sequence in one batch, logits after every token.
        seq = prompt_ids + greedy
        llm.reset()
        llm.eval(seq)
        logits = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
        positions, lp = position_records(logits, seq)

        tf_argmax = logits[len(prompt_ids) - 1: -1].argmax(axis=-1).tolist()
        agree = tf_argmax == greedy
        inc_lp, _, _ = log_softmax_rows(incremental)
        top10 = np.argsort(-lp, axis=-1)[:, :TOP_K]
        drift = float(np.abs(np.take_along_axis(inc_lp - lp, top10, -1)).max())
        eos_pos = [i for i, t in enumerate(greedy) if t in eog_ids]
        text = llm.detokenize(greedy).decode("utf-8", "replace")
        text_special = llm.detokenize(greedy, special=True).decode("utf-8", "replace")
        log(f"{name}: {len(prompt_ids)} prompt ids, eog at {eos_pos}, batch-vs-incremental "
            f"top-10 max |dlogprob|={drift:.2e}, argmax agree={agree}\n    -> {text_special!r}")
        cases.append({
            "name": name,
            "messages": messages,
            "rendered": rendered,
            "llamacpp_native_template_matches": native == rendered,
            "prompt_ids": prompt_ids,
            "greedy_ids": greedy,
            "greedy_text": text,
            "greedy_text_special": text_special,
            "eos_positions": eos_pos,
            "teacher_forced_argmax_matches_greedy": agree,
            "incremental_vs_batch_top10_max_abs_logprob_diff": float(f"{drift:.3g}"),
            "positions": positions,
            "f64": exact_case(exact, llm, prompt_ids, greedy, eog_ids, logits, name),
        })

    tokenization = []
    for s in TOKENIZATION_STRINGS:
        b = s.encode("utf-8")
        plain = llm.tokenize(b, add_bos=False, special=False)
        spec = llm.tokenize(b, add_bos=False, special=True)
        tokenization.append({
            "text": s,
            "special_false": plain,
            "special_true": spec,
            "pieces_special_false": [piece(t) for t in plain],
            "roundtrip_ok": llm.detokenize(plain).decode("utf-8", "replace") == s,
        })

    doc = {
        "model_file": MODEL_FILE,
        "model_sha256": sha256_file(args.model),
        "llama_cpp_python_version": llama_cpp.__version__,
        "generator": "scripts/reference/make_reference.py",
        "settings": {
            "n_generate": N_GENERATE, "top_k": TOP_K, "decimals": DECIMALS, "seed": SEED,
            "n_threads": 2, "greedy": "argmax of raw logits, incremental decode, ties -> lowest id",
            "positions": "teacher-forced, one batch over prompt_ids+greedy_ids; entry i = "
                         "distribution after token i; logit = logprob + logsumexp",
            "prompt_tokenize": "special=True, add_special=True (model decides BOS)",
            "f64": "per case: greedy + positions (same schema) from an exact float64 forward "
                   "over the dequantized weights (ExactModel in the generator)",
            "template_render": "jinja2 ImmutableSandboxedEnvironment(trim_blocks, lstrip_blocks), "
                               "add_generation_prompt=True",
        },
        "gguf": gguf,
        "cases": cases,
        "tokenization": tokenization,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dump(doc) + "\n", encoding="utf-8")
    log(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
