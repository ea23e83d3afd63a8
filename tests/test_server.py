"""qkv serve end to end: the real app under uvicorn on 127.0.0.1, driven by the official
``openai`` client (and raw httpx where the client would refuse to send the bad input).

The model is a tiny random Llama saved with ``save_pretrained`` plus a byte-level BPE
tokenizer and a ChatML template, so the HF loader finds a tokenizer and a chat template.
Expected outputs come from qkv's offline ``LLM.generate`` on the same model (the engine's
own parity with transformers is tested elsewhere); the server must reproduce them exactly.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, how are you today?",
          "a paged kv cache stores keys and values in fixed size blocks", "count: one two three four five six",
          "Streaming tokens over server sent events ends with done."] * 20
API_KEY = "test-key-123"
CONTEXT = 4096


def make_model_dir(path, seed: int = 0) -> str:
    """A tiny Llama whose vocabulary is exactly its tokenizer's, with a chat template."""
    import tokenizers
    import torch
    import transformers as tf
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>", "bos_token": None}))
    eos = tok.token_to_id("<|im_end|>")
    cfg = tf.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=CONTEXT, bos_token_id=0, eos_token_id=eos)
    torch.manual_seed(seed)
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving ``app`` in a thread of this process, on a free loopback port."""

    def __init__(self, app, grace: float = 2.0):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=grace)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny-chat-llama"))


@pytest.fixture(scope="module")
def llm(model_dir):
    from qkv import LLM

    # 96 blocks of 16 = 1536 tokens: the load test's 64 streams overflow it, so it preempts.
    return LLM(model_dir, device="cpu", num_kv_blocks=96, max_num_seqs=64, max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def ref_llm(model_dir):
    """A second engine on the same weights for expected outputs: the served engine belongs to
    the server's loop thread, and a test thread stepping it too would race that thread."""
    from qkv import LLM

    return LLM(model_dir, device="cpu", num_kv_blocks=96)


@pytest.fixture(scope="module")
def server(llm):
    from qkv.server import ServerLimits, create_app

    s = Server(create_app(llm, "tiny", limits=ServerLimits(max_n=4, max_body_bytes=64 * 1024)))
    yield s
    s.stop()
    # Graceful shutdown aborted anything left: the pool is whole again.
    assert llm.stats()["num_blocks_in_use"] == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=60, max_retries=0)


def reference(ref_llm, prompt, **kw):
    """The offline engine's answer for ``prompt``."""
    from qkv import SamplingParams

    return ref_llm.generate(prompt, SamplingParams(**kw))


def metrics(url: str, headers=None) -> dict[str, float]:
    text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if not s.labels}


def aborted(url: str) -> float:
    """Sequences the server aborted (client hung up), from the labelled counter."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "qkv_requests_finished_total" and s.labels.get("finish_reason") == "abort")


# ---------------------------------------------------------------- happy paths
def test_completion_matches_offline_engine(client, ref_llm):
    prompt = "the quick brown fox"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    ref = reference(ref_llm, prompt, max_tokens=12, temperature=0)[0]
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(ref_llm.encode(prompt))
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model == "tiny" and r.object == "text_completion"


def test_chat_uses_model_template(client, ref_llm):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    from qkv import SamplingParams

    ref = ref_llm.chat(messages, SamplingParams(max_tokens=10, temperature=0))
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == len(ref_llm.chat_prompt(messages))


@pytest.mark.parametrize("chat", [False, True])
def test_stream_deltas_equal_non_streamed(client, chat):
    kw = dict(model="tiny", max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    if chat:
        args = dict(messages=[{"role": "user", "content": "count: one two"}], **kw)
        full = client.chat.completions.create(**args).choices[0].message.content
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        args = dict(prompt="count: one two", **kw)
        full = client.completions.create(**args).choices[0].text
        chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **args))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full and len(chunks) > 2
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20


def test_stream_ends_with_done(server):
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines)


def test_n2_seeded_samples(client, ref_llm):
    r = client.completions.create(model="tiny", prompt="hello world", max_tokens=8, temperature=1.0, seed=7, n=2,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1]
    # Sample i draws from seed + i: each equals a single request with that seed.
    for c in r.choices:
        ref = reference(ref_llm, "hello world", max_tokens=8, temperature=1.0, seed=7 + c.index, ignore_eos=True)[0]
        assert c.text == ref.text
    assert r.usage.completion_tokens == 16


def test_n2_streaming_covers_both_choices(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 n=2, max_tokens=5, temperature=1.0, seed=3, stream=True,
                                                 extra_body={"ignore_eos": True}))
    done = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert done == {0, 1}


def test_stop_string(client, ref_llm):
    base = reference(ref_llm, "the lazy dog", max_tokens=24, temperature=0, ignore_eos=True)[0].text
    assert len(base) > 4
    stop = base[len(base) // 2:len(base) // 2 + 2]
    expect = base[:base.find(stop)]
    r = client.completions.create(model="tiny", prompt="the lazy dog", max_tokens=24, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == expect and r.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model="tiny", prompt="the lazy dog", max_tokens=24, temperature=0,
                                       stop=stop, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expect


def test_cached_tokens_on_repeated_prompt(client, llm):
    prompt = " ".join(CORPUS[:4])  # several full blocks
    n = len(llm.encode(prompt))
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    block = llm.engine.kv.block_size
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # Every full block but the one holding the last prompt token comes from the cache.
    assert again.usage.prompt_tokens_details.cached_tokens == (n - 1) // block * block > 0
    assert again.choices[0].text == first.choices[0].text


def test_models_health_metrics(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    m = metrics(server.url)
    for name in ["qkv_kv_blocks_total", "qkv_kv_blocks_in_use", "qkv_kv_blocks_cached", "qkv_prefix_cache_hit_rate",
                 "qkv_num_preemptions_total", "qkv_requests_running", "qkv_requests_waiting",
                 "qkv_prompt_tokens_total", "qkv_generation_tokens_total", "qkv_cached_prompt_tokens_total",
                 "qkv_time_to_first_token_seconds_count", "qkv_inter_token_latency_seconds_count"]:
        assert name in m, name
    assert m["qkv_kv_blocks_total"] == 96
    assert m["qkv_time_to_first_token_seconds_count"] > 0 and m["qkv_generation_tokens_total"] > 0


# ---------------------------------------------------------------- errors
def _err(r, status: int, code: str | None = None, contains: str = ""):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"} and isinstance(err["message"], str)
    if code is not None:
        assert err["code"] == code, err
    assert contains in err["message"], err
    return err


def test_bad_requests(server):
    url, post = server.url, httpx.post
    comp, chat = url + "/v1/completions", url + "/v1/chat/completions"
    hdr = {"content-type": "application/json"}
    _err(post(comp, content=b"{not json", headers=hdr), 400, "invalid_json")
    _err(post(comp, content=b"[1, 2]", headers=hdr), 400, "invalid_json")
    _err(post(comp, json={"model": "tiny"}), 400, "invalid_value", "prompt")
    _err(post(comp, json={"prompt": "hi", "max_tokens": "many"}), 400, "invalid_value", "max_tokens")
    _err(post(comp, json={"prompt": "hi", "temperature": -1}), 400, "invalid_value", "temperature")
    _err(post(comp, json={"prompt": 12}), 400, "invalid_value")
    _err(post(comp, json={"prompt": "hi", "seed": 2**70}), 400, "invalid_value", "seed")
    _err(post(comp, json={"prompt": "hi", "model": "gpt-4"}), 404, "model_not_found", "gpt-4")
    e = _err(post(comp, json={"prompt": "hi", "max_tokens": 5000}), 400, "context_length_exceeded")
    assert "5000" in e["message"] and str(CONTEXT) in e["message"]  # the numbers: max_tokens and the context
    e = _err(post(comp, json={"prompt": "hi", "max_tokens": 3000}), 400, "context_length_exceeded")
    assert "96" in e["message"]  # fits the context, never the 96-block pool: the numbers again
    _err(post(comp, json={"prompt": "hi", "n": 5}), 400, "invalid_value", "n=5")
    _err(post(comp, json={"prompt": "x" * 70_000}), 400, "request_too_large")
    _err(post(comp, json={"prompt": [999999]}), 400, "invalid_value", "vocabulary")
    _err(post(comp, json={"prompt": ""}), 400, "invalid_value", "empty")
    _err(post(comp, json={"prompt": "hi", "suffix": "x"}), 400, "unsupported_parameter", "suffix")
    _err(post(chat, json={"messages": []}), 400, "invalid_value", "messages")
    _err(post(chat, json={"messages": [{"role": "wizard", "content": "x"}]}), 400, "invalid_value")
    _err(post(chat, json={"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 7*7 }}"}),
         400, "unsupported_parameter", "template")
    _err(httpx.get(url + "/v1/nothing-here"), 404)
    _err(httpx.get(url + "/v1/completions"), 405)
    # ... and it still serves.
    assert post(comp, json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=5000)
    assert str(CONTEXT) in str(e.value)


def test_api_key(model_dir):
    from qkv import LLM
    from qkv.server import create_app

    s = Server(create_app(LLM(model_dir, device="cpu", num_kv_blocks=32), "tiny", api_key=API_KEY))
    try:
        assert httpx.get(s.url + "/health").status_code == 200  # open, for load balancers
        for path in ["/v1/models", "/metrics"]:
            _err(httpx.get(s.url + path), 401, "invalid_api_key")
            _err(httpx.get(s.url + path, headers={"Authorization": "Bearer wrong"}), 401)
            assert httpx.get(s.url + path, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        _err(httpx.post(s.url + "/v1/completions", json={"prompt": "hi"}), 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="bad", max_retries=0).models.list()
        good = openai.OpenAI(base_url=s.url + "/v1", api_key=API_KEY, max_retries=0)
        assert good.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens >= 1
        # No max_tokens on a pool (32 blocks = 512 tokens) smaller than the context: the default
        # shrinks to what the pool can hold instead of failing the request.
        r = good.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        assert r.usage.total_tokens <= 32 * 16 and r.choices[0].finish_reason in ("stop", "length")
    finally:
        s.stop()


# ---------------------------------------------------------------- load
def test_concurrent_streams_with_disconnects(server):
    """64 streaming clients at once, every fourth hanging up after its first tokens: all the
    others finish in full, and afterwards no KV block is held."""
    import asyncio

    async def one(i: int, http: "httpx.AsyncClient"):
        # Those that hang up ask for far more tokens than they wait for: only an abort stops them.
        body = {"model": "tiny", "prompt": CORPUS[i % 5], "max_tokens": 200 if i % 4 == 0 else 32,
                "temperature": 0.8, "seed": i, "stream": True, "ignore_eos": True}
        got = 0
        async with http.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    return "done", got
                if line.startswith("data: "):
                    got += 1
                    if i % 4 == 0 and got == 3:
                        return "hung up", got  # leaving the block closes the connection mid-stream
        return "cut", got

    async def main():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            return await asyncio.gather(*(one(i, http) for i in range(64)))

    before, aborted_before = metrics(server.url), aborted(server.url)
    results = asyncio.run(main())
    assert sum(r == "hung up" for r, _ in results) == 16
    assert all(r == "done" for i, (r, _) in enumerate(results) if i % 4), results

    deadline = time.monotonic() + 10
    while (m := metrics(server.url))["qkv_kv_blocks_in_use"] != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert m["qkv_kv_blocks_in_use"] == 0
    assert m["qkv_requests_running"] == 0 and m["qkv_requests_waiting"] == 0
    assert m["qkv_kv_blocks_total"] == m["qkv_kv_blocks_free"] + m["qkv_kv_blocks_cached"]
    assert aborted(server.url) - aborted_before == 16
    # Had the 16 run on, they alone would have generated 16 * 200 tokens.
    assert m["qkv_generation_tokens_total"] - before["qkv_generation_tokens_total"] < 48 * 32 + 16 * 100
    assert m["qkv_num_preemptions_total"] > 0  # the pool was too small for all 64: preemption was exercised
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "still there?", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_non_streaming_client_timeout_aborts(server):
    """A plain (non-streamed) request whose client gives up is aborted, not run to the end."""
    before = aborted(server.url)
    body = {"prompt": "hello world", "max_tokens": 1000, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.3)
    deadline = time.monotonic() + 10
    while aborted(server.url) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert aborted(server.url) == before + 1
    deadline = time.monotonic() + 10
    while metrics(server.url)["qkv_kv_blocks_in_use"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metrics(server.url)["qkv_kv_blocks_in_use"] == 0


def test_graceful_shutdown_aborts_open_streams(model_dir):
    from qkv import LLM
    from qkv.server import create_app

    llm = LLM(model_dir, device="cpu", num_kv_blocks=300)
    s = Server(create_app(llm, "tiny"), grace=0.3)  # far too short for 4000 tokens
    lines: list[str] = []
    started = threading.Event()

    def stream():
        body = {"prompt": "hello", "max_tokens": 4000, "stream": True, "ignore_eos": True}
        try:
            with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    started.set()
        except httpx.HTTPError:
            pass  # the server closed the connection: also an acceptable ending

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(20)
    s.stop()
    t.join(15)
    assert not t.is_alive() and not s.thread.is_alive()
    assert "data: [DONE]" not in lines or any("shutting down" in ln for ln in lines)  # cut, not finished
    assert llm.stats()["num_blocks_in_use"] == 0 and not llm.engine.has_unfinished()


@pytest.mark.slow
def test_smollm2_chat_and_stream(smollm2):
    """The real SmolLM2 (GGUF, its own template): the server reproduces the offline chat."""
    from qkv import SamplingParams
    from qkv.server import create_app

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ref = smollm2.chat(messages, SamplingParams(max_tokens=12, temperature=0))
    s = Server(create_app(smollm2, "smollm2"))
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120)
        r = c.chat.completions.create(model="smollm2", messages=messages, max_tokens=12, temperature=0)
        assert r.choices[0].message.content == ref.text
        chunks = c.chat.completions.create(model="smollm2", messages=messages, max_tokens=12, temperature=0,
                                           stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref.text
        assert r.usage.prompt_tokens == len(smollm2.chat_prompt(messages))
    finally:
        s.stop()
    assert smollm2.stats()["num_blocks_in_use"] == 0


def test_bench_serve_against_running_server(server, capsys):
    """`qkv bench serve --url` drives a live server and reports every request as finished."""
    import argparse

    from qkv.server import bench_serve

    p = argparse.ArgumentParser()
    bench_serve.add_arguments(p)
    args = p.parse_args(["--url", server.url, "--rates", "20,inf", "--num-requests", "4", "--input-len", "8",
                         "--output-len", "4"])
    assert bench_serve.run(args) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| 20 ") or ln.startswith("| inf ")]
    assert len(rows) == 2 and all(r.split("|")[2:4] == [" 4 ", " 0 "] for r in rows), out
