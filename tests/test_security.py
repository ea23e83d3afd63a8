"""Server hardening: hostile bodies, checks that never wait behind the engine, tenant
isolation of the prefix cache, admission control, graceful shutdown on SIGTERM.

The app runs under uvicorn on 127.0.0.1 with the tiny random chat Llama of test_server.py.
Where a test needs the engine busy, ``engine_paused`` holds the engine thread at the start
of its next ``step`` (a real step runs once released): that is what a long prefill looks
like to the HTTP handlers, only deterministic.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from test_server import CORPUS, Server, _err, aborted, free_port, make_model_dir  # noqa: E402

KEY_A, KEY_B = "key-a-0123456789", "key-b-9876543210"
MAX_LEN = 512


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny-chat-llama-sec"))


@pytest.fixture(scope="module")
def llm(model_dir):
    from qkv import LLM

    return LLM(model_dir, device="cpu", num_kv_blocks=64, max_model_len=MAX_LEN)


@pytest.fixture(scope="module")
def server(llm):
    from qkv.server import ServerLimits, create_app

    app = create_app(llm, "tiny", limits=ServerLimits(max_n=4, max_waiting=2))
    s = Server(app)
    s.app = app
    yield s
    s.stop()
    assert llm.stats()["num_blocks_in_use"] == 0


@contextlib.contextmanager
def engine_paused(llm):
    """Hold the engine thread at the start of its next step until the block exits; yields
    an Event set once the thread is held."""
    held, release = threading.Event(), threading.Event()
    real = llm.engine.step

    def step():
        held.set()
        release.wait(30)
        return real()

    llm.engine.step = step
    try:
        yield held
    finally:
        release.set()
        del llm.engine.step


def post_in_thread(url: str, body: dict, results: list, timeout: float = 60) -> threading.Thread:
    def go():
        try:
            results.append(httpx.post(url, json=body, timeout=timeout))
        except httpx.HTTPError as e:
            results.append(e)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


# ---------------------------------------------------------------- hostile bodies
def test_deeply_nested_json_is_400(server):
    hdr = {"content-type": "application/json"}
    deep = b'{"prompt": "hi", "logprobs": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    _err(httpx.post(server.url + "/v1/completions", content=deep, headers=hdr), 400, "invalid_json", "deep")
    deep_msg = b'{"messages": [{"role": "user", "content": ' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}]}"
    _err(httpx.post(server.url + "/v1/chat/completions", content=deep_msg, headers=hdr), 400, "invalid_json")
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_lone_surrogate_is_400_naming_field(server):
    hdr = {"content-type": "application/json"}
    body = b'{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}'
    e = _err(httpx.post(server.url + "/v1/chat/completions", content=body, headers=hdr), 400, "invalid_value",
             "messages.0.content")
    assert e["param"] == "messages.0.content"
    body = b'{"prompt": ["ok", "\\udfff"], "max_tokens": 2}'
    _err(httpx.post(server.url + "/v1/completions", content=body, headers=hdr), 400, "invalid_value", "prompt.1")
    # A surrogate *pair* is one valid character.
    body = b'{"prompt": "\\ud83d\\ude00", "max_tokens": 2}'
    assert httpx.post(server.url + "/v1/completions", content=body, headers=hdr).status_code == 200


@pytest.mark.parametrize("field,value", [("max_tokens", "5"), ("max_tokens", True), ("n", True), ("n", 1.0),
                                         ("temperature", "0.5"), ("temperature", False), ("seed", "1"),
                                         ("stream", 1), ("ignore_eos", "true"), ("top_k", 1.5),
                                         ("stop_token_ids", ["1"])])
def test_loose_types_are_400(server, field, value):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, field: value})
    _err(r, 400, "invalid_value", field)


def test_int_for_float_is_fine(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "temperature": 0,
                                                         "top_p": 1})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("template,status,code,words", [
    ("{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}", 500, "chat_template_error", "TypeError"),
    ("{{ raise_exception('roles must alternate') }}", 400, "invalid_messages", "roles must alternate"),
])
def test_chat_template_failure_is_a_clear_error(model_dir, tmp_path, template, status, code, words):
    """A template that breaks while rendering is a clear 500 (or a 400 when it refuses the
    messages); a template with a syntax error never gets this far: the load refuses it with
    its line (tests/test_chat_template_errors.py)."""
    from qkv import LLM
    from qkv.server import create_app

    d = Path(shutil.copytree(model_dir, tmp_path / "m"))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    s = Server(create_app(LLM(str(d), device="cpu", num_kv_blocks=8), "tiny"))
    try:
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        e = _err(r, status, code, words)
        assert "Traceback" not in e["message"]
    finally:
        s.stop()


# ---------------------------------------------------------------- checks never wait for the engine
def test_over_context_refused_while_engine_busy(server, llm):
    """Issue 12: a request that can never run used to be refused by the scheduler, on the
    engine thread, after whatever step was running (113 s behind a long prefill)."""
    long_chat = {"messages": [{"role": "user", "content": " ".join(CORPUS[:40])}], "max_tokens": 4}
    results: list = []
    with engine_paused(llm) as held:
        t = post_in_thread(server.url + "/v1/completions", {"prompt": "hello", "max_tokens": 2}, results)
        assert held.wait(20)
        t0 = time.monotonic()
        e = _err(httpx.post(server.url + "/v1/chat/completions", json=long_chat, timeout=10), 400,
                 "context_length_exceeded", str(MAX_LEN))
        _err(httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 600}, timeout=10),
             400, "context_length_exceeded", "600")
        _err(httpx.post(server.url + "/v1/completions", json={"prompt": [99999], "max_tokens": 2}, timeout=10),
             400, "invalid_value", "vocabulary")
        assert time.monotonic() - t0 < 5, "refusals waited for the engine"
        assert e["param"] == "max_tokens"
    t.join(30)
    assert results and results[0].status_code == 200


# ---------------------------------------------------------------- admission control
def test_waiting_queue_bound_is_429_with_retry_after(server, llm):
    loop = server.app.state.engine_loop
    results: list = []
    with engine_paused(llm) as held:
        first = post_in_thread(server.url + "/v1/completions", {"prompt": "hello", "max_tokens": 2}, results)
        assert held.wait(20)  # 1 sequence waits in the scheduler (its step has not run)
        second = post_in_thread(server.url + "/v1/completions", {"prompt": "world", "max_tokens": 2}, results)
        deadline = time.monotonic() + 10
        while loop.num_waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert loop.num_waiting == 2
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "third", "max_tokens": 2}, timeout=10)
        _err(r, 429, "queue_full", "limit of 2")
        assert r.headers["retry-after"] == "1"
    first.join(30), second.join(30)
    assert [r.status_code for r in results] == [200, 200]
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "third", "max_tokens": 2}).status_code == 200


def test_n_above_max_n_is_400(server):
    _err(httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "n": 5}), 400, "invalid_value", "n=5")


# ---------------------------------------------------------------- metrics
def test_abort_counts_sequences(server, llm):
    """An n=4 request whose client hangs up aborts 4 sequences: the counter of finished
    sequences goes up by 4, as it would have had they finished."""
    before = aborted(server.url)
    body = {"prompt": "hello world", "max_tokens": 100, "n": 4, "ignore_eos": True}
    with engine_paused(llm) as held:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(server.url + "/v1/completions", json=body, timeout=0.5)
        assert held.is_set()
        time.sleep(0.3)  # the server notices the hang-up: the abort is queued before the step runs
    deadline = time.monotonic() + 10
    while aborted(server.url) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    assert aborted(server.url) == before + 4


# ---------------------------------------------------------------- tenants
def _cached(url: str, prompt: str, key: str | None = None, salt: str | None = None) -> int:
    body = {"prompt": prompt, "max_tokens": 1}
    if salt is not None:
        body["cache_salt"] = salt
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_api_keys_are_tenants(model_dir):
    """With two keys, neither learns through cached_tokens what prefixes the other sent;
    each still reuses its own."""
    from qkv import LLM
    from qkv.server import create_app

    s = Server(create_app(LLM(model_dir, device="cpu", num_kv_blocks=64), "tiny", api_key=[KEY_A, KEY_B]))
    prompt = " ".join(CORPUS[:4])
    try:
        assert _cached(s.url, prompt, KEY_A) == 0
        assert _cached(s.url, prompt, KEY_A) > 0  # its own prefix: reused
        assert _cached(s.url, prompt, KEY_B) == 0  # the other's: invisible
        assert _cached(s.url, prompt, KEY_B) > 0
        # A request's own cache_salt splits a key's traffic further, and never reaches the other key.
        assert _cached(s.url, prompt, KEY_A, salt="s1") == 0
        assert _cached(s.url, prompt, KEY_A, salt="s1") > 0
        assert _cached(s.url, prompt, KEY_B, salt="s1") == 0
        _err(httpx.post(s.url + "/v1/completions", json={"prompt": "hi"}), 401, "invalid_api_key")
    finally:
        s.stop()


def test_cache_salt_field(server):
    prompt = " ".join(CORPUS[5:9])
    assert _cached(server.url, prompt) == 0
    assert _cached(server.url, prompt, salt="tenant-1") == 0
    assert _cached(server.url, prompt, salt="tenant-1") > 0
    assert _cached(server.url, prompt, salt="tenant-2") == 0
    assert _cached(server.url, prompt) > 0
    _err(httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "cache_salt": ""}), 400,
         "invalid_value", "cache_salt")
    _err(httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "cache_salt": 7}), 400,
         "invalid_value", "cache_salt")


def test_read_keys(tmp_path):
    from qkv.server.tenants import read_keys

    f = tmp_path / "keys"
    f.write_text("# team keys\nk-file-1\n\n  k-file-2  \nk-cli\n")
    assert read_keys(["k-cli"], str(f), env="k-env") == ["k-cli", "k-file-1", "k-file-2", "k-env"]
    assert read_keys(None, None, env="") == []
    with pytest.raises(ValueError, match="missing"):
        read_keys(None, str(tmp_path / "missing"), env="")
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no key"):
        read_keys(None, str(tmp_path / "empty"), env="")


# ---------------------------------------------------------------- shutdown
def _wait_healthy(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "server exited"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("qkv serve did not come up")


def _stream(url: str, body: dict, lines: list, started: threading.Event) -> threading.Thread:
    def go():
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        started.set()
        except httpx.HTTPError as e:
            lines.append(f"ERROR {e!r}")

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def test_sigterm_drains_then_exits(model_dir):
    """``qkv serve`` on SIGTERM: a short stream finishes in full, a long one ends with an error
    event and [DONE] at --shutdown-timeout, and a new request meanwhile gets 503."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("QKV_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "qkv.cli", "serve", "--model", model_dir, "--device", "cpu",
                             "--port", str(port), "--num-kv-blocks", "600", "--shutdown-timeout", "2",
                             "--log-level", "warning"], env=env, stderr=subprocess.PIPE)
    try:
        _wait_healthy(url, proc)
        long_lines, short_lines = [], []
        long_started, short_started = threading.Event(), threading.Event()
        long_t = _stream(url, {"prompt": "hello", "max_tokens": 4000, "stream": True, "ignore_eos": True},
                         long_lines, long_started)
        assert long_started.wait(30)
        short_t = _stream(url, {"prompt": "hi", "max_tokens": 30, "stream": True, "ignore_eos": True},
                          short_lines, short_started)
        assert short_started.wait(30)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # Draining: the socket still accepts, and says why it refuses.
        _err(httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10), 503,
             "shutting_down")
        assert httpx.get(url + "/health", timeout=10).status_code == 503
        short_t.join(30), long_t.join(30)
        assert short_lines[-1] == "data: [DONE]" and '"finish_reason":"length"' in short_lines[-2], short_lines[-3:]
        assert long_lines[-1] == "data: [DONE]", long_lines[-3:]
        assert "shutting_down" in long_lines[-2] and '"error"' in long_lines[-2]
        assert len(long_lines) < 4000
        proc.wait(30)  # uvicorn re-raises the SIGTERM it caught once it has stopped
        assert proc.returncode in (0, -signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
