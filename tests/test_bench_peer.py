"""``qkv bench throughput --peer llamacpp``: llama.cpp is handed the very requests qkv served
(same prompts, same output lengths), one after another. A stand-in ``llama_cpp`` records them;
the real one is a benchmark peer, not a dependency."""

import argparse
import sys
import types

from qkv.tools import bench
from qkv.tools.bench_engine import workload


class FakeLlama:
    calls: list = []

    def __init__(self, model_path, n_threads, n_ctx, verbose):
        self.n_ctx = n_ctx

    def generate(self, ids, temp, reset):
        assert reset and len(ids) < self.n_ctx
        FakeLlama.calls.append(list(ids))
        while True:  # endless, as llama.cpp's generator: the caller stops it
            yield 7


def test_llamacpp_throughput_replays_the_same_requests(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=FakeLlama))
    FakeLlama.calls = []
    llm = types.SimpleNamespace(source="m.gguf", config=types.SimpleNamespace(vocab_size=500))
    args = argparse.Namespace(num_requests=5, input_len="3:9", output_len="2:6", seed=4)
    res = bench._llamacpp_throughput(llm, args)
    work = workload(5, (3, 9), (2, 6), 4, 500)
    assert FakeLlama.calls == [ids for ids, _ in work]
    assert res["num_requests"] == 5 and res["output_tokens"] == sum(n for _, n in work)
    assert res["output_tok_s"] > 0


def test_llamacpp_peer_refused_for_prefix(monkeypatch):
    import importlib.util

    import pytest

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "llama_cpp" else real(name, *a))
    bench.check_peer(argparse.Namespace(peer="llamacpp", bench="throughput", model="smollm2", random_weights=None))
    with pytest.raises(ValueError, match="latency and throughput only"):
        bench.check_peer(argparse.Namespace(peer="llamacpp", bench="prefix", model="smollm2"))
