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

    llm = LLM(model_dir, device="cpu", num_kv_blocks=48, max_num_seqs=8, max_num_batched_tokens=128,
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

    s = ServeProcess(model_dir, "--num-kv-blocks", "48", "--max-num-seqs", "8", "--max-model-len", str(MAX_LEN),
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


def stream(url: str, body: dict, path: str = "/v1/completions") -> tuple[str, str | None]:
    """(text of choice 0, its finish_reason) of one streamed request."""
    text, reason = "", None
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for c in chunk["choices"]:
                if c["index"] == 0:
                    text += c["text"] if "text" in c else (c["delta"].get("content") or "")
                    reason = c["finish_reason"] or reason
    return text, reason


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
