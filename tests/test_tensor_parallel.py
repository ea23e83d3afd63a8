"""Tensor parallelism (qkv/distributed/): two gloo ranks on the CPU against TP=1.

Each family's TP=2 engine is spawned once per module (process start is the slow part) and
runs a workload that forces chunked prefill, prefix-cache hits and preemption (a small pool).
The oracle is the TP=1 engine, itself checked against HF in test_parity.py / test_gemma3.py.
"""

from __future__ import annotations

import json
import os
import signal
import time
from unittest import mock

import pytest
import torch

from qkv import LLM, SamplingParams
from qkv.distributed.parallel_state import TensorParallelError
from qkv.loading.lazy import LazyWeights

from conftest import tiny_config
from test_gemma3 import tiny_gemma3
from test_mla import MOE, tiny_deepseek

pytestmark = pytest.mark.usefixtures("one_thread")

# Small pool (block_size 4) and token budget: prefill is chunked, the shared prefix hits, and
# the four concurrent requests outgrow the pool, so the newest are preempted and recomputed.
ENGINE = dict(device="cpu", block_size=4, num_kv_blocks=14, max_num_batched_tokens=12, max_num_seqs=4)
PREFIX = list(range(3, 15))
PROMPTS = [PREFIX + [20 + i, 30 + i, 40 + i] for i in range(4)]
PARAMS = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
SCORED = list(range(2, 42))
ASYNC = ("llama", "gemma3")
TIMEOUT_S = 3  # each collective's bound; steps of these tiny models take milliseconds


def _save(family: str, path) -> str:
    if family == "gemma3":  # MQA (one KV head, replicated on both ranks), sliding + full layers
        return tiny_gemma3(path)[0]
    if family == "deepseek":  # MLA (latent replicated), q LoRA, a dense layer then grouped MoE
        return tiny_deepseek(path, "v2", q_lora_rank=40, topk_method="group_limited_greedy", **MOE)[0]
    overrides = {"llama": dict(attention_bias=True, mlp_bias=True),  # row-parallel biases added once
                 # a replicated KV head, q/k norm, and an odd vocabulary (rank 1's slice is padded)
                 "qwen3": dict(num_key_value_heads=1, vocab_size=255)}[family]
    cfg, cls = tiny_config(family, **overrides)
    torch.manual_seed(0)
    out = str(path / family)
    cls(cfg).eval().save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["llama", "qwen3", "gemma3", "deepseek"])
def engines(request, tmp_path_factory):
    path = _save(request.param, tmp_path_factory.mktemp(request.param))
    one = LLM(path, **ENGINE)
    old = os.environ.get("QKV_TP_TIMEOUT_S")
    os.environ["QKV_TP_TIMEOUT_S"] = str(TIMEOUT_S)  # bounds the hung-rank test's wait
    try:
        # Async scheduling on two of the families: the pending tokens' ids are gathered on rank
        # 0 and must reach the other ranks (step.pack), still giving TP=1's synchronous tokens.
        # Rank 0 reads no whole tensor: every rank reads its own slices (distributed/checkpoint.py).
        with mock.patch.object(LazyWeights, "read", side_effect=AssertionError("rank 0 read a whole tensor")):
            two = LLM(path, tensor_parallel_size=2, async_scheduling=request.param in ASYNC, **ENGINE)
        assert two.engine.tp.checkpoint is not None
    finally:
        os.environ.pop("QKV_TP_TIMEOUT_S") if old is None else os.environ.__setitem__("QKV_TP_TIMEOUT_S", old)
    yield request.param, one, two, path
    two.engine.tp.shutdown()


def _run(llm: LLM) -> list[list[int]]:
    outs = llm.generate(PROMPTS, PARAMS)
    s = llm.stats()
    assert s["num_blocks_free"] + s["num_blocks_cached"] == s["num_blocks_total"]
    return [o.token_ids for o in outs], s


def test_same_tokens_and_logits_as_one_rank(engines):
    family, one, two, _ = engines
    (ref, s1), (got, s2) = _run(one), _run(two)
    assert got == ref
    assert two.engine.async_scheduling == (family in ASYNC)
    assert s2["num_preemptions"] > 0 and s2["num_cached_prompt_tokens"] > 0  # the workload did force both
    torch.testing.assert_close(two.logits(SCORED), one.logits(SCORED), rtol=0, atol=1e-5)


def test_per_rank_cache_bytes(engines, capsys):
    """Each rank holds its KV heads: half of them with 2 KV heads, one replicated head with 1,
    the whole latent with MLA; ``qkv memory --tp 2`` reports exactly the bytes a rank allocates."""
    from qkv.cli import main

    family, one, two, path = engines
    kv = one.config.num_kv_heads
    per_rank = max(1, kv // 2)
    assert main(["memory", path, "--tp", "2", "--kv-dtype", "float32", "--block-size", "4", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["tensor_parallel_size"] == 2
    if family == "deepseek":
        assert two.engine.runner.kv_cache_bytes == one.engine.runner.kv_cache_bytes
    else:
        assert two.engine.runner.kv_cache_bytes * kv == one.engine.runner.kv_cache_bytes * per_rank
        assert [s.num_kv_heads for s in two.engine.specs] == [per_rank] * len(two.engine.specs)
        assert [g["num_kv_heads"] for g in r["groups"]] == [per_rank] * len(r["groups"])
    # The report's bytes per token of each group, times the tokens of that group's pool (its
    # blocks of 4), is what rank 0 allocated: the same groups, in the same order.
    expected = sum(g["num_layers"] * g["bytes_per_token_per_layer"] * 4 * two.engine.kv.num_pages(i)
                   for i, g in enumerate(r["groups"]))
    assert expected == two.engine.runner.kv_cache_bytes


def test_refused_by_name(tiny_model):
    path, _ = tiny_model("gpt2")
    with pytest.raises(ValueError, match="'gpt2' models are not supported with tensor parallelism"):
        LLM(path, device="cpu", tensor_parallel_size=2)
    path, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by 3"):
        LLM(path, device="cpu", tensor_parallel_size=3)
    with pytest.raises(ValueError, match="quantization is not supported"):
        LLM(path, device="cpu", tensor_parallel_size=2, quantization="int8")
    with pytest.raises(ValueError, match="packed int8/int4 pages.*not supported with tensor_parallel_size"):
        LLM(path, device="cpu", tensor_parallel_size=2, kv_dtype="int4")


# How each family's TP engine is made to fail, in the module's last test (it ends the engine).
FAILURE = {"llama": "hung", "qwen3": "served", "gemma3": "killed", "deepseek": "interrupted"}


def _interrupt(module, inputs, output):
    raise KeyboardInterrupt


def _fail_served(llm: LLM, worker) -> None:
    """Serve the TP engine; kill a rank between requests: the next request fails naming the
    rank, /health turns 503 for good, and the server itself keeps answering."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from qkv.server import create_app
    from test_server import Server

    server = Server(create_app(llm, "tiny"))
    try:
        body = dict(model="tiny", prompt=PROMPTS[0], max_tokens=4, temperature=0)
        ok = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
        assert httpx.get(server.url + "/health").status_code == 200
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(5)
        bad = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
        assert bad.status_code >= 500 and f"pid {worker.pid}" in bad.text
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and "exited with code -9" in health.text
    finally:
        server.stop()


def test_failed_rank_is_a_clear_error(engines):
    """A killed rank is seen before the next step (or by gloo at once, mid-step); a hung one
    (SIGSTOP) fails rank 0's next collective after the group's timeout. Never a hang."""
    family, _, llm, _ = engines
    how = FAILURE[family]
    worker = llm.engine.tp.procs[0]
    try:
        if how == "served":
            _fail_served(llm, worker)
        elif how == "interrupted":  # Ctrl-C on rank 0 mid-step: the other rank is left mid-step
            handle = llm.engine.model.model.layers[1].register_forward_hook(_interrupt)
            with pytest.raises(KeyboardInterrupt):
                llm.generate(PROMPTS, PARAMS)
            handle.remove()
        else:
            os.kill(worker.pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        start = time.monotonic()
        expected = {"hung": "timed out|Timed out", "interrupted": "interrupted mid-step"}.get(
            how, rf"rank 1 \(pid {worker.pid}\) exited with code -9")
        with pytest.raises(TensorParallelError, match=expected):
            llm.generate(PROMPTS, PARAMS)
        assert time.monotonic() - start < TIMEOUT_S + 8
        s = llm.stats()  # LLM.generate aborted the batch: no block leaked
        assert s["num_blocks_free"] + s["num_blocks_cached"] == s["num_blocks_total"]
        with pytest.raises(TensorParallelError, match="cannot continue"):  # and it stays failed
            llm.generate(PROMPTS[:1], PARAMS)
        assert not worker.is_alive()  # the hung rank was killed by the shutdown
    finally:
        if worker.is_alive():
            os.kill(worker.pid, signal.SIGKILL)
