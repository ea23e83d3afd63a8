"""Less-travelled corners of the OpenAI server, against both servers (the in-process app and a
real ``qkv serve`` with the engine in a process of its own): a stop string completed by the
last token ``max_tokens`` allows, streamed logprobs' ``text_offset``, ... Each answer must be
the offline engine's (or the non-streamed answer's), and no request may leak a block.

The model is test_server's tiny random Llama (byte-level BPE, ChatML template).
"""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from test_server import Server, make_model_dir  # noqa: E402
from test_server_adversarial import assert_pool_whole, post, stream_all  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_LEN = 256


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny-audit"))


@pytest.fixture(scope="module")
def ref_llm(model_dir):
    from qkv import LLM

    return LLM(model_dir, device="cpu", num_kv_blocks=64, max_model_len=MAX_LEN)


@pytest.fixture(scope="module")
def inproc(model_dir):
    from qkv import LLM
    from qkv.server import ServerLimits, create_app

    llm = LLM(model_dir, device="cpu", num_kv_blocks=32, max_num_seqs=8, max_model_len=MAX_LEN)
    s = Server(create_app(llm, "tiny", limits=ServerLimits(max_n=4)))
    yield s.url
    s.stop()
    assert llm.stats()["num_blocks_in_use"] == 0


@pytest.fixture(scope="module")
def served(model_dir):
    pytest.importorskip("zmq")
    pytest.importorskip("msgpack")
    from test_server_process import ServeProcess

    s = ServeProcess(model_dir, "--num-kv-blocks", "32", "--max-num-seqs", "8", "--max-model-len", str(MAX_LEN),
                     "--max-n", "4", "--threads", "1")
    yield s.url
    s.kill()


@pytest.fixture(params=["in-process", "engine-process"])
def url(request):
    return request.getfixturevalue("inproc" if request.param == "in-process" else "served")


# ---------------------------------------------------------------- stop string on the last token
def _stop_on_last_token(ref_llm, prompt: str) -> tuple[int, str]:
    """(k, stop): a stop string that greedy decoding of ``prompt`` completes with its k-th
    output token (found by asking the offline engine), so max_tokens=k reaches the length
    limit with the same token."""
    from qkv import SamplingParams

    greedy = dict(temperature=0, ignore_eos=True)
    for k in range(2, 16):
        text = ref_llm.generate([prompt], SamplingParams(max_tokens=k, **greedy))[0].text
        for stop in (text[-1:], text[-2:]):
            if not stop.strip() or "\ufffd" in stop:
                continue
            out = ref_llm.generate([prompt], SamplingParams(max_tokens=k, stop=[stop], **greedy))[0]
            if out.finish_reason == "stop" and len(out.token_ids) == k:
                return k, stop
    raise AssertionError(f"no stop string ends greedy decoding of {prompt!r} on a later token")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_stop_string_on_the_last_allowed_token_is_stop(url, ref_llm, path):
    # Under qkv serve the front end matches stop strings, and a stop string completed by the
    # token that also reached max_tokens was reported as "length" (the offline engine and the
    # in-process server: "stop", as vLLM).
    from qkv import SamplingParams

    chat = path.endswith("chat/completions")
    prompt = "hello world, how are"
    messages = [{"role": "user", "content": prompt}]
    ids = ref_llm.chat_prompt(messages) if chat else ref_llm.encode(prompt)
    k, stop = _stop_on_last_token(ref_llm, ids)
    want = ref_llm.generate([ids], SamplingParams(max_tokens=k, stop=[stop], temperature=0, ignore_eos=True))[0]
    assert (want.finish_reason, len(want.token_ids)) == ("stop", k) and stop not in want.text
    body = {"max_tokens": k, "stop": [stop], "temperature": 0, "ignore_eos": True,
            **({"messages": messages} if chat else {"prompt": prompt})}
    r = post(url, body, path)
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    text = c["message"]["content"] if chat else c["text"]
    assert (text, c["finish_reason"]) == (want.text, "stop")
    assert r.json()["usage"]["completion_tokens"] == k
    assert stream_all(url, body, path) == [(want.text, "stop")]
    assert_pool_whole(url)


# ---------------------------------------------------------------- streamed logprobs
def _streamed_logprobs(url: str, body: dict) -> dict[int, dict]:
    """Each choice's completions ``logprobs``, joined over the chunks of a stream."""
    import json

    got: dict[int, dict] = {}
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    if c["logprobs"]:
                        acc = got.setdefault(c["index"], {k: [] for k in c["logprobs"]})
                        for k, v in c["logprobs"].items():
                            acc[k] += v
    return got


@pytest.mark.parametrize("kw", [
    {"prompt": "count: one two", "max_tokens": 10, "logprobs": 2},
    {"prompt": "count: one two", "max_tokens": 10, "logprobs": 1, "echo": True},
    {"prompt": ["🙂 count", "hello"], "max_tokens": 6, "logprobs": 0, "echo": True, "n": 2, "seed": 1,
     "temperature": 1.0},
], ids=["plain", "echo", "two-prompts-n2"])
def test_streamed_text_offsets_equal_non_streamed(url, kw):
    # Each chunk's text_offset restarted at 0 (or at the echoed prompt's length) instead of
    # going on from the choice's previous chunk.
    body = {"temperature": 0, "ignore_eos": True, **kw}
    r = post(url, body)
    assert r.status_code == 200, r.text
    whole = {c["index"]: c["logprobs"] for c in r.json()["choices"]}
    streamed = _streamed_logprobs(url, body)
    assert sorted(streamed) == sorted(whole)
    for i, lp in whole.items():
        assert streamed[i]["tokens"] == lp["tokens"]
        assert streamed[i]["text_offset"] == lp["text_offset"]
        assert lp["text_offset"] == sorted(lp["text_offset"]) and len(set(lp["text_offset"])) > 1
    assert_pool_whole(url)


# ---------------------------------------------------------------- /tokenize's chat form
@pytest.mark.parametrize("key", ["messages", "add_generation_prompt", "tools", "special_tokens_in_content"])
def test_tokenize_refuses_reserved_template_variables_by_name(inproc, key):
    # The chat endpoint refused these; /tokenize passed them on: a 500 (LLM.chat_prompt got two
    # `messages`), or `tools` rendered past the tool checks.
    messages = [{"role": "user", "content": "hi"}]
    for path, extra in (("/tokenize", {}), ("/v1/chat/completions", {"max_tokens": 1})):
        r = post(inproc, {"messages": messages, "chat_template_kwargs": {key: [1]}, **extra}, path)
        assert r.status_code == 400, (path, r.text)
        err = r.json()["error"]
        assert err["param"] == "chat_template_kwargs" and repr(key) in err["message"], err
    r = post(inproc, {"messages": messages, "chat_template_kwargs": {"anything": [1]}}, "/tokenize")
    assert r.status_code == 200 and r.json()["count"] > 0, r.text


# ---------------------------------------------------------------- response_format's json_schema
@pytest.mark.parametrize("key,value", [("strict", "no"), ("strict", 1), ("name", 5), ("description", ["x"])])
def test_json_schema_options_of_the_wrong_type_are_refused_by_name(inproc, key, value):
    # They were taken as given ("strict": "no" enforced the schema all the same).
    spec = {"name": "n", "schema": {"type": "object"}, key: value}
    r = post(inproc, {"prompt": "hi", "max_tokens": 2, "response_format": {"type": "json_schema", "json_schema": spec}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == f"response_format.json_schema.{key}", r.text
    ok = {"name": "n", "schema": {"type": "object"}, "strict": False, "description": "d"}
    r = post(inproc, {"prompt": "hi", "max_tokens": 2, "response_format": {"type": "json_schema", "json_schema": ok}})
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------- /metrics against usage
def test_generation_tokens_metric_counts_what_was_served(url, ref_llm):
    # Under qkv serve the engine process runs on past a stop string until the front end's
    # finish command reaches it: those tokens were never served, but qkv_generation_tokens_total
    # counted them (34 for an answer of 23 tokens).
    import time

    from test_server import metrics

    prompt = "hello world, how are"
    k, stop = _stop_on_last_token(ref_llm, ref_llm.encode(prompt))
    before = metrics(url)["qkv_generation_tokens_total"]
    body = {"prompt": prompt, "max_tokens": MAX_LEN - 32, "stop": [stop], "temperature": 0, "ignore_eos": True}
    served = 0
    for _ in range(3):
        r = post(url, body)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "stop", r.text
        served += r.json()["usage"]["completion_tokens"]
    assert served == 3 * k
    assert_pool_whole(url)
    deadline = time.monotonic() + 5  # the engine process's stats reach the front end when it idles
    while (counted := metrics(url)["qkv_generation_tokens_total"] - before) != served and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counted == served


def test_engine_core_uncounts_tokens_made_past_a_finish(model_dir):
    """The same accounting, deterministically: the engine process made 4 tokens before the
    front end's finish (its stop string matched at token 2) came; 2 count as generated."""
    from qkv import LLM, SamplingParams
    from qkv.server import wire
    from qkv.server.engine_core import EngineCore

    llm = LLM(model_dir, device="cpu", num_kv_blocks=32)
    core = EngineCore(llm.engine, "ipc://unused-in", "ipc://unused-out")
    core._send_to = lambda i, msg, must=True: None
    params = wire.params_to_wire(SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    core._apply(["add", ["a"], [llm.encode("hello")], params, None, None], 0)
    for _ in range(4):
        core._entries(llm.engine.step())
    assert llm.engine.stats()["num_generated_tokens"] == 4
    core._apply(["finish", ["a"], [2]], 0)
    s = llm.engine.stats()
    assert s["num_generated_tokens"] == 2 and core.live == {} and core.produced == {}
    assert not llm.engine.has_unfinished() and s["num_blocks_in_use"] == 0


# ---------------------------------------------------------------- chat logprobs' bytes
def test_chat_logprobs_bytes_are_the_tokens_raw_bytes(url, ref_llm):
    # Tokens that each hold part of a character decode alone to U+FFFD; OpenAI's ``bytes`` are
    # the token's raw bytes so that clients can join them (they were U+FFFD's EF BF BD).
    from qkv import SamplingParams

    tok = ref_llm.tokenizer
    allowed = sorted(set(tok.encode("🐦日本", add_special_tokens=False)))
    messages = [{"role": "user", "content": "hi"}]
    want = ref_llm.generate([ref_llm.chat_prompt(messages)], SamplingParams(
        max_tokens=8, temperature=0, ignore_eos=True, allowed_token_ids=allowed))[0]
    r = post(url, {"messages": messages, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                   "allowed_token_ids": allowed, "logprobs": True, "top_logprobs": 2}, "/v1/chat/completions")
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [c["bytes"] for c in content] == [list(tok.token_bytes(t)) for t in want.token_ids]
    assert any(c["token"] == "\ufffd" for c in content)  # the split case was exercised
    # The top entries come from the raw logits (any token); none is U+FFFD's bytes in this vocabulary.
    assert all(t["bytes"] != [0xEF, 0xBF, 0xBD] for c in content for t in c["top_logprobs"])
    assert sum(t["token"] == "\ufffd" for c in content for t in c["top_logprobs"]) > 0
    assert_pool_whole(url)
