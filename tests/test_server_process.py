"""``qkv serve`` with the engine in a process of its own (the default), run as a real server
process: its streams equal the offline engine's, a disconnect frees the blocks in the engine
process, and no process outlives the server however it ends (SIGTERM, SIGKILL, engine death).

The model is test_server's tiny random Llama with a byte-level BPE tokenizer and a chat template.
Each server start imports torch twice (server and engine), so the module starts three.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("zmq")
pytest.importorskip("msgpack")
httpx = pytest.importorskip("httpx")

from test_server import CORPUS, aborted, free_port, make_model_dir, metrics  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for child processes")


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (zombies excluded)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(d))
    return out


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def engine_pid(pid: int) -> int:
    for c in children(pid):
        with open(f"/proc/{c}/cmdline", "rb") as f:
            cmd = f.read()
        if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
            return c
    raise AssertionError(f"no engine process under {pid}: {children(pid)}")


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def start_serve(model_dir, *args: str) -> tuple[subprocess.Popen, str]:
    """``qkv serve --model model_dir --device cpu *args`` on a free loopback port, without an
    API key: (the process, its base URL). It is not ready yet: ``wait_healthy``."""
    port = free_port()
    cmd = [sys.executable, "-c", "import sys; from qkv.cli import main; sys.exit(main())", "serve",
           "--model", str(model_dir), "--device", "cpu", "--port", str(port), "--log-level", "warning", *args]
    return subprocess.Popen(cmd, env={**os.environ, "QKV_API_KEY": ""}), f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen, url: str, ready=lambda: True, seconds: float = 180) -> None:
    """Until /health answers 200 once ``ready()`` holds; fails if the server exits or never does."""
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, f"qkv serve exited with {proc.returncode}"
        assert time.monotonic() < deadline, "qkv serve did not become healthy"
        if ready():
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
        time.sleep(0.2)


class ServeProcess:
    """``qkv serve`` in a subprocess on a free loopback port."""

    def __init__(self, model_dir: str, *extra: str):
        self.proc, self.url = start_serve(model_dir, "--served-model-name", "tiny", "--num-kv-blocks", "96",
                                          "--max-num-seqs", "64", "--max-num-batched-tokens", "512", *extra)
        wait_healthy(self.proc, self.url)
        self.engine = engine_pid(self.proc.pid)
        self.family = [self.engine] + children(self.proc.pid)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for p in wait_gone(self.family, 1):
            os.kill(p, signal.SIGKILL)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny-chat-llama"))


@pytest.fixture(scope="module")
def ref_llm(model_dir):
    from qkv import LLM

    return LLM(model_dir, device="cpu", num_kv_blocks=96)


@pytest.fixture(scope="module")
def served(model_dir):
    s = ServeProcess(model_dir, "--shutdown-timeout", "1")
    yield s
    s.kill()


def stream_text(url: str, body: dict) -> tuple[str, str | None, int]:
    """(text, finish_reason, completion tokens) of one streamed completion."""
    text, reason, tokens = "", None, 0
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True,
                      "stream_options": {"include_usage": True}}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for c in chunk["choices"]:
                text += c["text"]
                reason = c["finish_reason"] or reason
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return text, reason, tokens


# ---------------------------------------------------------------- one server for the happy paths
def test_greedy_streams_equal_offline(served, ref_llm):
    """Concurrent greedy streams (one with a stop string) give the offline engine's text,
    finish reasons and token counts."""
    from qkv import SamplingParams

    cases = [({"prompt": CORPUS[i], "max_tokens": 24, "temperature": 0, "ignore_eos": True}, {}) for i in range(4)]
    ref0 = ref_llm.generate([CORPUS[0]], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    stop = ref0.text[5:8]  # a stop string the greedy text is known to contain
    cases.append(({"prompt": CORPUS[0], "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stop": [stop]},
                  {"stop": [stop]}))
    results: list = [None] * len(cases)

    def run(i):
        results[i] = stream_text(served.url, cases[i][0])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for (body, extra), got in zip(cases, results):
        want = ref_llm.generate([body["prompt"]], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                                  **extra))[0]
        assert got == (want.text, want.finish_reason, len(want.token_ids)), body
    assert results[-1][1] == "stop" and len(results[-1][0]) < len(results[0][0])
    body = {**cases[-1][0], "model": "tiny"}
    whole = httpx.post(served.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert whole["text"] == ref_llm.generate([body["prompt"]], SamplingParams(
        max_tokens=24, temperature=0, ignore_eos=True, stop=[stop]))[0].text


def test_logprobs_and_chat_equal_offline(served, ref_llm):
    from qkv import SamplingParams

    body = {"model": "tiny", "prompt": CORPUS[1], "max_tokens": 8, "temperature": 0, "logprobs": 2}
    got = httpx.post(served.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    want = ref_llm.generate([CORPUS[1]], SamplingParams(max_tokens=8, temperature=0, logprobs=2))[0]
    assert got["text"] == want.text
    assert got["logprobs"]["token_logprobs"] == pytest.approx([e[t].logprob for t, e in
                                                                 zip(want.token_ids, want.logprobs)], abs=1e-5)
    msgs = [{"role": "user", "content": "hello world"}]
    chat = httpx.post(served.url + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 8,
                                                                  "temperature": 0}, timeout=60).json()
    ids = ref_llm.chat_prompt(msgs)
    assert chat["choices"][0]["message"]["content"] == ref_llm.generate(
        [ids], SamplingParams(max_tokens=8, temperature=0))[0].text


def test_samples_prompt_logprobs_and_structured_outputs_cross_the_boundary(served, ref_llm):
    """n=2 seeded samples (one stopped by a stop string, its sibling running on), prompt
    logprobs and a structured-output constraint, through the engine process."""
    from qkv import SamplingParams

    body = {"model": "tiny", "prompt": "hello world", "max_tokens": 12, "temperature": 1.0, "seed": 7, "n": 2,
            "ignore_eos": True, "prompt_logprobs": 1}
    want = [ref_llm.generate(["hello world"], SamplingParams(max_tokens=12, temperature=1.0, seed=7 + i,
                                                             ignore_eos=True, prompt_logprobs=1))[0] for i in range(2)]
    stop = want[0].text[3:5]  # ends sample 0 early; sample 1 (seed 8) most likely not
    want_stopped = [ref_llm.generate(["hello world"], SamplingParams(max_tokens=12, temperature=1.0, seed=7 + i,
                                                                     ignore_eos=True, stop=[stop]))[0]
                    for i in range(2)]
    assert want_stopped[0].finish_reason == "stop"
    r = httpx.post(served.url + "/v1/completions", json={**body, "stop": [stop]}, timeout=60).json()
    got = {c["index"]: c for c in r["choices"]}
    for i in range(2):
        assert (got[i]["text"], got[i]["finish_reason"]) == (want_stopped[i].text, want_stopped[i].finish_reason)
        plp = got[i]["prompt_logprobs"]
        assert plp[0] is None and len(plp) == len(want[i].prompt_token_ids)
        for entry, ref in zip(plp[1:], want[i].prompt_logprobs[1:]):
            assert {int(k): v["logprob"] for k, v in entry.items()} == pytest.approx(
                {t: lp.logprob for t, lp in ref.items()}, abs=1e-5)
    assert r["usage"]["completion_tokens"] == sum(len(w.token_ids) for w in want_stopped)
    choice = httpx.post(served.url + "/v1/completions", json={
        "model": "tiny", "prompt": "pick one:", "max_tokens": 20, "temperature": 0,
        "structured_outputs": {"choice": ["quick brown fox", "lazy dog"]}}, timeout=60).json()
    assert choice["choices"][0]["text"] in ("quick brown fox", "lazy dog"), choice


def test_disconnect_aborts_in_engine_and_frees_blocks(served):
    before = aborted(served.url)
    body = {"prompt": CORPUS[2], "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=60) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got == 3:
                break  # hang up mid-stream
    deadline = time.monotonic() + 10
    while ((m := metrics(served.url))["qkv_kv_blocks_in_use"] or aborted(served.url) == before) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert aborted(served.url) == before + 1
    assert m["qkv_kv_blocks_in_use"] == 0 and m["qkv_requests_running"] == 0
    assert m["qkv_kv_blocks_total"] == m["qkv_kv_blocks_free"] + m["qkv_kv_blocks_cached"]
    assert m["qkv_generation_tokens_total"] < 500  # the engine stopped long before 1000 tokens


def test_sigterm_ends_streams_and_leaves_no_process(served):
    """Last on this server: SIGTERM ends an open stream with [DONE] (after an error event, or its
    own last chunk if it finished within the drain's grace), the server exits (by the signal, re-raised after the drain) and its engine process is gone."""
    lines: list[str] = []

    def listen():
        body = {"prompt": CORPUS[3], "max_tokens": 1400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=60) as r:
            lines.extend(line for line in r.iter_lines() if line)

    t = threading.Thread(target=listen)
    t.start()
    time.sleep(0.5)
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once stopped
    t.join(10)
    # Cut by the drain (an error event), or finished within its grace second on a fast machine
    # (tests/test_security.py's drain test holds a stream that cannot finish).
    assert lines[-1] == "data: [DONE]", lines[-3:]
    assert "shutting_down" in lines[-2] or '"finish_reason":"length"' in lines[-2].replace(" ", ""), lines[-2]
    assert wait_gone(served.family, 10) == []


# ---------------------------------------------------------------- failures
def test_engine_death_gives_5xx_and_exit(model_dir):
    s = ServeProcess(model_dir)
    try:
        answer = {}

        def long_request():
            body = {"prompt": CORPUS[0], "max_tokens": 1400, "ignore_eos": True}
            answer["r"] = httpx.post(s.url + "/v1/completions", json=body, timeout=60)

        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(0.5)
        os.kill(s.engine, signal.SIGKILL)
        t.join(30)
        r = answer["r"]
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_dead"
        deadline = time.monotonic() + 10
        while httpx.get(s.url + "/health", timeout=5).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(s.url + "/health", timeout=5).status_code == 503
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_dead"
        assert s.proc.wait(30) != 0
        assert wait_gone(s.family, 10) == []
    finally:
        s.kill()


def test_sigkill_of_the_server_ends_the_engine(model_dir):
    s = ServeProcess(model_dir)
    try:
        s.proc.kill()
        s.proc.wait()
        assert wait_gone(s.family, 10) == []
    finally:
        s.kill()


def test_a_command_sent_before_the_engine_connects_is_delivered(tmp_path):
    """/health can answer 200 before the engine's command socket has connected: a request sent
    in that window must wait for the engine, not vanish (it used to hang for ever)."""
    import asyncio

    import zmq

    from qkv.engine.request import SamplingParams
    from qkv.server import wire
    from qkv.server.engine_client import EngineClient

    class Process:  # the addresses and liveness of an engine process that has not connected yet
        in_addr, out_addr = f"ipc://{tmp_path}/in", f"ipc://{tmp_path}/out"

        def alive(self):
            return True

    class Engine:
        def stats(self):
            return {}

    async def go():
        client = EngineClient(Process(), Engine())
        client.start()
        client.submit([[1, 2, 3]], SamplingParams(max_tokens=2), "req-1")
        await asyncio.sleep(0.2)  # no peer yet: a dropped message would be gone by now
        ctx = zmq.Context()
        pull = ctx.socket(zmq.PULL)
        pull.connect(Process.in_addr)
        try:
            for _ in range(100):  # the queued send goes out once the peer is there
                await asyncio.sleep(0.05)
                if pull.poll(0):
                    return wire.unpack(pull.recv())
            return None
        finally:
            pull.close(linger=0)
            ctx.term()
            for t in client._tasks:
                t.cancel()
            client._push.close(linger=0)
            client._pull.close(linger=0)
            client._ctx.term()

    msg = asyncio.run(go())
    assert msg is not None and msg[0] == "add" and msg[1] == ["req-1"] and msg[2] == [[1, 2, 3]]
