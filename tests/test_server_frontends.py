"""``qkv serve --api-server-count 2``: two front-end processes in front of one engine process.

Run as real server processes on the tiny random Llama of test_server: greedy streams equal the
offline engine's whichever front end serves them, both front ends serve, a disconnect in a
front end frees its blocks in the engine, and no process outlives the server however it ends
(SIGTERM, SIGKILL of the supervisor, the engine's death, a front end's death).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("zmq")
pytest.importorskip("msgpack")
httpx = pytest.importorskip("httpx")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from test_server import CORPUS, make_model_dir, metrics  # noqa: E402
from test_server_process import children, running, start_serve, wait_gone, wait_healthy  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for child processes")

HEADER = "x-qkv-frontend"


def pgrp(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[2])


class Served:
    """``qkv serve --api-server-count 2`` in a subprocess on a free loopback port. The front ends
    are the children in a process group of their own; the engine is the other spawned child."""

    def __init__(self, model_dir: str, *extra: str):
        self.proc, self.url = start_serve(model_dir, "--served-model-name", "tiny", "--num-kv-blocks", "96",
                                          "--max-num-seqs", "64", "--max-num-batched-tokens", "512",
                                          "--api-server-count", "2", *extra)
        found: dict = {}

        def two_front_ends_and_an_engine() -> bool:
            kids = children(self.proc.pid)
            fronts = sorted(p for p in kids if pgrp(p) == p)
            spawned = [p for p in kids if p not in fronts and b"spawn_main" in _cmdline(p)
                       and b"resource_tracker" not in _cmdline(p)]
            found.update(kids=kids, fronts=fronts, spawned=spawned)
            return len(fronts) == 2 and bool(spawned)

        try:
            wait_healthy(self.proc, self.url, two_front_ends_and_an_engine)
        except BaseException:  # a server that never became healthy is not left running
            self.family = [self.proc.pid, *children(self.proc.pid)]
            self.kill()
            raise
        self.frontends, self.engine = found["fronts"], found["spawned"][0]
        self.family = [self.proc.pid, *found["kids"]]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for p in wait_gone(self.family, 2):
            os.kill(p, signal.SIGKILL)


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny-chat-llama"))


@pytest.fixture(scope="module")
def ref_llm(model_dir):
    from qkv import LLM

    return LLM(model_dir, device="cpu", num_kv_blocks=96)


@pytest.fixture(scope="module")
def served(model_dir):
    s = Served(model_dir, "--shutdown-timeout", "1")
    yield s
    s.kill()


def stream(url: str, body: dict, hang_up_after: int | None = None) -> tuple[str, str | None, str]:
    """(text, finish_reason, front end) of one streamed completion; hangs up after that many events."""
    text, reason, events = "", None, 0
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        front = r.headers[HEADER]
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events += 1
            if events == hang_up_after:
                break
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for c in chunk["choices"]:
                text += c["text"]
                reason = c["finish_reason"] or reason
    return text, reason, front


def concurrently(fn, args: list, timeout: float = 60) -> list:
    results: list = [None] * len(args)

    def run(i):
        results[i] = fn(*args[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return results


def test_refused_flags(capsys):
    from qkv.cli import main

    assert main(["serve", "--model", "x", "--api-server-count", "0"]) == 2
    assert "--api-server-count must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--model", "x", "--api-server-count", "2", "--engine-in-process"]) == 2
    assert "drop --engine-in-process" in capsys.readouterr().err
    # A port already served, even by SO_REUSEPORT sockets we would otherwise join: refused before the model loads.
    import socket

    with socket.create_server(("127.0.0.1", 0), reuse_port=True) as held:
        port = held.getsockname()[1]
        assert main(["serve", "--model", "x", "--api-server-count", "2", "--port", str(port)]) == 1
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_engine_core_routes_to_the_owning_frontend(model_dir):
    """In-process, on a real engine: each front end gets its own requests' outputs and
    acknowledgements, cannot abort another's request, and the core stops once both said shutdown."""
    from qkv import LLM, SamplingParams
    from qkv.server import wire
    from qkv.server.engine_core import EngineCore

    llm = LLM(model_dir, device="cpu", num_kv_blocks=96)
    core = EngineCore(llm.engine, ["ipc://unused-in0", "ipc://unused-in1"], ["ipc://unused-out0", "ipc://unused-out1"])
    sent = []
    core._send_to = lambda i, msg, must=True: sent.append((i, msg))
    params = wire.params_to_wire(SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    ids = llm.encode(CORPUS[0])
    core._apply(["add", ["a"], [ids], params, None, None], 0)
    core._apply(["add", ["b"], [ids], params, None, None], 1)
    core._apply(["add", ["a"], [ids], params, None, None], 1)  # a clashing id: refused, to front end 1 only
    assert sent[:2] == [(0, ["added", "a", None]), (1, ["added", "b", None])]
    assert sent[2][0] == 1 and sent[2][1][:2] == ["added", "a"] and sent[2][1][2][0] == "ValueError"
    per = core._entries(llm.engine.step())
    assert [e[0] for e in per[0]] == ["a"] and [e[0] for e in per[1]] == ["b"]
    core._apply(["abort", ["a"]], 1)  # front end 1 does not own "a"
    assert "a" in core.live
    core._apply(["abort", ["a"]], 0)
    assert "a" not in core.live and "a" not in core.home
    got = []
    while llm.engine.has_unfinished():
        per = core._entries(llm.engine.step())
        assert per[0] == []
        got += per[1]
    assert len(got) == 5 and got[-1][3] == "length" and core.live == {} and core.home == {}
    s = llm.engine.stats()
    assert s["num_blocks_in_use"] == 0 and s["num_blocks_total"] == s["num_blocks_free"] + s["num_blocks_cached"]
    core._apply(["shutdown"], 0)
    assert not core.stopping
    core._apply(["shutdown"], 1)
    assert core.stopping


def test_greedy_streams_equal_offline_from_both_frontends(served, ref_llm):
    from qkv import SamplingParams

    bodies = [{"prompt": CORPUS[i % 4], "max_tokens": 16, "temperature": 0, "ignore_eos": True} for i in range(8)]
    got = concurrently(stream, [(served.url, b) for b in bodies])
    fronts = {g[2] for g in got}
    for _ in range(40):  # the kernel hashes each new connection to one front end
        if fronts == {"0", "1"}:
            break
        r = httpx.post(served.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=30)
        assert r.status_code == 200
        fronts.add(r.headers[HEADER])
    assert fronts == {"0", "1"}
    for body, (text, reason, _) in zip(bodies, got):
        want = ref_llm.generate([body["prompt"]], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
        assert (text, reason) == (want.text, want.finish_reason)
    chat = httpx.post(served.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 8, "temperature": 0}, timeout=60)
    want = ref_llm.generate([ref_llm.chat_prompt([{"role": "user", "content": "hello world"}])],
                            SamplingParams(max_tokens=8, temperature=0))[0]
    assert chat.json()["choices"][0]["message"]["content"] == want.text


def _finished_by_frontend(url: str) -> dict[str, float]:
    """qkv_requests_finished_total (all reasons) as each front end's /metrics reports it."""
    seen: dict[str, float] = {}
    for _ in range(60):  # each scrape is a new connection: the kernel picks its front end
        r = httpx.get(url + "/metrics", timeout=10)
        seen[r.headers[HEADER]] = sum(s.value for fam in text_string_to_metric_families(r.text) for s in fam.samples
                                      if s.name == "qkv_requests_finished_total")
        if len(seen) == 2:
            break
    assert set(seen) == {"0", "1"}
    return seen


def test_metrics_sum_every_frontend(served):
    # Each front end's /metrics held only its own counters and histograms: a scrape saw half
    # the requests, and which half depended on the connection.
    before = _finished_by_frontend(served.url)
    with httpx.Client(timeout=60) as one_connection:  # keep-alive: all three land on one front end
        fronts = {one_connection.post(served.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}
                                      ).headers[HEADER] for _ in range(3)}
    assert len(fronts) == 1
    after = _finished_by_frontend(served.url)
    assert after["0"] == after["1"]
    assert {f: after[f] - before[f] for f in after} == {"0": 3, "1": 3}


def test_disconnects_free_blocks(served):
    """Streams hung up in both front ends: the engine aborts them all and frees their blocks."""
    body = {"prompt": CORPUS[2], "max_tokens": 1000, "ignore_eos": True}
    got = concurrently(stream, [(served.url, body, 3)] * 6)
    assert all(g[0] is not None for g in got)
    deadline = time.monotonic() + 15
    while True:
        ms = [metrics(served.url) for _ in range(4)]  # scrapes land on either front end
        if all(m["qkv_kv_blocks_in_use"] == 0 and m["qkv_requests_running"] == 0 for m in ms) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for m in ms:
        assert m["qkv_kv_blocks_in_use"] == 0 and m["qkv_requests_running"] == 0
        assert m["qkv_kv_blocks_total"] == m["qkv_kv_blocks_free"] + m["qkv_kv_blocks_cached"]
        assert m["qkv_generation_tokens_total"] < 6 * 500  # the engine stopped long before 6 x 1000 tokens


def test_a_reused_request_id_in_both_frontends(served):
    """Clients may reuse an X-Request-Id: the engine ids stay unique across front ends."""
    import qkv.server.app

    if not hasattr(qkv.server.app, "_submissions"):
        pytest.skip("needs app.py's unique engine request ids (wt-bughunt c4d0231)")

    def one():
        body = {"prompt": "hi", "max_tokens": 12, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", served.url + "/v1/completions", json=body, headers={"X-Request-Id": "same"},
                          timeout=60) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert r.status_code == 200 and not any("error" in c for c in chunks)
        return r.headers[HEADER], chunks[-1]["usage"]["completion_tokens"]

    got = concurrently(one, [()] * 16)
    assert {g[1] for g in got} == {12}
    assert {g[0] for g in got} == {"0", "1"}  # all 16 connections hashed to one front end: p = 2**-15


def test_sigterm_drains_every_frontend_and_leaves_no_process(served):
    """Last on this server: open streams in the front ends end with [DONE] after an error event
    (or their own last chunk, if they finished within the drain's grace), the supervisor exits
    and no front end or engine is left."""
    lines: list[list[str]] = [[] for _ in range(4)]

    def listen(i):
        body = {"prompt": CORPUS[3], "max_tokens": 1400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=60) as r:
            lines[i].extend(line for line in r.iter_lines() if line)

    threads = [threading.Thread(target=listen, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(30) in (0, -signal.SIGTERM)
    cut = 0
    for t, got in zip(threads, lines):
        t.join(10)
        # A stream ends cleanly either way: cut by the drain (an error event), or finished in
        # its grace second (a normal last chunk; a fast machine decodes 1,400 tokens in time).
        assert got[-1] == "data: [DONE]", got[-3:]
        finished = '"finish_reason":"length"' in got[-2].replace(" ", "")
        assert finished or "shutting_down" in got[-2], got[-2]
        cut += not finished
    assert cut >= 1  # 4 x 1,400 tokens do not fit the 1,536-token pool in 2 s: the drain cut some
    assert wait_gone(served.family, 10) == []


# ---------------------------------------------------------------- failures
@pytest.fixture(scope="module")
def three(model_dir):
    """Three servers started at once (one for each failure below)."""
    out = concurrently(Served, [(model_dir,)] * 3, timeout=200)
    yield out
    for s in out:
        if s is not None:
            s.kill()


def test_sigkill_of_the_supervisor_ends_every_process(three):
    s = three[0]
    s.proc.kill()
    s.proc.wait()
    assert wait_gone(s.family, 10) == []


def test_engine_death_gives_5xx_in_every_frontend_and_exit(three):
    s = three[1]
    os.kill(s.engine, signal.SIGKILL)
    seen = set()
    for _ in range(40):
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
        if r.status_code == 200:  # the front end has not noticed yet (it looks every 0.2 s)
            time.sleep(0.05)
            continue
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_dead"
        seen.add(r.headers[HEADER])
        if seen == {"0", "1"}:
            break
    assert seen == {"0", "1"}
    assert s.proc.wait(30) == 1
    assert wait_gone(s.family, 10) == []


def test_a_frontend_dying_stops_the_server_loudly(three):
    s = three[2]
    os.kill(s.frontends[1], signal.SIGKILL)
    assert s.proc.wait(30) == 1
    assert wait_gone(s.family, 10) == []
    assert not running(s.engine)
