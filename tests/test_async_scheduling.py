"""Async scheduling never changes an output token (CPU, fp32, tiny random models).

With ``async_scheduling=True`` the engine launches step n+1 before it reads step n's tokens
(engine/pending.py). The reference for every case is the same engine with it off, which
tests/test_engine_invariance.py ties to one-request-at-a-time runs (and test_parity.py to
HF transformers). Every case checks token ids, text and finish reasons, and that after the
run no block is in use and ``free + cached == total``.
"""

from __future__ import annotations

import asyncio
import json
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkv import LLM, SamplingParams

BS = 4  # 4-token blocks: prompts span many blocks, decodes cross block boundaries often
VOCAB = 256


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run best on one thread


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("async-llama")
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def engines(tiny_llama):
    """One LLM per (async, knobs), built once: construction costs more than a small run."""
    cache = {}

    def get(async_scheduling: bool, **kw) -> LLM:
        key = (async_scheduling, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = LLM(tiny_llama, device="cpu", block_size=BS, async_scheduling=async_scheduling, **kw)
        return cache[key]

    return get


@pytest.fixture
def probe(monkeypatch):
    """Counts the async cases a test must reach: a request preempted while its token is in
    flight, and a request computed one step past its end (finished when its token was read)."""
    from qkv.engine.scheduler import Scheduler

    hits = {"preempted_pending": 0, "wasted_rows": 0}
    preempt, update = Scheduler._preempt, Scheduler.update

    def _preempt(self, req):
        hits["preempted_pending"] += req.pending_row is not None
        return preempt(self, req)

    def _update(self, batch, rows=None):
        hits["wasted_rows"] += sum(r.finished for r in batch.requests)
        return update(self, batch, rows)

    monkeypatch.setattr(Scheduler, "_preempt", _preempt)
    monkeypatch.setattr(Scheduler, "update", _update)
    return hits


def assert_no_leak(llm: LLM) -> None:
    engine = llm.engine
    s = engine.stats()
    assert s["num_blocks_in_use"] == 0, s
    assert s["num_blocks_free"] + s["num_blocks_cached"] == s["num_blocks_total"], s
    assert s["num_running"] == 0 and s["num_waiting"] == 0, s
    assert not engine.has_unfinished() and not engine._pending
    assert not engine.kv._seqs


def drive(llm: LLM, work, aborts: dict[int, list[int]] | None = None) -> dict[str, tuple]:
    """Submit every (prompt, params) at once, step until done; ``aborts`` maps a step number
    to indices of ``work`` to abort before that step. Returns request id -> (tokens, reason)
    of every sample that finished on its own, and checks that aborted ones never report again."""
    engine = llm.engine
    heads = [engine.add_request(ids, p) for ids, p in work]
    got, aborted, step = {}, set(), 0
    while engine.has_unfinished():
        for i in (aborts or {}).get(step, []):
            engine.abort(heads[i][0].request_id)
            aborted |= {r.request_id for r in heads[i]}
        for out in engine.step():
            assert out.request_id not in aborted, f"{out.request_id} reported after its abort"
            assert out.request_id not in got, f"{out.request_id} reported after it finished"
            if out.finished:
                got[out.request_id] = (out.token_ids, out.finish_reason, out.text)
        step += 1
    assert_no_leak(llm)
    # Outputs are keyed by position, not by the (global, run-dependent) request ids.
    order = {r.request_id: (i, j) for i, reqs in enumerate(heads) for j, r in enumerate(reqs)}
    return {order[k]: v for k, v in got.items()}


def mixed_work(seed: int, count: int = 10, max_prompt: int = 30, max_out: int = 12):
    """Mixed prompt lengths and outputs; greedy and seeded-temperature rows in one batch."""
    rng = random.Random(seed)
    work = []
    for i in range(count):
        ids = [rng.randrange(2, VOCAB) for _ in range(rng.randrange(1, max_prompt))]
        if rng.random() < 0.5:
            params = SamplingParams(max_tokens=rng.randrange(1, max_out), temperature=0, ignore_eos=True)
        else:
            params = SamplingParams(max_tokens=rng.randrange(1, max_out), temperature=rng.choice([0.7, 1.0, 1.5]),
                                    top_k=rng.choice([0, 20]), top_p=rng.choice([1.0, 0.9]), seed=rng.randrange(99))
        work.append((ids, params))
    work.append((work[0][0] + [7, 8, 9], SamplingParams(max_tokens=5, temperature=0)))  # shares a prefix
    return work


CONFIGS = {
    "default": dict(),
    "chunked": dict(max_num_batched_tokens=3),
    "budget16": dict(max_num_batched_tokens=16),
    "no-prefix-cache": dict(enable_prefix_caching=False),
    "preempt": dict(num_kv_blocks=20, max_num_batched_tokens=16),
    "preempt-no-cache": dict(num_kv_blocks=20, max_num_batched_tokens=16, enable_prefix_caching=False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_tokens_as_sync(engines, probe, name):
    kw = CONFIGS[name]
    work = mixed_work(1)
    ref = drive(engines(False, **kw), work)
    assert len(ref) == len(work)
    assert probe["preempted_pending"] == 0  # nothing is ever pending across steps when off
    assert drive(engines(True, **kw), work) == ref
    if name.startswith("preempt"):
        assert probe["preempted_pending"] > 0  # the case was exercised


@pytest.mark.parametrize("name", ["default", "chunked", "preempt"])
def test_parallel_sampling(engines, name):
    kw = CONFIGS[name]
    work = [([5, 6, 7, 8, 9, 10, 11], SamplingParams(n=3, max_tokens=9, temperature=1.0, seed=4)),
            (list(range(20, 45)), SamplingParams(n=3, max_tokens=6, temperature=0.8, seed=11)),
            ([3, 4], SamplingParams(max_tokens=7, temperature=0))]
    ref = drive(engines(False, **kw), work)
    assert len(ref) == 7
    assert drive(engines(True, **kw), work) == ref


def test_stop_token_ids_and_max_tokens_1(engines, probe):
    """Stops on tokens the model really produces: the token read one step late ends the
    request, and the extra token computed for it in the meantime is discarded."""
    sync, asy = engines(False), engines(True)
    base = [([9, 10, 11, 12 + i], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)) for i in range(4)]
    plain = drive(sync, base)
    work = []
    for i, (ids, _) in enumerate(base):
        tokens = plain[(i, 0)][0]
        work.append((ids, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, stop_token_ids=[tokens[i]])))
        work.append((ids, SamplingParams(max_tokens=1, temperature=0)))
    ref = drive(sync, work)
    assert any(reason == "stop" for _, reason, _ in ref.values())
    assert probe["wasted_rows"] == 0
    assert drive(asy, work) == ref
    assert probe["wasted_rows"] > 0  # stops read one step late: their extra rows were dropped


def test_outputs_come_one_step_late(engines):
    asy = engines(True).engine
    (req,) = asy.add_request([4, 5, 6], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert asy.step() == []  # the prompt's token is sampled, not read
    assert req.pending_row == 0 and req.num_tokens == 4 and req.num_output_tokens == 0
    outs = asy.step()  # launches the first decode, then reads the prompt's token
    assert [len(o.token_ids) for o in outs] == [1]
    while asy.has_unfinished():
        asy.step()
    assert req.finish_reason == "length" and req.num_output_tokens == 3
    assert_no_leak(engines(True))


def test_abort_with_tokens_in_flight_leaves_nothing(engines):
    """What the server's shutdown does: abort everything between steps while tokens are in
    flight. Nothing may be left to step, and every block is back."""
    asy = engines(True).engine
    reqs = asy.add_request([4, 5, 6], SamplingParams(n=2, max_tokens=50, temperature=1.0, seed=1))
    asy.step()
    asy.step()
    assert all(r.pending_row is not None for r in reqs)
    asy.abort(reqs[0].request_id)
    assert all(r.pending_row is None for r in reqs)
    assert not asy.has_unfinished() and asy.step() == []
    assert_no_leak(engines(True))


def test_default_is_off_on_cpu(engines, tiny_llama):
    assert LLM(tiny_llama, device="cpu", block_size=BS).engine.async_scheduling is False
    assert engines(True).engine.async_scheduling is True


@pytest.mark.parametrize("name", ["default", "preempt"])
def test_abort_mid_run(engines, name):
    """Aborts between steps: while prefilling, while a token is in flight, a parent of n=2,
    one sample alone. Survivors equal a run without the aborted requests."""
    kw = CONFIGS[name]
    work = mixed_work(2, count=8)
    work.append(([40, 41, 42, 43, 44, 45], SamplingParams(n=2, max_tokens=8, temperature=1.0, seed=2)))
    aborts = {0: [3], 1: [0], 2: [8], 4: [5], 6: [1]}
    gone = {i for ids in aborts.values() for i in ids}
    for i in gone:  # long enough that none ends on its own before its abort
        work[i] = (work[i][0], SamplingParams(n=work[i][1].n, max_tokens=30, temperature=1.0, seed=i,
                                              ignore_eos=True))
    keep = [i for i in range(len(work)) if i not in gone]
    ref = drive(engines(False, **kw), [work[i] for i in keep])
    for mode in (False, True):
        got = drive(engines(mode, **kw), work, aborts)
        assert all(i in keep for i, _ in got)
        assert {(keep.index(i), j): v for (i, j), v in got.items()} == ref


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), config=st.sampled_from(list(CONFIGS)))
def test_property_async_equals_sync(engines, seed, config):
    work = mixed_work(seed, count=6, max_out=8)
    kw = CONFIGS[config]
    assert drive(engines(True, **kw), work) == drive(engines(False, **kw), work)


# ------------------------------------------------------------------------ with a tokenizer
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, how are you today?",
          "a paged kv cache stores keys and values in fixed size blocks"] * 10


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory):
    """A tiny Llama with a byte-level BPE tokenizer of exactly its vocabulary: stop strings."""
    import tokenizers
    import transformers as tf
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    path = tmp_path_factory.mktemp("async-chat-llama")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": None}))
    cfg = tf.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(1)
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return str(path)


def test_stop_strings(chat_llama):
    sync = LLM(chat_llama, device="cpu", block_size=BS, async_scheduling=False)
    asy = LLM(chat_llama, device="cpu", block_size=BS, async_scheduling=True)
    prompts = ["the lazy dog", "hello world", "a paged kv cache"]
    base = sync.generate(prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    stops = [o.text[len(o.text) // 2:len(o.text) // 2 + 2] for o in base]
    assert all(len(s) == 2 for s in stops)
    for params in (SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=stops),
                   SamplingParams(max_tokens=16, temperature=1.0, seed=5, stop=stops[:1])):
        ref = sync.generate(prompts, params)
        got = asy.generate(prompts, params)
        assert [(o.token_ids, o.text, o.finish_reason) for o in got] == \
            [(o.token_ids, o.text, o.finish_reason) for o in ref]
    assert any(o.finish_reason == "stop" for o in asy.generate(prompts, SamplingParams(
        max_tokens=16, temperature=0, ignore_eos=True, stop=stops)))
    # Streaming: the deltas of every step add up to the final text.
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=stops)
    expect = sync.generate("the lazy dog", params)[0].text
    for llm in (sync, asy):
        assert "".join(o.text_delta for o in llm.stream("the lazy dog", params)) == expect
        assert_no_leak(llm)


def test_server_loop_with_async_engine(chat_llama):
    """The server's EngineLoop drives an async engine: same texts as offline, aborts free all."""
    from qkv.server.engine_loop import EngineLoop

    asy = LLM(chat_llama, device="cpu", block_size=BS, async_scheduling=True)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [asy.encode(p) for p in ["the quick", "hello", "a paged kv"]]
    expect = [o.token_ids for o in LLM(chat_llama, device="cpu", block_size=BS).generate(prompts, params)]
    loop = EngineLoop(asy.engine)
    loop.start()

    async def collect(i):
        stream = loop.submit([prompts[i]], params, f"s{i}")
        await asyncio.wrap_future(stream.added)
        while True:
            out = await stream.queue.get()
            if out.finished:
                return out.token_ids

    async def abort_early():
        stream = loop.submit([prompts[0]], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), "gone")
        await asyncio.wrap_future(stream.added)
        await stream.queue.get()
        loop.abort(stream)

    async def main():
        return await asyncio.gather(abort_early(), *(collect(i) for i in range(3)))

    try:
        got = asyncio.run(main())[1:]
    finally:
        loop.stop()
    assert got == expect
    assert_no_leak(asy)


# ------------------------------------------------------------------------ the CUDA-graph path, emulated
@pytest.mark.parametrize("n", [1, 3])
def test_decode_graph_staging_emulated(tiny_llama, monkeypatch, n):
    """DecodeGraphs.run (the CUDA decode path) on the CPU: pinned buffers become plain ones,
    CUDA events no-ops, and a "replay" runs the forward the graph would have captured into
    its static output buffer. Its staging, padding rows and device gather of pending input
    ids must give the eager engine's tokens, with async scheduling off and on."""
    from qkv.engine import cuda_graph

    class Event:
        def record(self):
            pass

        def synchronize(self):
            pass

    class Replay:
        def __init__(self, graphs, size):
            self.graphs, self.size = graphs, size

        def replay(self):
            with torch.inference_mode():
                self.graphs.logits[self.size].copy_(self.graphs._forward(self.size))

    zeros = torch.zeros
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch, "zeros", lambda *a, pin_memory=False, **k: zeros(*a, **k))
    rng = random.Random(n)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(1, 30))] for _ in range(5)]
    params = SamplingParams(n=n, max_tokens=10, temperature=0.0 if n == 1 else 1.0, seed=5, ignore_eos=True)
    expect = LLM(tiny_llama, device="cpu", block_size=BS).generate(prompts, params)
    for mode in (False, True):
        llm = LLM(tiny_llama, device="cpu", block_size=BS, max_num_seqs=16, async_scheduling=mode)
        runner = llm.engine.runner
        graphs = cuda_graph.DecodeGraphs(runner, 16, llm.engine.max_model_len)
        for rope in runner.ropes:
            rope.ensure(graphs.max_model_len)
        for size in graphs.sizes:
            graphs.logits[size] = torch.zeros(size, VOCAB)
            graphs.graphs[size] = Replay(graphs, size)
        runner.graphs = graphs
        replays = []
        run = graphs.run
        monkeypatch.setattr(graphs, "run", lambda sched, prev=None: replays.append(1) or run(sched, prev))
        got = llm.generate(prompts, params)
        assert [[s.token_ids for s in (o.samples or [o])] for o in got] == \
            [[s.token_ids for s in (o.samples or [o])] for o in expect]
        assert len(replays) >= 5  # decode steps took the graph path
        assert_no_leak(llm)
