"""Adversarial requests against both servers: the in-process app (one engine thread) and a
real ``qkv serve`` (the engine in a process of its own, over ZeroMQ). The project's rule:
bad input gets a 4xx naming the field, never a 500; nothing breaks the server for later
requests; no request leaks cache blocks (afterwards free + cached == total); and what runs
gives the offline engine's greedy output, streamed or not.

The model is test_server's tiny random Llama (byte-level BPE, ChatML template), served with
a small pool so that a leak shows at once.
"""

from __future__ import annotations

import json
import os
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from test_server import Server, make_model_dir, metrics  # noqa: E402

MAX_LEN = 256
MAX_WAITING = 4  # small, so that a leaked admission count turns every request into a 429 soon


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny-adversarial"))


@pytest.fixture(scope="module")
def ref_llm(model_dir):
    from qkv import LLM

    return LLM(model_dir, device="cpu", num_kv_blocks=64, max_model_len=MAX_LEN)


@pytest.fixture(scope="module")
def inproc(model_dir):
    from qkv import LLM
    from qkv.server import ServerLimits, create_app

    llm = LLM(model_dir, device="cpu", num_kv_blocks=24, max_num_seqs=8, max_num_batched_tokens=128,
              max_model_len=MAX_LEN)
    s = Server(create_app(llm, "tiny", limits=ServerLimits(max_n=4, max_waiting=MAX_WAITING)))
    yield s.url
    s.stop()
    assert llm.stats()["num_blocks_in_use"] == 0


@pytest.fixture(scope="module")
def served(model_dir):
    zmq = pytest.importorskip("zmq")  # noqa: F841
    pytest.importorskip("msgpack")
    from test_server_process import ServeProcess

    s = ServeProcess(model_dir, "--num-kv-blocks", "24", "--max-num-seqs", "8", "--max-model-len", str(MAX_LEN),
                     "--max-n", "4", "--max-waiting-requests", str(MAX_WAITING))
    yield s.url
    s.kill()


@pytest.fixture(params=["in-process", "engine-process"])
def url(request):
    return request.getfixturevalue("inproc" if request.param == "in-process" else "served")


def assert_pool_whole(url: str, timeout: float = 10) -> None:
    """Every block is free or cached (none held by a request) once the server is idle."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if m["qkv_kv_blocks_in_use"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert m["qkv_kv_blocks_in_use"] == 0
    assert m["qkv_kv_blocks_free"] + m["qkv_kv_blocks_cached"] == m["qkv_kv_blocks_total"]


def post(url: str, body: dict, path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60)


def refused(r: httpx.Response, param: str) -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param or param in err["message"], err


def still_serves(url: str) -> None:
    r = post(url, {"prompt": "hello", "max_tokens": 2})
    assert r.status_code == 200, r.text


def stream_all(url: str, body: dict, path: str = "/v1/completions") -> list[tuple[str, str | None]]:
    """(text, finish_reason) of each choice of one streamed request, in index order."""
    got: dict[int, list] = {}
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = list(r.iter_lines())
    assert [ln for ln in lines if ln][-1] == "data: [DONE]"
    for line in lines:
        if not line.startswith("data: {"):
            continue
        chunk = json.loads(line[6:])
        assert "error" not in chunk, chunk
        for c in chunk["choices"]:
            text, reason = got.setdefault(c["index"], ["", None])
            got[c["index"]] = [text + (c["text"] if "text" in c else (c["delta"].get("content") or "")),
                               c["finish_reason"] or reason]
    return [tuple(got[i]) for i in sorted(got)]


def stream(url: str, body: dict, path: str = "/v1/completions") -> tuple[str, str | None]:
    """(text of choice 0, its finish_reason) of one streamed request."""
    return stream_all(url, body, path)[0]


# ---------------------------------------------------------------- bad token ids
def test_logit_bias_key_must_be_ascii_digits(inproc):
    # "²".isdigit() is true but int("²") raises: this was a 500.
    for key in ("²", "٣", "1.5", " 1"):
        refused(post(inproc, {"prompt": "hi", "max_tokens": 2, "logit_bias": {key: 1}}), "logit_bias")
    from qkv import SamplingParams

    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={"²": 1.0})
    still_serves(inproc)


@pytest.mark.parametrize("field,value", [("stop_token_ids", [2**70]), ("allowed_token_ids", [2**70]),
                                         ("logit_bias", {str(2**70): 1}), ("stop_token_ids", [5000])])
def test_token_ids_past_the_vocabulary_are_400_and_leak_nothing(url, field, value):
    # Under qkv serve, an id that msgpack cannot carry (>= 2**64) failed after the request was
    # counted as waiting: a 500, and after MAX_WAITING of them every request was a 429.
    for _ in range(MAX_WAITING + 1):
        refused(post(url, {"prompt": "hi", "max_tokens": 2, field: value}), field)
    still_serves(url)
    assert_pool_whole(url)


def test_a_request_the_engine_process_cannot_be_sent_is_400_and_counts_nothing(url):
    # A JSON schema may hold any integer; msgpack carries none >= 2**64. The app answered 500 and
    # the request stayed counted as waiting: after MAX_WAITING of them every request was a 429.
    body = {"prompt": "hi", "max_tokens": 2, "guided_json": {"type": "integer", "maximum": 2**70}}
    for _ in range(MAX_WAITING + 1):
        r = post(url, body)
        assert r.status_code in (200, 400), r.text
    still_serves(url)
    assert_pool_whole(url)


def test_stop_token_id_past_the_vocabulary_with_min_tokens_is_refused(ref_llm):
    # min_tokens bans the stop ids in the logits: an id past the vocabulary failed the whole
    # step (IndexError), and with it every request in the batch.
    from qkv import SamplingParams

    with pytest.raises(ValueError, match="stop_token_ids"):
        ref_llm.generate(["hi"], SamplingParams(max_tokens=3, stop_token_ids=[5000], min_tokens=2))
    assert ref_llm.generate(["hi"], SamplingParams(max_tokens=3))[0].finish_reason == "length"


# ---------------------------------------------------------------- stop strings and streams
def boundary_stop(ref_llm, prompt: str) -> tuple[str, str]:
    """(free greedy text, a stop string made of one token's last character and the next
    token's first): the first token's part of it is text before the stop is complete."""
    from qkv import SamplingParams

    out = ref_llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    pieces = [ref_llm.tokenizer.decode(out.token_ids[:i + 1]) for i in range(len(out.token_ids))]
    for a, b in zip(pieces[1:], pieces[2:]):
        stop = a[-1:] + b[len(a):len(a) + 1]
        if len(b) > len(a) > 1 and b.startswith(a) and "\ufffd" not in stop and out.text.find(stop) == len(a) - 1:
            return out.text, stop
    pytest.skip("no token boundary to put a stop string across")


@pytest.mark.parametrize("chat", [False, True])
def test_stream_never_shows_the_start_of_a_stop_string(url, ref_llm, chat):
    # In-process, the engine streamed each token's text at once: a stop string split across two
    # tokens had its first part streamed before the match cut it from the text.
    from qkv import SamplingParams

    prompt = "the quick brown fox"
    free, stop = boundary_stop(ref_llm, prompt)
    kw = {"max_tokens": 24, "temperature": 0, "ignore_eos": True, "stop": [stop]}
    expect = ref_llm.generate([prompt], SamplingParams(**kw))[0]
    assert expect.text == free[:free.find(stop)] and expect.finish_reason == "stop"
    if chat:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "count: one two"}], **kw}
        whole = post(url, body, path).json()["choices"][0]
        text, reason = whole["message"]["content"], whole["finish_reason"]
    else:
        path, body = "/v1/completions", {"prompt": prompt, **kw}
        whole = post(url, body).json()["choices"][0]
        text, reason = whole["text"], whole["finish_reason"]
        assert (text, reason) == (expect.text, "stop")
    assert stream(url, body, path) == (text, reason)
    # The offline stream too: its deltas add up to the final text.
    assert "".join(o.text_delta for o in ref_llm.stream(prompt, SamplingParams(**kw))) == expect.text
    assert_pool_whole(url)


# ---------------------------------------------------------------- request ids
def test_concurrent_requests_may_share_an_x_request_id(url):
    # The engine's request id was cmpl-<X-Request-Id>: a second live request with the same
    # header was refused (in-process), and under qkv serve it took over the first one's route,
    # so the first request never got another token and hung for ever.
    first = {"prompt": "hi", "max_tokens": 120, "ignore_eos": True, "temperature": 0, "stream": True}
    headers = {"X-Request-Id": "same-id"}
    with httpx.stream("POST", url + "/v1/completions", json=first, headers=headers, timeout=30) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))  # it is running now
        second = httpx.post(url + "/v1/completions", json={"prompt": "hello", "max_tokens": 3},
                            headers=headers, timeout=30)
        assert second.status_code == 200, second.text
        assert second.json()["id"] == "cmpl-same-id"
        rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert rest[-1]["choices"][0]["finish_reason"] == "length" and rest[-1]["id"] == "cmpl-same-id"
    assert_pool_whole(url)


# ---------------------------------------------------------------- disconnects and concurrency
def test_concurrent_streams_with_disconnects_leak_nothing(url):
    """Streams and plain requests (n > 1, stop strings, logprobs, batches) at once; a third
    hang up after their first chunk, a third at once (abort right after submit)."""
    import asyncio

    bodies = [
        {"prompt": "hi", "max_tokens": 40, "n": 2, "temperature": 1.0, "seed": 1, "stop": ["e", "th"]},
        {"prompt": ["a b", "count: one"], "max_tokens": 30, "ignore_eos": True, "logprobs": 2},
        {"prompt": [5, 6, 7], "max_tokens": 50, "n": 3, "temperature": 0.8, "seed": 2, "ignore_eos": True},
        {"prompt": "the quick brown fox", "max_tokens": 60, "stop": ["o"], "include_stop_str_in_output": True},
    ]

    async def one(i: int, http: httpx.AsyncClient) -> None:
        body = {**bodies[i % len(bodies)], "stream": i % 2 == 0}
        mode = i % 3  # 0: read it all, 1: hang up after the first chunk, 2: hang up at once
        try:
            async with http.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
                assert r.status_code in (200, 429), await r.aread()
                if mode == 2:
                    return
                async for line in r.aiter_lines():
                    if mode == 1 and line:
                        return
        except httpx.HTTPError:
            pass

    async def main() -> None:
        async with httpx.AsyncClient() as http:
            await asyncio.gather(*(one(i, http) for i in range(18)))

    asyncio.run(main())
    assert_pool_whole(url)
    still_serves(url)


def test_hang_up_right_after_sending_leaks_nothing(url):
    """The client closes its socket as soon as the request is written: nothing is left running."""
    import socket
    from urllib.parse import urlsplit

    host, port = urlsplit(url).hostname, urlsplit(url).port
    for i in range(12):
        body = json.dumps({"prompt": "hello world", "max_tokens": 100, "ignore_eos": True, "n": 1 + i % 3,
                           "temperature": 1.0, "stream": i % 2 == 0}).encode()
        with socket.create_connection((host, port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert_pool_whole(url)
    still_serves(url)


# ---------------------------------------------------------------- what runs equals the offline engine
@pytest.mark.parametrize("kw", [
    {"max_tokens": 12},
    {"max_tokens": 10, "min_tokens": 4, "stop": ["e", " "], "include_stop_str_in_output": True},
    {"max_tokens": 8, "logit_bias": {"70": 5.0}, "bad_words": ["the"], "repetition_penalty": 1.3},
    {"max_tokens": 8, "allowed_token_ids": [67, 70, 75, 80, 85, 2], "stop_token_ids": [75]},
    {"max_tokens": 9, "n": 2, "temperature": 1.0, "seed": 11, "top_k": 20, "top_p": 0.9},
    {"max_tokens": 14, "n": 3, "temperature": 1.0, "seed": 4, "stop": ["e", "o", " t"]},
], ids=["plain", "stops", "processors", "allowed", "seeded-n2", "seeded-n3-stops"])
def test_outputs_equal_offline(url, ref_llm, kw):
    from qkv import SamplingParams

    batches = [["the quick brown fox", "🙂 count: one two"], [[74, 75, 201], [5]]]  # texts, token ids
    kw = {"temperature": 0, "ignore_eos": True, **kw}
    got, prompts = [], [p for b in batches for p in b]
    for batch in batches:
        r = post(url, {"prompt": batch, **kw})
        assert r.status_code == 200, r.text
        whole = [(c["text"], c["finish_reason"]) for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
        assert stream_all(url, {"prompt": batch, **kw}) == whole
        got += whole
    n = kw.get("n", 1)
    want = []
    for p in prompts:
        for i in range(n):
            one = {**kw, "n": 1, **({"seed": kw["seed"] + i} if "seed" in kw else {})}
            out = ref_llm.generate([p], SamplingParams(**one))[0]
            want.append((out.text, out.finish_reason))
    assert got == want
    assert_pool_whole(url)


# ---------------------------------------------------------------- every field past its bounds
MSG = [{"role": "user", "content": "hi"}]
BAD = [  # (path, body, the field the 400 must name)
    ("c", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("c", {"prompt": "hi", "max_tokens": 2**70}, "max_tokens"),
    ("c", {"prompt": "hi", "max_tokens": MAX_LEN}, "max_tokens"),  # prompt + max_tokens past the context
    ("c", {"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ("c", {"prompt": "hi", "n": 0}, "n"),
    ("c", {"prompt": "hi", "n": 5}, "n"),
    ("c", {"prompt": "hi", "n": True}, "n"),
    ("c", {"prompt": "hi", "best_of": 3}, "best_of"),
    ("c", {"prompt": "hi", "temperature": -0.1}, "temperature"),
    ("c", {"prompt": "hi", "temperature": 2.5}, "temperature"),
    ("c", {"prompt": "hi", "top_p": 0}, "top_p"),
    ("c", {"prompt": "hi", "top_k": -2}, "top_k"),
    ("c", {"prompt": "hi", "top_k": 2**31}, "top_k"),
    ("c", {"prompt": "hi", "min_p": 1.5}, "min_p"),
    ("c", {"prompt": "hi", "seed": 2**63}, "seed"),
    ("c", {"prompt": "hi", "seed": 1.5}, "seed"),
    ("c", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("c", {"prompt": "hi", "prompt_logprobs": -1}, "prompt_logprobs"),
    ("c", {"prompt": "hi", "stop": [""]}, "stop"),
    ("c", {"prompt": "hi", "stop": ["x"] * 17}, "stop"),
    ("c", {"prompt": "hi", "stop": 5}, "stop"),
    ("c", {"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias"),
    ("c", {"prompt": "hi", "logit_bias": {"-5": 1}}, "logit_bias"),
    ("c", {"prompt": "hi", "allowed_token_ids": []}, "allowed_token_ids"),
    ("c", {"prompt": "hi", "bad_words": [" "]}, "bad_words"),
    # 60k bad words held the engine thread for minutes (a list search per word at admission)
    ("c", {"prompt": "hi", "bad_words": [f"w{i}q" for i in range(60_000)]}, "bad_words"),
    ("c", {"prompt": "hi", "stop_token_ids": [7] * 100_000}, "stop_token_ids"),  # a list search per token
    ("c", {"prompt": "hi", "min_tokens": 20, "max_tokens": 2}, "min_tokens"),
    ("c", {"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    ("c", {"prompt": "hi", "frequency_penalty": 3}, "frequency_penalty"),
    ("c", {"prompt": [5000]}, "prompt"),
    ("c", {"prompt": [-1]}, "prompt"),
    ("c", {"prompt": []}, "prompt"),
    ("c", {"prompt": ""}, "prompt"),
    ("c", {"prompt": [[1], []]}, "prompt"),
    ("c", {"prompt": ["a"] * 33}, "prompt"),
    ("c", {"prompt": "hello " * 300}, "max_tokens"),  # the prompt alone is past the context
    ("c", {"prompt": "hi", "suffix": "x"}, "suffix"),
    ("c", {"prompt": "hi", "response_format": {"type": "xml"}}, "response_format"),
    ("c", {"prompt": "hi", "guided_regex": "(("}, "guided_regex"),
    ("c", {"prompt": "hi", "guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),
    ("c", {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ("c", {"prompt": "hi", "tools": []}, "tools"),
    ("c", {"prompt": "hi", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),  # was silently dropped
    ("h", {"messages": MSG, "prompt_logprobs": 0, "stream": True}, "prompt_logprobs"),
    ("c", {"prompt": "hi", "frobnicate": 1}, "frobnicate"),
    ("h", {"messages": []}, "messages"),
    ("h", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("h", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
    ("h", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ("h", {"messages": [{"role": "user", "content": "x", "audio": {"id": "a"}}]}, "messages.0.audio"),
    ("h", {"messages": MSG, "top_logprobs": 2}, "top_logprobs"),
    ("h", {"messages": MSG, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("h", {"messages": MSG, "max_completion_tokens": 0}, "max_completion_tokens"),
    ("h", {"messages": MSG, "max_completion_tokens": MAX_LEN}, "max_tokens"),
    ("h", {"messages": MSG, "tools": [{"type": "retrieval"}]}, "tools"),
    ("h", {"messages": MSG, "tool_choice": "required"}, "tool_choice"),
    ("h", {"messages": MSG, "chat_template": "{{ 7 * 7 }}"}, "chat_template"),
    ("h", {"messages": MSG, "chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ("h", {"messages": MSG, "modalities": ["audio"]}, "modalities"),
    ("h", {"messages": MSG, "reasoning_effort": "high"}, "reasoning_effort"),
    ("h", {"messages": MSG, "echo": True}, "echo"),
]


@pytest.mark.parametrize("path,body,field", BAD, ids=[f"{i}-{f}" for i, (_, _, f) in enumerate(BAD)])
def test_bad_input_is_400_naming_the_field(inproc, path, body, field):
    r = post(inproc, body, "/v1/completions" if path == "c" else "/v1/chat/completions")
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"] or "").startswith(field) and field in err["message"], err


def test_bad_input_under_qkv_serve_is_400_and_leaves_it_serving(served):
    for path, body, field in BAD[::3]:
        r = post(served, body, "/v1/completions" if path == "c" else "/v1/chat/completions")
        assert r.status_code == 400, (body, r.text)
    still_serves(served)
    assert_pool_whole(served)


def test_a_tiny_temperature_is_greedy(url, ref_llm):
    # logits / 1e-300 overflowed float32 (inf - inf = nan): the sampler drew garbage tokens
    # (and a grammar then refused them: finish_reason "abort") instead of the greedy ones.
    from qkv import SamplingParams

    greedy = ref_llm.generate(["hello world"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    for t in (1e-39, 1e-300):
        out = ref_llm.generate(["hello world"], SamplingParams(max_tokens=8, temperature=t, ignore_eos=True, seed=1))
        assert out[0].token_ids == greedy.token_ids
    r = post(url, {"prompt": "hello world", "max_tokens": 8, "temperature": 1e-300, "ignore_eos": True, "seed": 1})
    assert r.json()["choices"][0]["text"] == greedy.text


def test_echo_logprobs_name_the_first_prompt_token(url, ref_llm):
    # The first prompt token has no logprob; its text was "" and every offset after it short.
    ids = ref_llm.encode("the quick brown fox")
    for prompt in ("the quick brown fox", ids):
        body = {"prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": True, "logprobs": 1, "echo": True}
        for c in (post(url, body).json()["choices"][0], None):
            if c is None:  # streamed: the first chunk carries the prompt's tokens
                with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
                    c = json.loads(next(ln for ln in r.iter_lines() if ln.startswith("data: {"))[6:])["choices"][0]
            lp = c["logprobs"]
            assert lp["tokens"][0] == ref_llm.tokenizer.decode(ids[:1]) != ""
            assert lp["token_logprobs"][0] is None
            assert lp["text_offset"][:len(ids)] == [len(ref_llm.tokenizer.decode(ids[:i])) for i in range(len(ids))]
            assert "".join(lp["tokens"][:len(ids)]) == "the quick brown fox"


def test_echoed_token_ids_keep_their_special_tokens(url, ref_llm):
    # A token-id prompt with a special token was echoed without it ("<|im_start|>" skipped) while
    # the logprobs named it: every text_offset after it pointed past the text it described.
    ids = [ref_llm.tokenizer.backend.token_to_id("<|im_start|>")] + ref_llm.encode("the quick brown fox")
    body = {"prompt": ids, "max_tokens": 3, "temperature": 0, "ignore_eos": True, "logprobs": 1, "echo": True}
    c = post(url, body).json()["choices"][0]
    lp = c["logprobs"]
    assert lp["tokens"][0] == "<|im_start|>"
    assert c["text"].startswith("<|im_start|>the quick brown fox")
    for tok, off in zip(lp["tokens"][:len(ids)], lp["text_offset"]):  # the prompt's (ASCII) tokens
        assert c["text"][off:off + len(tok)] == tok


def test_preempted_requests_equal_offline(url, ref_llm):
    """More concurrent work than the pool holds (24 blocks = 384 tokens; 4 x ~125): requests are
    preempted and recomputed, and still give the offline engine's greedy text."""
    import asyncio

    from qkv import SamplingParams

    prompts = [f"{w} quick brown fox" for w in ("the", "count", "hello", "paged")]  # MAX_WAITING
    kw = {"max_tokens": 120, "temperature": 0, "ignore_eos": True}

    async def main():
        async with httpx.AsyncClient(timeout=120) as http:
            rs = await asyncio.gather(*(http.post(url + "/v1/completions", json={"prompt": p, **kw}) for p in prompts))
        return [r.json()["choices"][0]["text"] for r in rs]

    before = metrics(url)["qkv_num_preemptions_total"]
    got = asyncio.run(main())
    want = [o.text for o in ref_llm.generate(prompts, SamplingParams(**kw))]
    assert got == want
    assert metrics(url)["qkv_num_preemptions_total"] > before
    assert_pool_whole(url)


# ---------------------------------------------------------------- random bodies
def _bodies():
    """Request bodies mixing plausible and junk values for every sampling field."""
    from hypothesis import strategies as st

    junk = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, 1, 2, 5, 20, 21, 300]),
                     st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0.0, 1e-300, 0.5, 1.0, 2.0]),
                     st.text(max_size=4), st.sampled_from(["²", "🙂", "<|im_end|>", "e"]),
                     st.lists(st.integers(-1, 400), max_size=3), st.lists(st.sampled_from(["a", "", "🙂", "e "]), max_size=3),
                     st.dictionaries(st.sampled_from(["5", "²", "-1", "319", "320"]), st.integers(-200, 200), max_size=2))
    fields = ["n", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "logprobs", "prompt_logprobs",
              "stop", "logit_bias", "stop_token_ids", "allowed_token_ids", "bad_words", "min_tokens", "ignore_eos",
              "include_stop_str_in_output", "skip_special_tokens", "repetition_penalty", "presence_penalty", "echo",
              "stream", "guided_choice"]
    prompts = st.sampled_from(["hi", "🙂 ok", [1, 2, 3], ["a", "b"], [[5, 6], [7]], "", [], [400]])
    return st.fixed_dictionaries({"prompt": prompts}, optional={f: junk for f in fields}).map(
        lambda b: {**b, "max_tokens": b["max_tokens"] if isinstance(b.get("max_tokens"), int) and 0 < b["max_tokens"] < 8
                   else 4})


def test_random_bodies_never_500(inproc):
    """Whatever the body: 200 with a well-formed answer, or a 4xx; the pool whole afterwards.
    (QKV_FUZZ_EXAMPLES=2000 for a longer hunt.)"""
    from hypothesis import HealthCheck, given, settings

    hunt = "QKV_FUZZ_EXAMPLES" in os.environ

    @settings(max_examples=int(os.environ.get("QKV_FUZZ_EXAMPLES", 40)), deadline=None, derandomize=not hunt,
              suppress_health_check=list(HealthCheck))
    @given(_bodies())
    def check(body):
        if body.get("stream") is True:
            with httpx.stream("POST", inproc + "/v1/completions", json=body, timeout=30) as r:
                text = r.read().decode()
            if r.status_code == 200:
                assert text.rstrip().endswith("data: [DONE]") and '"error"' not in text, text[-300:]
        else:
            r = post(inproc, body)
            if r.status_code == 200:
                assert r.json()["choices"], r.text
        assert r.status_code in (200, 400, 429), (body, r.status_code, r.text if not body.get("stream") else "")

    check()
    assert_pool_whole(inproc)
    still_serves(inproc)


def test_long_stop_strings_do_not_stall_the_server(url, ref_llm):
    # Holding back a possible stop string's start tried every prefix of every stop string, each
    # a copy: 16 stop strings of 60k characters took over a second a token, on the engine thread
    # (in-process) or on the server's event loop (qkv serve): everything else stalled with it.
    from qkv import SamplingParams

    stops = [f"{i:x}" + "e" * 60_000 for i in range(16)]  # the body stays under the 1 MiB limit
    body = {"prompt": "hello world", "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stop": stops}
    r = httpx.post(url + "/v1/completions", json=body, timeout=15)  # seconds, where it took minutes
    assert r.status_code == 200, r.text
    want = ref_llm.generate(["hello world"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert r.json()["choices"][0]["text"] == want.text
    assert stream(url, body) == (want.text, "length")


def test_refused_serve_flags(capsys):
    # --default-max-tokens 0 started a server whose every chat request without max_tokens was a
    # 400 about the client's max_tokens.
    from qkv.cli import main

    assert main(["serve", "--model", "x", "--default-max-tokens", "0"]) == 2
    assert "--default-max-tokens must be at least 1" in capsys.readouterr().err


def test_repeated_allowed_token_ids_count_once(url):
    # Each step built its mask from every entry: 400k repeats of one id cost 0.1 s a step for
    # everything the engine ran. Repeats are dropped; the output is the same.
    from qkv import SamplingParams

    assert SamplingParams(allowed_token_ids=[5, 6, 5] * 1000).allowed_token_ids == [5, 6]
    body = {"prompt": "hi", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    once = post(url, {**body, "allowed_token_ids": [70, 75]}).json()["choices"][0]["text"]
    assert post(url, {**body, "allowed_token_ids": [70, 75] * 100_000}).json()["choices"][0]["text"] == once


def test_prompt_logprobs_keep_the_cache_salt(inproc):
    # Scoring the prompt for prompt_logprobs cached its blocks under the fixed salt "score":
    # a client sending cache_salt "score" hit another client's salted prompt (cached_tokens).
    prompt = " ".join(["streaming tokens over server sent events"] * 3)  # several full blocks
    first = post(inproc, {"prompt": prompt, "max_tokens": 1, "prompt_logprobs": 1, "cache_salt": "secret"})
    assert first.status_code == 200, first.text
    probe = post(inproc, {"prompt": prompt, "max_tokens": 1, "cache_salt": "score"}).json()
    assert probe["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    again = post(inproc, {"prompt": prompt, "max_tokens": 1, "cache_salt": "secret"}).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # its own salt still shares


def test_prompt_logprobs_on_a_full_pool_preempts_and_changes_nothing(model_dir):
    # Scoring the prompt needs free blocks at admission; when running requests held them, the
    # request failed (a 400, then a 429 under load). Now the newest running requests are
    # preempted, as a step that runs dry does, and recomputed later to the same tokens.
    from qkv import LLM, SamplingParams

    holder, scored = list(range(3, 103)), list(range(3, 63))
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    alone = LLM(model_dir, device="cpu", num_kv_blocks=64, max_model_len=128)
    want = alone.generate([holder], greedy, use_tqdm=False)[0].token_ids
    want_lps = alone.engine._prompt_logprobs(scored, 1, None)

    llm = LLM(model_dir, device="cpu", num_kv_blocks=8, max_model_len=128)
    engine = llm.engine
    engine.add_request(holder, greedy, request_id="holder")
    engine.step()  # its 100-token prompt now holds 7 of the 8 blocks
    engine.add_request(scored, SamplingParams(max_tokens=1, prompt_logprobs=1), request_id="scored")
    assert engine.stats()["num_preemptions"] == 1
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] = o
    assert outs["holder"].token_ids == want
    got = outs["scored"].prompt_logprobs
    assert got[0] is None and [next(iter(e)) for e in got[1:]] == scored[1:]
    for e, w in zip(got[1:], want_lps[1:]):
        assert e[next(iter(e))].logprob == pytest.approx(w[next(iter(w))].logprob, rel=1e-4, abs=1e-5)
    u = engine.stats()
    assert u["num_blocks_in_use"] == 0 and u["num_blocks_free"] + u["num_blocks_cached"] == u["num_blocks_total"]


def test_prompt_logprobs_pool_busy_is_429_not_400(model_dir, monkeypatch):
    # Should scoring still find no room (nothing left to preempt), the answer is the load's
    # fault, not the input's: a 429 with Retry-After, not a 400 ("invalid_value").
    from qkv import LLM
    from qkv.engine.scheduler import PoolBusy
    from qkv.server import create_app

    llm = LLM(model_dir, device="cpu", num_kv_blocks=8, max_model_len=128)
    engine = llm.engine
    scored = engine._prompt_logprobs

    def busy(ids, k, salt):
        if k is not None:
            raise PoolBusy("prompt_logprobs: 60 tokens do not fit in the free KV blocks")
        return scored(ids, k, salt)

    monkeypatch.setattr(engine, "_prompt_logprobs", busy)
    s = Server(create_app(llm, "tiny"))
    try:
        r = post(s.url, {"prompt": "hello", "max_tokens": 1, "prompt_logprobs": 1})
        assert r.status_code == 429 and r.headers["retry-after"] and r.json()["error"]["code"] == "server_busy", r.text
        still_serves(s.url)
    finally:
        s.stop()


def test_engine_process_errors_keep_their_kind():
    """... and under qkv serve (the engine process sends the error's kind): PoolBusy stays PoolBusy."""
    import asyncio
    from types import SimpleNamespace

    from qkv.engine.scheduler import PoolBusy, RequestTooLarge
    from qkv.server.engine_client import EngineClient, _Route
    from qkv.server.engine_loop import Stream

    async def added(kind: str):
        client = EngineClient(None, SimpleNamespace(stats=lambda: {}))
        stream = Stream(["r"], asyncio.Queue(), 1)
        client._adding["r"] = _Route(stream, None, {"r": [1]}, 0.0)
        client._added("r", [kind, "message"])
        return type(stream.added.exception())

    for kind, cls in (("PoolBusy", PoolBusy), ("RequestTooLarge", RequestTooLarge), ("ValueError", ValueError)):
        assert asyncio.run(added(kind)) is cls


def test_allowed_token_ids_against_a_grammar(url, ref_llm):
    """allowed_token_ids that leave a structured output's grammar no token: where that shows
    at the first token it is a 400 naming both fields; later, the token the grammar rejects
    never reaches the text and the choice ends with finish_reason "error" (it was "abort",
    with the rejected token's text in the output). No block leaks."""
    pytest.importorskip("llguidance")
    (y,) = ref_llm.tokenizer.encode("y", add_special_tokens=False)
    (x,) = ref_llm.tokenizer.encode("x", add_special_tokens=False)
    r = post(url, {"prompt": "hi", "max_tokens": 4, "allowed_token_ids": [x], "guided_regex": "y[0-9]"})
    refused(r, "allowed_token_ids")
    assert "guided_regex" in r.json()["error"]["message"], r.text
    msgs = [{"role": "user", "content": "hi"}]
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer"}}}
    r = post(url, {"messages": msgs, "max_tokens": 4, "allowed_token_ids": [y], "response_format": fmt},
             "/v1/chat/completions")
    refused(r, "allowed_token_ids")
    assert "response_format" in r.json()["error"]["message"], r.text
    body = {"prompt": "hi", "max_tokens": 4, "allowed_token_ids": [y], "guided_regex": "y[0-9]", "n": 2,
            "temperature": 1.0, "seed": 1, "logprobs": 1}
    r = post(url, body)
    assert r.status_code == 200, r.text
    for c in r.json()["choices"]:
        assert (c["text"], c["finish_reason"]) == ("y", "error"), c
        assert c["logprobs"]["tokens"] == ["y"], c
    assert r.json()["usage"]["completion_tokens"] == 2
    assert stream_all(url, body) == [("y", "error")] * 2
    assert_pool_whole(url)
    still_serves(url)
