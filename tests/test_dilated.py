"""Dilated sliding window (Longformer, seed 003): the reference backend vs a brute-force mask.

A query at position i with window W and dilation d sees keys i, i-d, ..., i-(W-1)*d.
"""

from __future__ import annotations

import pytest
import torch

from qkv.attention.batch import AttentionBatch
from qkv.attention.reference import paged_attention, window_mask, write_kv


def brute_mask(n_q: int, n_k: int, q0: int, window: int | None, d: int) -> torch.Tensor:
    m = torch.zeros(n_q, n_k, dtype=torch.bool)
    for a in range(n_q):
        i = q0 + a
        if window is None:
            m[a, : i + 1] = True
        else:
            for t in range(window):
                if 0 <= i - t * d < n_k:
                    m[a, i - t * d] = True
    return m


@pytest.mark.parametrize("window,d", [(None, 1), (4, 1), (3, 2), (4, 3), (1, 5)])
def test_window_mask_matches_brute_force(window, d):
    q = torch.arange(20)[:, None]
    k = torch.arange(20)[None, :]
    assert torch.equal(window_mask(q, k, window, d), brute_mask(20, 20, 0, window, d))


@pytest.mark.parametrize("window,d", [(4, 1), (3, 2), (5, 3)])
def test_paged_attention_dilated(window, d):
    """Mixed batch (chunked prefill after a cached prefix, decode, fresh prefill) through the
    paged cache equals dense softmax attention with the brute-force dilated mask."""
    g = torch.Generator().manual_seed(window * 10 + d)
    bs, nblocks, H, KVH, D = 4, 64, 4, 2, 8
    seqs = [(13, 9), (30, 1), (0, 17)]  # (cached tokens, new tokens)
    total = [c + n for c, n in seqs]
    k_all = [torch.randn(t, KVH, D, generator=g) for t in total]
    v_all = [torch.randn(t, KVH, D, generator=g) for t in total]
    q_all = [torch.randn(n, H, D, generator=g) for _, n in seqs]
    cache = torch.zeros(2, nblocks, bs, KVH, D)
    perm = torch.randperm(nblocks, generator=g).tolist()
    tables = []
    for t in total:  # scattered, non-contiguous pages
        nb = -(-t // bs)
        tables.append(perm[:nb])
        perm = perm[nb:]
    for (c, _), tab, k, v in zip(seqs, tables, k_all, v_all):
        slots = torch.tensor([tab[p // bs] * bs + p % bs for p in range(c)], dtype=torch.int64)
        write_kv(cache, k[:c], v[:c], slots)
    width = max(len(t) for t in tables)
    qlens = [n for _, n in seqs]
    qsl = [0]
    for n in qlens:
        qsl.append(qsl[-1] + n)
    new_slots = [tab[p // bs] * bs + p % bs for (c, n), tab in zip(seqs, tables) for p in range(c, c + n)]
    batch = AttentionBatch(
        query_start_loc=torch.tensor(qsl), num_computed=torch.tensor([c for c, _ in seqs]),
        query_lens=torch.tensor(qlens), max_query_len=max(qlens), max_seq_len=max(total), block_size=bs,
        block_tables=[torch.tensor([t + [0] * (width - len(t)) for t in tables])],
        slot_mappings=[torch.tensor(new_slots)], ring_blocks=[None],
    )
    q = torch.cat(q_all)
    k_new = torch.cat([k[c:] for (c, _), k in zip(seqs, k_all)])
    v_new = torch.cat([v[c:] for (c, _), v in zip(seqs, v_all)])
    scale = D ** -0.5
    out = paged_attention(q, k_new, v_new, cache, batch, 0, scale, window=window, dilation=d)

    refs = []
    for (c, n), qs, k, v in zip(seqs, q_all, k_all, v_all):
        mask = brute_mask(n, c + n, c, window, d)
        kk = k.repeat_interleave(H // KVH, dim=1)
        vv = v.repeat_interleave(H // KVH, dim=1)
        s = torch.einsum("qhd,khd->hqk", qs, kk) * scale
        s = s.masked_fill(~mask, float("-inf"))
        refs.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), vv))
    torch.testing.assert_close(out, torch.cat(refs), rtol=1e-5, atol=1e-5)
    # The step's K/V were written after being read: the cache now holds every position.
    for (c, n), tab, k in zip(seqs, tables, k_all):
        slots = torch.tensor([tab[p // bs] * bs + p % bs for p in range(c + n)])
        assert torch.equal(cache[0].view(-1, KVH, D)[slots], k)


# ----------------------------------------------------------------------------- end to end (CPU)
# HF has no dilated model. The oracle is HF's own forward over the whole sequence, full K/V,
# given the dilated-window mask built above by brute force (4-D masks are used as given).
W, BS = 5, 4
pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = dict(temperature=0, ignore_eos=True)


def oracle_logits(hf, ids: list[int], masks: dict[str, int]) -> torch.Tensor:
    """Logits of every position, each layer kind masked with its (window, dilation)."""
    n = len(ids)
    built = {kind: torch.zeros(1, 1, n, n).masked_fill(~brute_mask(n, n, 0, w, d), float("-inf"))
             for kind, (w, d) in masks.items()}
    mask = built if len(built) > 1 else next(iter(built.values()))
    with torch.no_grad():
        return hf(torch.tensor([ids]), attention_mask=mask).logits[0]


def oracle_greedy(hf, prompt: list[int], n: int, masks) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(oracle_logits(hf, seq, masks)[-1].argmax()))
    return seq[len(prompt):]


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _generate_watching(llm, prompt, n):
    """Greedy tokens, prompt tokens served from the cache, and after every step each group's
    held blocks next to what its spec says a sequence of that length holds."""
    from qkv import SamplingParams

    eng = llm.engine
    (req,) = eng.add_request(prompt, SamplingParams(max_tokens=n, **GREEDY))
    held = []
    while not req.finished:
        eng.step()
        if not req.finished:
            tables = eng.kv.block_tables(req.request_id)
            held.append([(sum(b != eng.kv.null[g] for b in t), grp.spec.blocks_needed(req.num_computed_tokens, BS))
                         for g, (t, grp) in enumerate(zip(tables, eng.kv.groups))])
    return list(req.output_token_ids), req.num_cached_tokens, held


def _pools_whole(llm) -> None:
    for g in llm.engine.kv.groups:
        assert g.pool.num_free + g.pool.num_cached == g.pool.num_blocks


@pytest.mark.parametrize("caching", [False, True], ids=["ring", "window-table"])
@pytest.mark.parametrize("d", [2, 3])
def test_engine_dilated_equals_dense_oracle(tiny_model, d, caching):
    """Tiny Mistral, window 5 dilated by d: chunked prefill (chunks of 6 < W*d), a prefix hit
    and decode give the oracle's greedy tokens; scoring gives its logits; a sequence holds
    ceil(W*d / bs) + 1 blocks at most, as the spec says, and every block comes back."""
    from qkv import LLM

    path, hf = tiny_model("mistral", sliding_window=W, seed=d)
    llm = LLM(path, dtype="float32", device="cpu", block_size=BS, num_kv_blocks=64, max_num_batched_tokens=6,
              enable_prefix_caching=caching, attention_override={"dilation": d})
    (spec,) = {g.spec for g in llm.engine.kv.groups}
    assert (spec.window, spec.dilation, spec.ring_blocks(BS)) == (W, d, -(-W * d // BS) + 1)
    masks = {"sliding_attention": (W, d)}
    p1 = _ids(23, d)
    p2 = p1[:20] + _ids(5, 10 + d)  # shares 5 full blocks with p1
    n = 10
    ours1, hit1, held1 = _generate_watching(llm, p1, n)
    ours2, hit2, held2 = _generate_watching(llm, p2, n)
    assert ours1 == oracle_greedy(hf, p1, n, masks)
    assert ours2 == oracle_greedy(hf, p2, n, masks)
    assert hit1 == 0 and (hit2 == 20 if caching else hit2 == 0)
    for h, want in (x for step in held1 + held2 for x in step):
        assert h == want <= spec.ring_blocks(BS)
    assert max(h for step in held1 for h, _ in step) == spec.ring_blocks(BS)
    seq = p1 + ours1
    torch.testing.assert_close(llm.logits(seq), oracle_logits(hf, seq, masks), rtol=1e-4, atol=1e-4)
    _pools_whole(llm)
    # The undilated window is a different model: the oracle would catch a dropped dilation.
    assert oracle_greedy(hf, p1, n, {"sliding_attention": (W, 1)}) != ours1


def test_gemma3_dilated_sliding_layers_only(tmp_path):
    """Gemma 3 (3 sliding layers and a global one): {"dilation": 2} dilates the sliding layers
    and leaves the global layer whole; prefix hit and decode equal the oracle, which masks
    the two layer kinds apart."""
    from test_gemma3 import WINDOW, tiny_gemma3

    from qkv import LLM

    path, hf = tiny_gemma3(tmp_path, seed=4)
    llm = LLM(path, dtype="float32", device="cpu", block_size=BS, num_kv_blocks=128, max_num_batched_tokens=7,
              attention_override={"dilation": 2})
    assert llm.config.dilation == [2, 2, 1, 2]
    masks = {"sliding_attention": (WINDOW, 2), "full_attention": (None, 1)}
    p1 = _ids(30, 7)
    p2 = p1[:28] + _ids(3, 8)
    ours1, _, _ = _generate_watching(llm, p1, 8)
    ours2, hit2, _ = _generate_watching(llm, p2, 8)
    assert hit2 == 28
    assert ours1 == oracle_greedy(hf, p1, 8, masks)
    assert ours2 == oracle_greedy(hf, p2, 8, masks)
    _pools_whole(llm)


@pytest.mark.parametrize("caching", [False, True], ids=["ring", "window-table"])
def test_memory_tool_blocks_equal_the_engines(tiny_model, capsys, caching):
    """`qkv memory --attention-override` predicts the engine's pools for a budget and the blocks
    one dilated sequence holds, to the block."""
    import json

    from qkv import LLM
    from qkv.cli import main

    path, _ = tiny_model("mistral", sliding_window=W)
    override, ctx, budget = '{"dilation": 3}', 40, 200_000
    flags = [] if caching else ["--no-prefix-caching"]
    assert main(["memory", path, "--attention-override", override, "--context", str(ctx), "--block-size", str(BS),
                 "--kv-dtype", "float32", "--kv-cache-memory", str(budget), "--max-num-seqs", "3", "--json",
                 *flags]) == 0
    r = json.loads(capsys.readouterr().out)
    (grp,) = r["groups"]
    assert (grp["window"], grp["dilation"], grp["blocks_per_sequence"]) == (W, 3, -(-W * 3 // BS) + 1)
    llm = LLM(path, dtype="float32", device="cpu", block_size=BS, kv_cache_memory=budget, max_num_seqs=3,
              enable_prefix_caching=caching, attention_override=json.loads(override))
    assert list(r["pools"]["blocks"].values()) == [g.pool.num_blocks for g in llm.engine.kv.groups]
    assert r["pools"]["bytes"] == llm.engine.runner.kv_cache_bytes
    _, _, held = _generate_watching(llm, _ids(ctx - 12, 0), 13)  # the last step computes token ctx
    assert held[-1][0][0] == grp["blocks_per_sequence"]
    # Undilated, the same model holds fewer blocks: the override reached the memory tool.
    assert main(["memory", path, "--context", str(ctx), "--block-size", str(BS), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["groups"][0]["blocks_per_sequence"] == -(-W // BS) + 1
    _pools_whole(llm)


# ----------------------------------------------------------------------------- refused input
@pytest.mark.parametrize("override,words", [
    ({"dilaton": 2}, ["unknown keys", "dilaton"]),
    ({"dilation": 0}, ["dilation=0", "out of range"]),
    ({"dilation": True}, ["dilation must be an integer"]),
    ({"dilation": [2]}, ["1 entries for 2 layers"]),
    ('{"dilation": 2', ["not valid JSON"]),
    ('[2]', ["expected a JSON object"]),
])
def test_bad_override_is_refused_by_name(tiny_model, override, words):
    from qkv.attention_override import apply_attention_override
    from qkv.config import ConfigError
    from qkv.loading import load

    cfg = load(tiny_model("mistral", sliding_window=W)[0]).config
    with pytest.raises(ConfigError) as e:
        apply_attention_override(cfg, override)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_dilation_without_a_window_is_refused(tiny_model, capsys):
    """Full attention has no window to dilate: refused at load, and by the CLI in one line."""
    from qkv import LLM
    from qkv.cli import main
    from qkv.config import ConfigError

    path, _ = tiny_model("llama")
    with pytest.raises(ConfigError, match="needs sliding-window layers"):
        LLM(path, device="cpu", attention_override={"dilation": 2})
    assert main(["memory", path, "--attention-override", '{"dilation": 2}']) == 2
    assert "--attention-override: dilation=2 needs sliding-window layers" in capsys.readouterr().err
    assert LLM(path, device="cpu", num_kv_blocks=8, attention_override={"dilation": 1}).config.dilation == [1, 1]
