"""Start-up warm-up up to the token budget (issue 23: the first load after start-up at 8192
tokens a step). ``warm_kernels`` runs dummy steps of ``budget_lengths`` tokens shaped like a
loaded server's mixed steps; here on the CPU (reference attention) the steps it runs are
recorded, and they must write nothing. The MoE check needs triton (its tile rule)."""

from __future__ import annotations

import pytest
import torch

from qkv.engine import gpu
from qkv.engine.request import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("budget", [1, 2, 100, 383, 512, 2048, 3000, 8192, 16384])
def test_budget_lengths_climb_to_the_budget(budget):
    lens = gpu.budget_lengths(budget)
    assert lens == sorted(set(lens)) and lens[-1] == budget and lens[0] >= 1
    assert budget < 2 or lens[-2] == budget - 1  # the budget's other divisibility class
    # No gap wider than 1.5x above 512: cuBLAS's choice of kernel moves with M.
    assert all(b <= 1.51 * a for a, b in zip(lens, lens[1:]) if a >= 512)


def test_budget_lengths_at_8192():
    assert gpu.budget_lengths(8192) == [383, 512, 767, 1024, 1535, 2048, 3071, 4096, 6143, 8191, 8192]


def test_moe_tile_variants_up_to_the_budget_are_warmed():
    """Every fused-MoE launch key a step of 257..budget tokens can have (tile band, BLOCK_M,
    the pair count's divisibility by 16, the sort's chunk) is one a warm-up step of
    ``budget_lengths`` (or the 250/256-token steps) has, for top-k 1-8 and 8-160 experts."""
    pytest.importorskip("triton")
    from qkv.attention.triton import moe

    def key(tokens, k, experts):
        n = tokens * k
        e_p2 = 1 << (experts - 1).bit_length()
        chunk = None if n > 4096 else max(16, min(256, 16384 // e_p2, 1 << (n - 1).bit_length()))
        return tuple(sorted(moe._config(n).items())), moe._block_m(n), n % 16 == 0, chunk

    for budget in (2048, 3000, 8192):
        warm_counts = set(gpu.budget_lengths(budget)) | {gpu.WARM_MID, gpu.WARM_MID - 6}
        for k in (1, 2, 6, 8):
            for experts in (8, 64, 160):
                warm = {key(t, k, experts) for t in warm_counts}
                seen = {key(t, k, experts) for t in range(gpu.WARM_MID + 1, budget + 1)}
                assert seen <= warm, (budget, k, experts, sorted(seen - warm, key=str))


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from conftest import tiny_config
    from qkv.engine.engine import LLMEngine
    from qkv.loading import load

    cfg, cls = tiny_config("llama")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("warm") / "llama"
    cls(cfg).eval().save_pretrained(path)
    loaded = load(str(path))
    return LLMEngine(loaded.config, loaded.weights, None, dtype="float32", device="cpu", num_kv_blocks=64,
                     block_size=16, max_num_seqs=8, max_num_batched_tokens=600, max_model_len=256,
                     log_stats=False)


def _run(eng) -> list[list[int]]:
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    gen = torch.Generator().manual_seed(5)
    ids = [eng.add_request(torch.randint(2, 250, (n,), generator=gen).tolist(), params)[0].request_id
           for n in (200, 7, 90)]
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = list(out.token_ids)
    return [done[i] for i in ids]


def test_warm_up_steps_reach_the_budget_and_write_nothing(engine, monkeypatch):
    """The steps run are the budget's counts, each with decodes beside a prefill cut at
    max_model_len, logits for every sequence; no KV block a request can hold changes, and a
    run after the warm-up gives the tokens of a run before it."""
    before_tokens = _run(engine)
    caches = [c.clone() for c in engine.runner.kv_caches]
    steps = []
    forward = engine.model.forward

    def record(ids, positions, batch):
        lens = batch.query_lens.tolist()
        steps.append((len(ids), lens, batch.logits_indices.numel()))
        return forward(ids, positions, batch)

    monkeypatch.setattr(engine.model, "forward", record)
    gpu.warm_kernels(engine.runner, engine.max_model_len, 600, 8)
    monkeypatch.undo()
    big = [s for s in steps if s[0] > gpu.WARM_MID]
    assert [t for t, _, _ in big] == [383, 512, 599, 600]
    for tokens, lens, rows in big:
        # max_num_seqs sequences: decodes beside prompts cut at max_model_len, a logits row each
        assert len(lens) == 8 and rows == 8 and lens.count(1) >= 4
        assert max(lens) <= engine.max_model_len and sum(lens) == tokens
    # The Triton kernels skip slot -1; the CPU reference backend stores it at the pool's last
    # slot (Python indexing), which no request holds here. Every other block is untouched.
    assert all(torch.equal(a[:, :-1], b[:, :-1]) for a, b in zip(caches, engine.runner.kv_caches))
    assert _run(engine) == before_tokens
    assert engine.stats()["num_blocks_in_use"] == 0
