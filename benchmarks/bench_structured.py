"""Structured outputs on SmolLM2's vocabulary (49,152 tokens), CPU, one thread.

llguidance (qkv's choice) against xgrammar (vLLM's default; optional here: measured when
importable, e.g. ``pip install --no-deps --target /tmp/xgr xgrammar apache-tvm-ffi`` and
``PYTHONPATH=/tmp/xgr``): the tokenizer index, compiling one JSON schema, and the mask of
every token of one valid answer; then qkv's ``apply_masks`` per step for 1, 8 and 32 rows.

    PYTHONPATH=. python benchmarks/bench_structured.py
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from qkv.engine.request import Request, SamplingParams
from qkv.engine.structured import JSON_OPTIONS, GrammarCache, StructuredOutputs, apply_masks
from qkv.loading.gguf import gguf_tokenizer, read_gguf
from qkv.loading.models import smollm2

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
          "tags": {"type": "array", "items": {"type": "string"}}, "ok": {"type": "boolean"}},
          "required": ["name", "age", "tags", "ok"], "additionalProperties": False}
ANSWER = {"name": "Ada Lovelace", "age": 36, "tags": ["math", "engine"], "ok": True}


def best(f, n=3):
    ts, r = [], None
    for _ in range(n):
        t = time.perf_counter()
        r = f()
        ts.append(time.perf_counter() - t)
    return min(ts), r


def llguidance_run(tok, V, eos):
    import llguidance as llg

    t_tok, lt = best(lambda: llg.LLTokenizer(tok.backend.to_str(), n_vocab=V, eos_token=eos))

    def compile_():
        return llg.LLMatcher(lt, llg.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=JSON_OPTIONS))

    t_comp, _ = best(compile_)
    m = compile_()
    ids = tok.encode(json.dumps(ANSWER), add_special_tokens=False)
    mask, ts = np.zeros((V + 31) // 32, np.int32), []
    for t in ids:
        s = time.perf_counter()
        m.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        ts.append(time.perf_counter() - s)
        assert (mask[t // 32] >> (t % 32)) & 1 and m.consume_token(t)
    return "llguidance", t_tok, t_comp, ts


def xgrammar_run(tok, V, eos):
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok.backend)
    t_tok, info = best(lambda: xgr.TokenizerInfo.from_huggingface(hf, vocab_size=V, stop_token_ids=eos))
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    t_comp, cg = best(lambda: compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False))
    m, mask, ts = xgr.GrammarMatcher(cg), xgr.allocate_token_bitmask(1, V), []
    for t in tok.encode(json.dumps(ANSWER), add_special_tokens=False):
        s = time.perf_counter()
        m.fill_next_token_bitmask(mask)
        ts.append(time.perf_counter() - s)
        assert (int(mask[0, t // 32]) >> (t % 32)) & 1 and m.accept_token(t)
    return "xgrammar", t_tok, t_comp, ts


def main():
    torch.set_num_threads(1)
    tok = gguf_tokenizer(read_gguf(str(smollm2()))[0])
    V, eos = tok.vocab_size, tok.eos_token_ids
    for run in (llguidance_run, xgrammar_run):
        try:
            name, t_tok, t_comp, ts = run(tok, V, eos)
        except ImportError as e:
            print(f"{run.__name__}: skipped ({e})")
            continue
        print(f"{name}: tokenizer index {t_tok * 1e3:.0f} ms, compile {t_comp * 1e3:.1f} ms, mask median "
              f"{np.median(ts) * 1e6:.0f} us, mean "
              f"{np.mean(ts) * 1e6:.0f} us, max {np.max(ts) * 1e6:.0f} us over {len(ts)} tokens")
    cache = GrammarCache(tok, V, eos)
    so = StructuredOutputs(json=SCHEMA)
    prefix = tok.encode('{"name": "Ad', add_special_tokens=False)  # inside a string: the widest mask
    for n in (1, 8, 32):
        reqs = []
        for _ in range(n):
            r = Request([1], SamplingParams())
            r.structured = cache.matcher(so)
            assert r.structured.matcher.consume_tokens(prefix)
            reqs.append(r)
        logits = torch.randn(n, V)
        ts = sorted(best(lambda: apply_masks(logits, reqs, cache), 1)[0] for _ in range(21))
        print(f"apply_masks, {n} structured rows: median {ts[10] * 1e3:.2f} ms, min {ts[0] * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
