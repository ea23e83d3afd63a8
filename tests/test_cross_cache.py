"""The cross-attention cache: ``qkv memory`` counts it exactly, the engine allocates what it
predicts, the scheduler charges encoder work to its token budget, and nothing leaks."""

from __future__ import annotations

import io
import re

import pytest
import torch

from qkv import LLM
from qkv.config import ModelConfig
from qkv.engine.request import SamplingParams
from qkv.tools.memory import engine_pools, footprint, pool_bytes, print_report, report

from tests.test_whisper_model import ENC, MELS, PROMPT, mel, tiny_whisper

pytestmark = pytest.mark.usefixtures("one_thread")

# Whisper base as its config.json has it (only the fields qkv reads).
WHISPER_BASE = dict(model_type="whisper", vocab_size=51865, num_mel_bins=80, encoder_layers=6,
                    encoder_attention_heads=8, decoder_layers=6, decoder_attention_heads=8, d_model=512,
                    encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_source_positions=1500, max_target_positions=448)


def test_whisper_base_cross_bytes_per_request():
    """6 decoder layers x K and V x 512 values x 4 bytes x 1500 positions, in whole blocks of 16
    (1504 slots): 36,962,304 B per request at fp32, whatever the decoder's length."""
    cfg = ModelConfig.from_hf(WHISPER_BASE)
    for context in (4, 448):
        f = footprint(cfg, context, batch=1, bits=32, block_size=16)
        cross = [g for g in f.groups if g.spec.kind == "cross"]
        assert len(cross) == 1 and cross[0].layers == list(range(6, 12))
        assert cross[0].blocks_per_sequence == 94
        assert cross[0].bytes_per_sequence == 6 * 2 * 512 * 4 * 1504 == 36_962_304
    assert f.bytes_per_token == 6 * 2 * 512 * 4  # decoder self-attention only
    text = io.StringIO()
    print_report(report("whisper-base", cfg, 448, 1, 32, 16), file=text)
    assert re.search(r"cross 8 kv heads x 64 encoder 1500\s+6\s+4,096\s+24,576\s+94\s+36,962,304 35.25 MiB",
                     text.getvalue()), text.getvalue()
    half = footprint(cfg, 448, batch=1, bits=16, block_size=16)
    assert [g for g in half.groups if g.spec.kind == "cross"][0].bytes_per_sequence == 36_962_304 // 2


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("whisper") / "tiny"
    tiny_whisper().save_pretrained(path)
    return str(path)


def test_engine_allocates_what_memory_predicts(tiny_dir):
    budget = 200_000
    llm = LLM(tiny_dir, device="cpu", block_size=4, kv_cache_memory=budget, max_num_seqs=8)
    cfg, eng = llm.config, llm.engine
    want = engine_pools(cfg, 32, 4, budget=budget, max_num_seqs=8)
    pools = [g.pool.num_blocks for g in eng.kv.groups]
    assert want["blocks"] == dict(zip(["full", "cross"], pools))
    assert eng.runner.kv_cache_bytes == want["bytes"] == pool_bytes(cfg, pools, 32, 4)
    assert want["bytes"] <= budget
    # Seats: each holds its 6 cross blocks and a 64-token decoder (16 blocks), as the split promises.
    assert pools[1] % 6 == 0 and pools[0] >= pools[1] // 6 * 16
    (req,) = eng.add_request(PROMPT, SamplingParams(max_tokens=3, ignore_eos=True), encoder_features=mel(0))
    for cached in (len(PROMPT), len(PROMPT) + 1):
        eng.step()
        pred = footprint(cfg, cached, batch=1, bits=32, block_size=4)
        assert [len(t) for t in eng.kv.block_tables(req.request_id)] == [g.blocks_per_sequence for g in pred.groups]
        assert eng.stats()["num_blocks_in_use"] == sum(g.blocks_per_sequence for g in pred.groups)
    while eng.has_unfinished():
        eng.step()
    s = eng.stats()
    assert s["num_blocks_free"] + s["num_blocks_cached"] == s["num_blocks_total"]
    assert eng.kv.groups[1].pool.num_free == pools[1]  # cross blocks are never kept for the prefix cache


def test_scheduler_charges_the_encoder_to_the_token_budget(tiny_dir):
    """Encoder 24 positions, prompts of 4. Budget 30: the first request's step costs 28, so the
    second waits for the next step (then 1 decode + 28 fit). Budget 60: both in one step. Budget
    8, below the encoder: one admission per step still runs (its encoder and one prompt token),
    beside what is running (here the first request's 3 remaining prompt tokens)."""
    for budget, first, second in ((30, [4], [1, 4]), (60, [4, 4], [1, 1]), (8, [1], [3, 1])):
        llm = LLM(tiny_dir, device="cpu", num_kv_blocks=64, max_num_batched_tokens=budget)
        eng = llm.engine
        for i in range(2):
            eng.add_request(PROMPT, SamplingParams(max_tokens=2, ignore_eos=True), encoder_features=mel(i))
        plan, steps = eng.scheduler.schedule, []
        eng.scheduler.schedule = lambda: (b := plan(), steps.append(b.num_new_tokens))[0]
        eng.step()
        eng.step()
        assert steps == [first, second], budget
        for r in list(eng._requests):
            eng.abort(r)
        s = eng.stats()
        assert s["num_blocks_free"] + s["num_blocks_cached"] == s["num_blocks_total"]


def test_parallel_samples_share_the_cross_blocks(tiny_dir):
    """n=3 samples of one audio: one encoder run, one set of cross blocks (forks take references),
    and seeded samples equal single requests with those seeds."""
    llm = LLM(tiny_dir, device="cpu", num_kv_blocks=64, block_size=4)
    p = {"encoder_features": mel(7), "prompt_token_ids": PROMPT}
    out = llm.generate(p, SamplingParams(n=3, max_tokens=5, seed=11, ignore_eos=True))[0]
    assert llm.engine.runner.encoder.num_encoded == 1
    singles = [llm.generate(p, SamplingParams(max_tokens=5, seed=11 + i, ignore_eos=True))[0].token_ids
               for i in range(3)]
    assert [s.token_ids for s in out.samples] == singles
    s = llm.stats()
    assert s["num_blocks_free"] + s["num_blocks_cached"] == s["num_blocks_total"]


def test_decoder_only_models_refuse_encoder_features(tiny_model):
    path, _ = tiny_model("llama")
    llm = LLM(path, device="cpu", num_kv_blocks=16)
    with pytest.raises(ValueError, match="has no encoder"):
        llm.generate({"encoder_features": torch.zeros(MELS, 2 * ENC), "prompt_token_ids": [3, 4]})


def test_cuda_is_accepted_with_float_pages():
    """The CUDA path exists (attention/triton/cross.py; tests/test_whisper_cuda.py runs it):
    float pages pass the device check on CUDA as on the CPU."""
    from qkv.engine.encoder import check_device

    config = ModelConfig.from_hf(WHISPER_BASE)
    for device in ("cpu", "cuda"):
        check_device(config, torch.device(device))


def test_packed_kv_is_refused_by_name(tiny_dir):
    """int8/int4 pages: the cross-attention path does not read them, so the engine refuses at
    construction (it used to fail mid-request with an IndexError)."""
    for kv in ("int8", "int4,int8"):
        with pytest.raises(ValueError, match="cross-attention cache does not read int8/int4"):
            LLM(str(tiny_dir), device="cpu", num_kv_blocks=64, kv_dtype=kv)


@pytest.mark.parametrize("head_major", [False, True])
@pytest.mark.parametrize("kvh", [2, 4])
def test_cross_attention_reads_runs_and_scattered_pages_alike(kvh, head_major, monkeypatch):
    """The CPU cross attention against a per-query softmax written here: one sequence whose
    cross blocks are a consecutive run (read as a view), one scattered (gathered), one with a
    partial last block; decode and prefill rows mixed; GQA (2 query heads per KV head, torch's
    fused attention) and MHA (a decode row takes the streamed path, cross._one_query; with
    the engine's head-major CPU pages and numpy's BLAS on, cross._one_query_blas)."""
    from qkv.attention import cross
    from qkv.attention.batch import AttentionBatch
    from qkv.attention.cross import cross_attention

    g = torch.Generator().manual_seed(0)
    bs, H, D = 4, 4, 8
    G = H // kvh
    cache = torch.randn(2, 16, bs, kvh, D, generator=g)
    if head_major:  # same values, cross.new_cache's strides; the BLAS path on
        cache = cache.permute(0, 3, 1, 2, 4).contiguous().permute(0, 2, 3, 1, 4)
        monkeypatch.setattr(cross.cpu_gemv, "_threads", [1])
        blas = []
        one = cross._one_query_blas
        monkeypatch.setattr(cross, "_one_query_blas", lambda *a: blas.append(1) or one(*a))
    tables = [[3, 4, 5], [9, 1, 14], [7, 8]]  # a run, scattered, a run
    lens, qlens = [12, 10, 5], [1, 3, 2]
    width = max(map(len, tables))
    batch = AttentionBatch(query_start_loc=torch.tensor([0, 1, 4, 6]), num_computed=torch.zeros(3, dtype=torch.long),
                           query_lens=torch.tensor(qlens), max_query_len=3, max_seq_len=3, block_size=bs,
                           block_tables=[torch.tensor([t + [0] * (width - len(t)) for t in tables])],
                           slot_mappings=[], ring_blocks=[None], encoder_lens=torch.tensor(lens))
    q = torch.randn(6, H, D, generator=g)
    out = cross_attention(q, cache, batch, 0, 0.3)
    row = 0
    for table, n_k, n_q in zip(tables, lens, qlens):
        slots = [table[p // bs] * bs + p % bs for p in range(n_k)]
        k = cache[0].reshape(-1, kvh, D)[slots]
        v = cache[1].reshape(-1, kvh, D)[slots]
        for t in range(row, row + n_q):
            for h in range(H):
                p = torch.softmax(k[:, h // G] @ q[t, h] * 0.3, dim=0)
                assert torch.allclose(out[t, h], p @ v[:, h // G], atol=1e-5)
        row += n_q
    if head_major:
        assert blas == ([1] if kvh == H else [])  # the MHA decode row over a run of pages
