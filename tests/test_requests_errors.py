"""Request-level validation: SamplingParams fields, scoring past the context, duplicate ids.
Each refusal is a ValueError naming the field or limit, with nothing queued or leaked."""

from __future__ import annotations

import numpy as np
import pytest

from qkv import LLM, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kw,match", [
    (dict(temperature=float("nan")), "temperature must be finite"),
    (dict(temperature=float("inf")), "temperature must be finite"),
    (dict(temperature="0.5"), "temperature must be a number"),
    (dict(top_p=float("nan")), "top_p must be finite"),
    (dict(seed=2**70), "seed must be below 2\\*\\*64"),
    (dict(seed=2**64 - 1, n=2), "seed must be below"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(n=2.5), "n must be an integer"),
    (dict(n=True), "n must be an integer"),
    (dict(max_tokens=0), "max_tokens must be at least 1"),
    (dict(max_tokens=2.0), "max_tokens must be an integer"),
    (dict(top_k=-2), "top_k must be at least -1"),
    (dict(stop=[None]), "stop must be"),
    (dict(stop=""), "stop must be"),
    (dict(stop=5), "stop must be"),
    (dict(stop_token_ids=5), "stop_token_ids must be a list"),
    (dict(stop_token_ids=[True]), "stop_token_ids must be an integer"),
    (dict(stop_token_ids=[-1]), "stop_token_ids must be at least 0"),
    (dict(ignore_eos="no"), "ignore_eos must be true or false"),
])
def test_sampling_params_refuses_bad_fields(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_sampling_params_accepts_what_users_expect():
    p = SamplingParams(stop="x", stop_token_ids=(np.int64(3),), seed=np.uint64(2**63), n=np.int32(2), temperature=np.float32(0.5))
    assert (p.stop, p.stop_token_ids, p.seed, p.n, p.temperature) == (["x"], [3], 2**63, 2, 0.5)
    assert type(p.stop_token_ids[0]) is int and type(p.n) is int
    assert SamplingParams(stop=["a", "b"], stop_token_ids=None, seed=-1).stop == ["a", "b"]


@pytest.fixture
def llm(tiny_model):
    path, _ = tiny_model("llama", max_position_embeddings=64)
    return LLM(path, device="cpu", num_kv_blocks=32, block_size=4, max_num_batched_tokens=16)


def test_logits_refuses_past_context_empty_and_out_of_vocab(llm):
    assert llm.logits(list(range(64))).shape == (64, 256)  # exactly the context: fine
    with pytest.raises(ValueError, match="65 tokens exceed the maximum context length of 64"):
        llm.logits(list(range(65)))
    with pytest.raises(ValueError, match="empty"):
        llm.logits([])
    with pytest.raises(ValueError, match=r"out of the vocabulary \(integers in \[0, 256\)\): \[256, -1\]"):
        llm.logits([1, 256, -1])
    with pytest.raises(ValueError, match="out of the vocabulary"):
        llm.logits([1, True])
    assert _usage(llm)["num_blocks_in_use"] == 0


def _usage(llm):
    return llm.engine.kv.usage()


def test_duplicate_request_id_raises_without_side_effects(llm):
    eng = llm.engine
    before = _usage(llm)
    greedy = SamplingParams(max_tokens=5, temperature=0)
    (first,) = eng.add_request([1, 2, 3], greedy, request_id="a")
    with pytest.raises(ValueError, match="request id 'a' is already in use"):
        eng.add_request([4, 5, 6, 7], greedy, request_id="a")
    # A sample of a parallel request and a plain request must not share ids either:
    # abort("b") ends "b/1", and "b" with n=2 would overwrite it.
    eng.add_request([1, 2], greedy, request_id="b/1")
    with pytest.raises(ValueError, match="request id 'b' is already in use"):
        eng.add_request([1, 2], SamplingParams(n=2, max_tokens=2, seed=0), request_id="b")
    with pytest.raises(ValueError, match="request id 'b/1/x' is already in use"):
        eng.add_request([1, 2], greedy, request_id="b/1/x")
    assert [r.request_id for r in eng.scheduler.waiting] == ["a", "b/1"]
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
    assert set(outs) == {"a", "b/1"} and outs["a"].prompt_token_ids == [1, 2, 3]
    alone = llm.generate([1, 2, 3], greedy)
    assert outs["a"].token_ids == alone[0].token_ids  # the first copy ran unchanged
    assert first.finished and not eng._requests
    assert _usage(llm)["num_blocks_in_use"] == before["num_blocks_in_use"] == 0  # no leaked blocks


def test_llm_refuses_a_device_before_loading(tmp_path):
    missing = str(tmp_path / "missing.gguf")  # the device is checked first, so no load error
    with pytest.raises(ValueError, match=r"^device 'gpu' is not a device name; use cpu or cuda"):
        LLM(missing, device="gpu")
