"""vLLM's plumbing around the OpenAI API: /tokenize, /detokenize, /version, CORS,
X-Request-Id, and vLLM-named metrics with a model_name label. The real app under uvicorn
on loopback (tests/test_server.py's Server), driven by httpx and the official openai client."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from tests.test_server import Server, make_model_dir  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ORIGIN = "http://localhost:5173"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("plumbing"))


@pytest.fixture(scope="module")
def llm(model_dir):
    from qkv import LLM

    return LLM(model_dir, device="cpu", num_kv_blocks=64)


@pytest.fixture(scope="module")
def server(llm):
    from qkv.server import create_app
    from qkv.server.http_plumbing import CORS

    s = Server(create_app(llm, "tiny", cors=CORS([ORIGIN], ["GET", "POST"], ["*"])))
    yield s
    s.stop()
    assert llm.stats()["num_blocks_in_use"] == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=60, max_retries=0)


def test_tokenize_prompt_and_messages(server, client, llm):
    text = "the quick brown fox"
    r = httpx.post(server.url + "/tokenize", json={"model": "tiny", "prompt": text, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == llm.encode(text) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == llm.engine.max_model_len
    assert "".join(body["token_strs"]).replace("Ġ", " ") == text  # byte-level pieces
    # the chat form counts what a chat completion reports as prompt_tokens
    r = httpx.post(server.url + "/tokenize", json={"messages": MESSAGES}).json()
    assert r["tokens"] == llm.chat_prompt(MESSAGES) and r["token_strs"] is None
    answer = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1)
    assert answer.usage.prompt_tokens == r["count"]
    r = httpx.post(server.url + "/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False}).json()
    assert r["tokens"] == llm.chat_prompt(MESSAGES, add_generation_prompt=False)
    for bad, field in [({}, "prompt"), ({"prompt": "a", "messages": MESSAGES}, "prompt"),
                       ({"prompt": "a", "model": "other"}, "model"), ({"prompt": "a", "colour": 1}, "colour")]:
        r = httpx.post(server.url + "/tokenize", json=bad)
        assert r.status_code in (400, 404) and field in r.json()["error"]["message"], (bad, r.text)


def test_tokenize_add_special_tokens():
    """The chat form's add_special_tokens wraps the ids as the post-processor wraps a text."""
    import tokenizers
    from tokenizers import models, processors

    from qkv.loading.tokenizer import Tokenizer
    from qkv.server.tokenize import with_special_tokens

    backend = tokenizers.Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "a": 2, "b": 3}, unk_token="a"))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0),
                                                                                                ("</s>", 1)])
    assert with_special_tokens(Tokenizer(backend), [3, 2]) == [0, 3, 2, 1]


def test_detokenize_and_version(server, llm):
    ids = llm.encode("hello world") + [llm.tokenizer.token_to_id("<|im_end|>")]
    r = httpx.post(server.url + "/detokenize", json={"model": "tiny", "tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": "hello world<|im_end|>"}  # specials kept, as vLLM
    r = httpx.post(server.url + "/detokenize", json={"tokens": [10**6]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    assert httpx.post(server.url + "/detokenize", json={"tokens": []}).json() == {"prompt": ""}
    from qkv import __version__

    assert httpx.get(server.url + "/version").json() == {"version": __version__}


def test_cors_preflight_and_headers(server):
    pre = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(server.url + "/v1/chat/completions", headers=pre)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    assert r.headers["x-request-id"]
    # an origin not on the list gets no permission
    r = httpx.options(server.url + "/v1/chat/completions", headers={**pre, "Origin": "http://evil.example"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = httpx.get(server.url + "/v1/models", headers={"Origin": ORIGIN})
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()


def test_no_cors_headers_by_default(model_dir):
    from qkv import LLM
    from qkv.server import create_app

    s = Server(create_app(LLM(model_dir, device="cpu", num_kv_blocks=16), "tiny"))  # an engine of its own
    try:
        r = httpx.options(s.url + "/v1/models", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"})
        assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    finally:
        s.stop()


def test_request_id_echoed_or_generated(server, client):
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=MESSAGES, max_tokens=2, extra_headers={"X-Request-Id": "trace-42"})
    assert raw.headers["x-request-id"] == "trace-42"
    assert raw.parse().id == "chatcmpl-trace-42"  # the engine's request id, as vLLM's
    with client.completions.with_streaming_response.create(model="tiny", prompt="hi", max_tokens=2, stream=True,
                                                           extra_headers={"X-Request-Id": "s-1"}) as r:
        assert r.headers["x-request-id"] == "s-1"
        assert any("cmpl-s-1" in line for line in r.iter_lines())
    ids = {httpx.get(server.url + path).headers["x-request-id"] for path in ("/health", "/nowhere", "/health")}
    assert len(ids) == 3 and all(len(i) == 32 for i in ids)  # fresh uuid4 hex each time, on 404s too
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1, "model": "nope"},
                   headers={"X-Request-Id": "e-1"})
    assert r.status_code == 404 and r.headers["x-request-id"] == "e-1"
    r = httpx.get(server.url + "/health", headers={"X-Request-Id": "a/b"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Id"


def _samples(url: str) -> list:
    text = httpx.get(url + "/metrics", timeout=10).text
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def test_vllm_metric_names(server, client):
    client.completions.create(model="tiny", prompt="count: one two", max_tokens=3,
                              extra_body={"ignore_eos": True})
    samples = _samples(server.url)
    ours = {s.name: s.value for s in samples if not s.labels}
    theirs = {s.name: s.value for s in samples if s.labels.get("model_name") == "tiny"
              and set(s.labels) == {"model_name"}}
    for vllm, qkv in [("vllm:prompt_tokens_total", "qkv_prompt_tokens_total"),
                      ("vllm:generation_tokens_total", "qkv_generation_tokens_total"),
                      ("vllm:num_preemptions_total", "qkv_num_preemptions_total"),
                      ("vllm:prefix_cache_hits_total", "qkv_cached_prompt_tokens_total"),
                      ("vllm:num_requests_running", "qkv_requests_running"),
                      ("vllm:num_requests_waiting", "qkv_requests_waiting"),
                      ("vllm:time_to_first_token_seconds_count", "qkv_time_to_first_token_seconds_count"),
                      ("vllm:inter_token_latency_seconds_count", "qkv_inter_token_latency_seconds_count"),
                      ("vllm:e2e_request_latency_seconds_count", "qkv_e2e_request_latency_seconds_count"),
                      ("vllm:e2e_request_latency_seconds_sum", "qkv_e2e_request_latency_seconds_sum")]:
        assert theirs[vllm] == ours[qkv], vllm
    assert theirs["vllm:generation_tokens_total"] >= 3 and theirs["vllm:e2e_request_latency_seconds_count"] >= 1
    usage = ours["qkv_kv_blocks_in_use"] / ours["qkv_kv_blocks_total"]
    assert theirs["vllm:kv_cache_usage_perc"] == theirs["vllm:gpu_cache_usage_perc"] == pytest.approx(usage)
    assert theirs["vllm:prefix_cache_queries_total"] == ours["qkv_prompt_tokens_total"]
    done = {s.labels["finished_reason"]: s.value for s in samples if s.name == "vllm:request_success_total"}
    ours_done = {s.labels["finish_reason"]: s.value for s in samples if s.name == "qkv_requests_finished_total"}
    assert done == ours_done and done.get("length", 0) >= 1
