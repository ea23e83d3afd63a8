"""The CPU KV pool's memory is reserved, not resident, until written (issue 19: memory).

(1) the pool reads as zeros, as ``torch.zeros`` did, and keeps what is written; (2) its
pages cost resident memory only once written (Linux: RssAnon of /proc/self/status); (3) an
engine over it gives the same tokens and logprobs as one over the old ``torch.zeros`` pool,
with float and packed int8 pages."""

from __future__ import annotations

import sys

import pytest
import torch

from qkv.engine.engine import LLMEngine
from qkv.engine.request import SamplingParams
from qkv.kvcache import zero_pages
from qkv.loading import load

pytestmark = pytest.mark.usefixtures("one_thread")
MiB = 1 << 20


def rss_anon() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.uint8])
def test_reads_zeros_and_keeps_writes(dtype):
    t = zero_pages.zeros((64, 2, 16, 4, 64), dtype, "cpu")  # 4 MiB of fp32: mapped
    assert t.shape == (64, 2, 16, 4, 64) and t.dtype == dtype and t.is_contiguous()
    assert not t.float().any()
    t[3, 1] = 2
    assert (t[3, 1].float() == 2).all() and t.float().sum() == 2 * 16 * 4 * 64
    small = zero_pages.zeros((2, 3), dtype, "cpu")  # below MIN_MAPPED_BYTES: torch.zeros
    assert small.shape == (2, 3) and not small.float().any()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_pages_are_resident_only_once_written():
    before = rss_anon()
    t = zero_pages.zeros((256, MiB), torch.uint8, "cpu")  # 256 MiB reserved
    reserved = rss_anon() - before
    assert reserved < 16 * MiB, f"{reserved / MiB:.0f} MiB resident for an untouched 256 MiB pool"
    t[:8] = 1  # 8 blocks of 1 MiB written
    written = rss_anon() - before
    assert 8 * MiB <= written < 8 * MiB + 16 * MiB
    del t


def greedy(eng: LLMEngine):
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2)
    reqs = [r for p in ([5, 9, 2, 33, 7] * 7, [11, 12, 13], [40] * 20) for r in eng.add_request(p, params)]
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] = o
    return [(r.output_token_ids, [[(k, v.logprob) for k, v in sorted(lp.items())] for lp in outs[r.request_id].logprobs])
            for r in reqs]


@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_engine_matches_the_zeroed_pool(tiny_model, monkeypatch, kv_dtype):
    loaded = load(tiny_model("llama")[0])
    kw = dict(dtype="float32", num_kv_blocks=4096, max_num_seqs=4, block_size=16, kv_dtype=kv_dtype)
    mapped = LLMEngine(loaded.config, loaded.weights, None, **kw)
    assert all(not t.is_pinned() and t.untyped_storage().nbytes() >= MiB for t in mapped.runner.kv_caches)
    monkeypatch.setattr(zero_pages, "zeros", lambda shape, dtype, device: torch.zeros(shape, dtype=dtype, device=device))
    zeroed = LLMEngine(loaded.config, loaded.weights, None, **kw)
    assert greedy(mapped) == greedy(zeroed)
