"""The tensor-parallel layout at one rank (``QKV_TP_LAYOUT=1``), and its CUDA graphs.

With ``QKV_TP_LAYOUT=1`` an engine of ``tensor_parallel_size=1`` runs rank 0's executor and
runner over a one-rank group (gloo on the CPU, NCCL on CUDA) and the sharded model with its
collectives: what a benchmark compares against the plain engine to price the layout. The
oracle is the plain engine (itself checked against HF in test_parity.py).

On CUDA (skipped elsewhere) the layout captures its decode graphs with the NCCL collectives
inside (qkv/distributed/graphs.py): tokens with graphs equal the plain engine's and the
layout's own eager tokens, and decode steps did replay the graphs.
"""

from __future__ import annotations

import pytest
import torch

from qkv import LLM, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

CUDA = torch.cuda.is_available()
PROMPTS = [list(range(3, 15)), [5, 9, 2, 7], list(range(40, 70))]
PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _layout(monkeypatch, path: str, **kw) -> LLM:
    monkeypatch.setenv("QKV_TP_LAYOUT", "1")
    llm = LLM(path, **kw)
    monkeypatch.delenv("QKV_TP_LAYOUT")
    assert llm.engine.tp is not None and llm.engine.tp.size == 1 and not llm.engine.tp.procs
    return llm


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]


def test_one_rank_layout_on_the_cpu(tiny_model, monkeypatch):
    path, _ = tiny_model("llama")
    kw = dict(device="cpu", block_size=4, num_kv_blocks=32, max_num_seqs=4)
    plain = LLM(path, **kw)
    assert plain.engine.tp is None
    layout = _layout(monkeypatch, path, **kw)
    assert _tokens(layout) == _tokens(plain)
    torch.testing.assert_close(layout.logits(PROMPTS[2]), plain.logits(PROMPTS[2]), rtol=0, atol=1e-5)
    layout.engine.tp.shutdown()


def test_layout_switch_refuses_other_values(tiny_model, monkeypatch):
    path, _ = tiny_model("llama")
    monkeypatch.setenv("QKV_TP_LAYOUT", "yes")
    with pytest.raises(ValueError, match="QKV_TP_LAYOUT must be 0 or 1, got 'yes'"):
        LLM(path, device="cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (NCCL collectives captured in CUDA graphs)")
def test_graphs_through_the_layout_on_cuda(tiny_model, monkeypatch):
    path, _ = tiny_model("llama", num_hidden_layers=3)
    kw = dict(device="cuda", dtype="float32", block_size=16, num_kv_blocks=64, max_num_seqs=4, max_model_len=256)
    plain = LLM(path, **kw)
    assert plain.engine.runner.graphs is not None
    ref = _tokens(plain)
    del plain
    eager = _layout(monkeypatch, path, enforce_eager=True, **kw)
    assert eager.engine.runner.graphs is None
    got_eager = _tokens(eager)
    eager.engine.tp.shutdown()
    del eager
    graphs = _layout(monkeypatch, path, **kw)
    from qkv.distributed.graphs import TensorParallelGraphs

    g = graphs.engine.runner.graphs
    assert type(g) is TensorParallelGraphs
    # A worker's side of each replayed step, on a second (uncaptured) set of buffers: what
    # rank 0 sends (``pack``) stages, on the worker (``load``), every input its graph reads.
    shadow = TensorParallelGraphs(graphs.engine.runner, 4, 256, graphs.engine.tp.group)
    shadow.replay = lambda n, size: None
    replays = []
    replay = g.replay

    def checked(n, size):
        shadow.load(g.pack(n, size, []))
        torch.cuda.synchronize()
        N, bs = g.sizes[-1], g.block_size
        for a, b in ((N, N + n), (4 * N, 5 * N)):  # positions, slots (padding rows' too)
            assert torch.equal(shadow.buf[a:b], g.buf[a:b])
        pos = g.buf[N:N + n].tolist()
        for i, p in enumerate(pos):  # each row's table up to its last block
            w = p // bs + 1
            assert torch.equal(shadow.block_tables[0][i, :w], g.block_tables[0][i, :w])
        replays.append(size)
        return replay(n, size)

    g.replay = checked
    got = _tokens(graphs)
    assert replays, "no decode step replayed a graph"
    assert got == ref and got_eager == ref
    graphs.engine.tp.shutdown()
