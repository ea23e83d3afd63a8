"""``qkv bench serve``: online serving load at several request rates.

Starts ``qkv serve`` in a subprocess on a free 127.0.0.1 port (or uses ``--url``), then for
each rate sends ``--num-requests`` streaming completions whose arrivals form a Poisson
process (seeded), each a fresh random-word prompt of about ``--input-len`` tokens asking
for exactly ``--output-len`` tokens (``ignore_eos``). Reports per rate:

    TTFT       arrival -> first token chunk (p50/p90/p99, ms)
    ITL        gap between successive token chunks of a stream (p50/p90/p99, ms)
    TPOT       (latency - TTFT) / (tokens - 1), mean over requests (ms)
    throughput finished requests/s and generated tokens/s over the rate's wall time

The client runs on the same machine as the server, so on a small CPU it takes a share of it.

``--closed-loop N`` first compares the server with the offline engine on the same chat
requests (bench_loop.py), then runs the rate sweep on the same server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from qkv.cli import add_model_arguments

WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health person "
    "art war history party result change morning reason research girl guy moment air teacher force education"
).split()


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--url", default=None, help="benchmark this running server instead of starting one")
    p.add_argument("--api-key", default=None)
    p.add_argument("--rates", default="0.5,1,inf", help="comma-separated requests/s; inf sends all at once")
    p.add_argument("--num-requests", type=int, default=16, help="requests per rate")
    p.add_argument("--input-len", type=int, default=64, help="prompt length in words (about one token each)")
    p.add_argument("--output-len", type=int, default=32, help="tokens generated per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for the server to load")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--engine-in-process", action="store_true", help="serve with the engine in the server's process")
    p.add_argument("--api-server-count", type=int, default=1, metavar="N", help="front-end processes of the server")
    from qkv.server import bench_loop
    from qkv.tools.shapes import add_arguments as add_shape

    add_shape(p)  # --random-weights SHAPE: with --model's tokenizer
    bench_loop.add_arguments(p)


@dataclass
class Sample:
    ttft: float = math.nan
    latency: float = math.nan
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None
    hung_up: bool = False  # the client closed the stream on purpose (bench_loop's --loop-hangup)


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), nan for no data."""
    xs = sorted(x for x in xs if not math.isnan(x))
    if not xs:
        return math.nan
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one_request(http, url: str, model: str, prompt: str, output_len: int, headers: dict) -> Sample:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    return await stream(http, url + "/v1/completions", body, headers, lambda choice: choice.get("text"))


async def stream(http, url: str, body: dict, headers: dict, text_of, hangup_after: int = 0) -> Sample:
    """POST a streaming request and time it: TTFT at the first chunk whose ``text_of(choice)``
    is non-empty, inter-token latencies after it, token counts from the usage chunk. With
    ``hangup_after`` > 0 the client closes the connection after that many text chunks."""
    s = Sample()
    start = last = time.perf_counter()
    try:
        async with http.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                s.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return s
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    s.error = chunk["error"].get("message")
                    return s
                if chunk.get("usage"):
                    s.tokens = chunk["usage"]["completion_tokens"]
                    s.prompt_tokens = chunk["usage"]["prompt_tokens"]
                if chunk.get("choices") and text_of(chunk["choices"][0]):
                    now = time.perf_counter()
                    if math.isnan(s.ttft):
                        s.ttft = now - start
                    else:
                        s.itl.append(now - last)
                    last = now
                    if hangup_after and len(s.itl) + 1 >= hangup_after:
                        s.hung_up = True  # leaving the block closes the connection mid-stream
                        return s
    except Exception as e:  # a failed request is reported, not fatal to the run
        s.error = f"{type(e).__name__}: {e}"
        return s
    s.latency = time.perf_counter() - start
    return s


async def run_rate(url: str, model: str, rate: float, args, headers: dict) -> dict:
    import httpx

    rng = random.Random(f"{args.seed}-{rate}")
    prompts = [" ".join(rng.choice(WORDS) for _ in range(args.input_len)) for _ in range(args.num_requests)]
    limits = httpx.Limits(max_connections=args.num_requests + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as http:
        tasks = []
        t0 = time.perf_counter()
        for i, prompt in enumerate(prompts):
            if i and math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))
            tasks.append(asyncio.create_task(one_request(http, url, model, prompt, args.output_len, headers)))
        samples = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    ok = [s for s in samples if s.error is None]
    itl = [x for s in ok for x in s.itl]
    tpot = [(s.latency - s.ttft) / (s.tokens - 1) for s in ok if s.tokens > 1]
    ms = 1000.0
    return {
        "rate": rate, "requests": len(samples), "failed": len(samples) - len(ok),
        "errors": sorted({s.error for s in samples if s.error})[:3],
        "prompt_tokens_mean": sum(s.prompt_tokens for s in ok) / max(1, len(ok)),
        "output_tokens": sum(s.tokens for s in ok), "wall_s": wall,
        "req_per_s": len(ok) / wall, "tok_per_s": sum(s.tokens for s in ok) / wall,
        **{f"ttft_p{q}_ms": percentile([s.ttft for s in ok], q) * ms for q in (50, 90, 99)},
        **{f"itl_p{q}_ms": percentile(itl, q) * ms for q in (50, 90, 99)},
        "tpot_mean_ms": sum(tpot) / len(tpot) * ms if tpot else math.nan,
    }


def table(rows: list[dict]) -> str:
    head = ("| rate (req/s) | reqs | failed | TTFT p50 / p90 / p99 (ms) | ITL p50 / p90 / p99 (ms) | TPOT mean (ms) "
            "| req/s | output tok/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        rate = "inf" if math.isinf(r["rate"]) else f"{r['rate']:g}"
        lines.append(f"| {rate} | {r['requests']} | {r['failed']} "
                     f"| {r['ttft_p50_ms']:.0f} / {r['ttft_p90_ms']:.0f} / {r['ttft_p99_ms']:.0f} "
                     f"| {r['itl_p50_ms']:.0f} / {r['itl_p90_ms']:.0f} / {r['itl_p99_ms']:.0f} "
                     f"| {r['tpot_mean_ms']:.0f} | {r['req_per_s']:.2f} | {r['tok_per_s']:.1f} |")
    return "\n".join(lines)


# -------------------------------------------------------------------- the server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    """``qkv serve`` with this run's engine options on a free loopback port; waits for /health."""
    import httpx

    port = _free_port()
    # Not `python -m qkv.cli`: run as __main__, qkv.cli would not recognise its own commands.
    cmd = [sys.executable, "-c", "import sys; from qkv.cli import main; sys.exit(main())", "serve",
           "--model", args.model, "--port", str(port), "--dtype", args.dtype, "--block-size", str(args.block_size),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--max-num-seqs", str(args.max_num_seqs),
           "--log-level", "warning", "--served-model-name", "bench"]
    optional = (("--device", args.device), ("--threads", args.threads), ("--num-kv-blocks", args.num_kv_blocks))
    for flag, value in optional:
        if value is not None:
            cmd += [flag, str(value)]
    if args.no_prefix_caching:
        cmd.append("--no-prefix-caching")
    if getattr(args, "engine_in_process", False):
        cmd.append("--engine-in-process")
    if getattr(args, "api_server_count", 1) != 1:
        cmd += ["--api-server-count", str(args.api_server_count)]
    if getattr(args, "random_weights", None):
        cmd += ["--random-weights", args.random_weights]
    env = {**os.environ, "QKV_API_KEY": ""}  # no key for a private loopback server
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"qkv serve exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"qkv serve did not answer /health within {args.startup_timeout:.0f}s")


async def _warm_up(url: str, model: str, headers: dict) -> Sample:
    import httpx

    async with httpx.AsyncClient(timeout=600) as http:
        return await one_request(http, url, model, "warm up", 4, headers)


def run(args) -> int:
    import httpx

    rates = [float(r) for r in args.rates.split(",")]
    if any(r <= 0 for r in rates) or args.num_requests < 1 or args.output_len < 1 or args.input_len < 1:
        raise ValueError("rates, --num-requests, --input-len and --output-len must be positive")
    proc = None
    try:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        loop_rows = []
        if getattr(args, "closed_loop", 0) and not args.url:
            from qkv.server import bench_loop

            loop_rows, proc, url = bench_loop.run(args, start_server, headers)
            model = "bench"
        elif args.url:
            url, model = args.url.rstrip("/"), None
        else:
            proc, url = start_server(args)
            model = "bench"
        if model is None:
            model = httpx.get(url + "/v1/models", headers=headers, timeout=10).json()["data"][0]["id"]
        warm = asyncio.run(_warm_up(url, model, headers))
        if warm.error:
            raise RuntimeError(f"warm-up request failed: {warm.error}")
        rows = []
        for rate in rates:
            row = asyncio.run(run_rate(url, model, rate, args, headers))
            rows.append(row)
            print(f"rate {rate:g}: {row['requests']} requests in {row['wall_s']:.1f}s, {row['failed']} failed"
                  + (f" ({row['errors']})" if row["errors"] else ""), file=sys.stderr, flush=True)
        print(f"\nqkv bench serve: model {args.model}, ~{args.input_len} prompt words "
              f"(mean {rows[0]['prompt_tokens_mean']:.0f} tokens), {args.output_len} output tokens, "
              f"{args.num_requests} requests per rate\n")
        print(table(rows))
        if args.json:
            with open(args.json, "w") as f:
                plain = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, type(None)))}
                json.dump({"args": plain, "results": rows, "closed_loop": loop_rows}, f, indent=2)
        return 0
    finally:
        if proc is not None:
            proc.terminate()  # SIGTERM: uvicorn shuts down gracefully
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
