"""The attention backend belongs to the engine (its model), not the process: engines with
different backends, or on different devices, run side by side in one process."""

from __future__ import annotations

import pytest
import torch

from qkv.attention import backend, reference
from qkv.engine.engine import LLMEngine
from qkv.engine.request import SamplingParams
from qkv.loading import load

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [[5, 9, 2, 33, 7], [11, 12, 13, 14, 15, 16, 17, 18, 19], [40, 41]]


def greedy(eng: LLMEngine) -> list[list[int]]:
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    reqs = [r for p in PROMPTS for r in eng.add_request(p, params)]
    while eng.has_unfinished():
        eng.step()
    return [r.output_token_ids for r in reqs]


def engine(loaded, **kw) -> LLMEngine:
    return LLMEngine(loaded.config, loaded.weights, None, dtype="float32", num_kv_blocks=32, max_num_seqs=4, **kw)


def test_two_cpu_engines_keep_their_own_backend(tiny_model):
    """An engine built on a registered backend keeps calling it after another engine (on the
    default) is built, and the other never calls it: a process-wide choice fails both."""
    calls = []

    def spy(*args):
        calls.append(1)
        return reference.paged_attention(*args)

    backend.register("spy", spy)
    loaded = load(tiny_model("llama")[0])
    spied = engine(loaded, device="cpu", attention_backend="spy")
    plain = engine(loaded, device="cpu")  # "auto": the reference on the CPU
    assert (spied.attention_backend, plain.attention_backend) == ("spy", "reference")
    assert {m.attention_backend for m in plain.model.attention_layers()} == {"reference"}
    plain_tokens = greedy(plain)
    assert calls == []
    spied_tokens = greedy(spied)
    assert len(calls) > 0
    assert spied_tokens == plain_tokens  # the spy is the reference underneath


def test_cpu_backend_names_are_checked(tiny_model):
    loaded = load(tiny_model("llama")[0])
    with pytest.raises(ValueError, match="'triton' needs a CUDA device"):
        engine(loaded, device="cpu", attention_backend="triton")
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        engine(loaded, device="cpu", attention_backend="nope")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_engine_after_cuda_engine(tiny_model):
    """Issue 23: a CPU engine created after a CUDA (Triton) engine ran Triton kernels on CPU
    tensors. Now each runs its own backend, in either order, with unchanged tokens."""
    loaded = load(tiny_model("llama")[0])
    cpu_alone = greedy(engine(loaded, device="cpu"))
    cuda = engine(loaded, device="cuda")
    cuda_first = greedy(cuda)
    cpu = engine(loaded, device="cpu")
    assert cuda.attention_backend != cpu.attention_backend == "reference"
    assert greedy(cpu) == cpu_alone
    assert greedy(cuda) == cuda_first
