"""``qkv bench serve --closed-loop N``: the same chat requests offline and through a live server.

    qkv bench serve --random-weights llama3.2-1b --model TOKENIZER_DIR --closed-loop 128 \\
        --loop-requests 512 --client-procs 8 --max-num-seqs 128 --rates 16,32

The requests: ``--loop-requests`` chats of one user message of random words (``--loop-input-len``
words, min:max) asking for exactly ``--loop-output-len`` tokens (min:max, ``ignore_eos``,
greedy). First the offline engine runs them all at once (``LLM.generate``, the same engine
options); its memory is released, then ``qkv serve`` starts and ``N`` streaming clients, spread
over ``--client-procs`` processes so the client is not the bottleneck, keep N requests open
until all are done, ``--loop-passes`` times (the first pass is the first load after start-up;
all but the last send other prompts of the same lengths, so the last, offline's requests,
meets a prefix cache that holds none of them).
``/metrics`` is sampled every 0.1 s for the number of running sequences, reported twice: over
the whole pass, and over the closed loop proper, until the first client process has sent its
last request (after that its clients go idle one by one and the pass drains, as any finite
run does). After each pass the server must settle to 0 running and 0 KV blocks in use.
``--loop-hangup FRAC`` adds one more pass in which that fraction of the requests (seeded) close
their stream after a random number of chunks; the others must all succeed. Prints one row per
run and the server/offline ratio of output tokens per second (the last measured pass's).
"""

from __future__ import annotations

import asyncio
import gc
import math
import random
import sys
import threading
import time
from collections import deque

from qkv.server.bench_serve import WORDS, Sample, percentile, stream


def add_arguments(p) -> None:
    p.add_argument("--closed-loop", type=int, default=0, metavar="CLIENTS",
                   help="also run CLIENTS streaming chat clients in a closed loop and the same requests offline")
    p.add_argument("--loop-requests", type=int, default=512, help="closed-loop chat requests")
    p.add_argument("--loop-input-len", default="100:1100", help="closed-loop prompt words, min:max")
    p.add_argument("--loop-output-len", default="16:256", help="closed-loop output tokens, min:max")
    p.add_argument("--loop-passes", type=int, default=2,
                   help="closed-loop passes (the first: right after start-up; the last: offline's requests)")
    p.add_argument("--client-procs", type=int, default=1, help="client processes for the closed loop")
    p.add_argument("--loop-hangup", type=float, default=0.0, metavar="FRAC",
                   help="then one more pass in which this fraction of the requests hang up mid-stream")


def _span(text: str, name: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise ValueError(f"{name} must be min:max with 1 <= min <= max, got {text!r}")
    return lo, hi


def requests(args, seed: int, hangup: float = 0.0) -> list[tuple[str, int, int]]:
    """(prompt, max_tokens, hang up after this many chunks or 0) per request."""
    rng = random.Random(seed)
    (ilo, ihi), (olo, ohi) = _span(args.loop_input_len, "--loop-input-len"), _span(args.loop_output_len,
                                                                                   "--loop-output-len")
    out = []
    for _ in range(args.loop_requests):
        prompt, k = " ".join(rng.choice(WORDS) for _ in range(rng.randint(ilo, ihi))), rng.randint(olo, ohi)
        out.append((prompt, k, rng.randint(1, max(1, k // 2)) if rng.random() < hangup else 0))
    return out


# -------------------------------------------------------------------- offline
def offline(args, reqs: list[tuple[str, int]]) -> dict:
    """The same requests through ``LLM.generate`` in this process (then its memory is freed)."""
    from qkv import SamplingParams
    from qkv.server.cli import engine_llm

    llm = engine_llm(args, {})
    ids = [llm.chat_prompt([{"role": "user", "content": p}]) for p, _, _ in reqs]
    params = [SamplingParams(max_tokens=k, temperature=0, ignore_eos=True) for _, k, _ in reqs]
    llm.generate(ids[:16], params[:16], use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(ids, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    row = {"run": "offline", "requests": len(reqs), "failed": 0, "wall_s": wall,
           "prompt_tokens": sum(len(i) for i in ids), "output_tokens": sum(len(o.token_ids) for o in outs),
           "running_mean": math.nan}  # not sampled: all requests are queued at once
    row["tok_per_s"] = row["output_tokens"] / wall
    del llm, outs
    gc.collect()
    try:
        import torch

        torch.cuda.empty_cache()
    except Exception:
        pass
    return row


# -------------------------------------------------------------------- closed loop
async def _chat(http, url: str, prompt: str, max_tokens: int, headers: dict, hangup_after: int) -> Sample:
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    return await stream(http, url + "/v1/chat/completions", body, headers,
                        lambda choice: choice.get("delta", {}).get("content"), hangup_after)


async def _clients(url: str, reqs: list, clients: int, headers: dict) -> tuple[list[Sample], float]:
    """The samples, and when the last request was taken (from then on clients go idle)."""
    import httpx

    todo, done, emptied = deque(reqs), [], [time.perf_counter()]
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as http:
        async def worker():
            while todo:
                prompt, k, hangup_after = todo.popleft()
                if not todo:
                    emptied[0] = time.perf_counter()
                done.append(await _chat(http, url, prompt, k, headers, hangup_after))

        await asyncio.gather(*(worker() for _ in range(clients)))
    return done, emptied[0]


def _client_ready() -> None:
    """Run once in each client process before the first pass: its imports (0.1-0.2 s of httpx)
    must not count in the first load's wall time, which measures the server."""
    import httpx  # noqa: F401


def _client_proc(url: str, reqs: list, clients: int, headers: dict) -> tuple[list[Sample], float]:
    return asyncio.run(_clients(url, reqs, clients, headers))


def _gauges(url: str, headers: dict) -> dict[str, float]:
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", headers=headers, timeout=5).text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("qkv_requests_running", "qkv_requests_waiting", "qkv_kv_blocks_in_use"):
            out[name] = float(value)
    return out


def _sample_running(url: str, headers: dict, stop: threading.Event, out: list[tuple[float, float]]) -> None:
    while not stop.wait(0.1):
        try:
            out.append((time.perf_counter(), _gauges(url, headers)["qkv_requests_running"]))
        except Exception:
            pass


def _settle(url: str, headers: dict, timeout: float = 30.0) -> float:
    """KV blocks in use once nothing runs or waits (nan if that never happens within ``timeout``)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        try:
            g = _gauges(url, headers)
            if g.get("qkv_requests_running", 1) == 0 and g.get("qkv_requests_waiting", 1) == 0:
                return g.get("qkv_kv_blocks_in_use", math.nan)
        except Exception:
            pass
        time.sleep(0.2)
    return math.nan


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def closed_loop(url: str, reqs: list, args, headers: dict, pool, name: str) -> dict:
    procs = max(1, min(args.client_procs, args.closed_loop))
    per = [args.closed_loop // procs + (i < args.closed_loop % procs) for i in range(procs)]
    running: list[tuple[float, float]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_running, args=(url, headers, stop, running), daemon=True)
    t0 = time.perf_counter()
    sampler.start()
    futures = [pool.submit(_client_proc, url, reqs[i::procs], per[i], headers) for i in range(procs)]
    results = [f.result() for f in futures]
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    samples = [s for done, _ in results for s in done]
    loop_end = min(emptied for _, emptied in results)
    hung = [s for s in samples if s.hung_up]
    ok = [s for s in samples if s.error is None and not s.hung_up]
    itl = [x for s in ok for x in s.itl]
    ms = 1000.0
    return {"run": name, "requests": len(samples), "failed": len(samples) - len(ok) - len(hung),
            "hung_up": len(hung), "errors": sorted({s.error for s in samples if s.error})[:3], "wall_s": wall,
            "prompt_tokens": sum(s.prompt_tokens for s in ok), "output_tokens": sum(s.tokens for s in ok),
            "tok_per_s": sum(s.tokens for s in ok) / wall,
            "running_mean": _mean([r for _, r in running]),
            "running_mean_loop": _mean([r for t, r in running if t <= loop_end]),
            "loop_s": loop_end - t0,
            "blocks_in_use_after": _settle(url, headers),
            **{f"ttft_p{q}_ms": percentile([s.ttft for s in ok], q) * ms for q in (50, 99)},
            **{f"itl_p{q}_ms": percentile(itl, q) * ms for q in (50, 99)}}


def table(rows: list[dict]) -> str:
    lines = ["| run | requests | failed | hung up | wall (s) | output tokens | out tok/s | TTFT p50 / p99 (ms) "
             "| ITL p50 / p99 (ms) | mean running: loop (s) / whole pass | blocks in use after |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ttft = f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f}" if "ttft_p50_ms" in r else "-"
        itl = f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f}" if "itl_p50_ms" in r else "-"
        running = "-" if "loop_s" not in r else \
            f"{r['running_mean_loop']:.1f} ({r['loop_s']:.2f} s) / {r['running_mean']:.1f}"
        after = f"{r['blocks_in_use_after']:.0f}" if "blocks_in_use_after" in r else "-"
        lines.append(f"| {r['run']} | {r['requests']} | {r['failed']} | {r.get('hung_up', 0)} | {r['wall_s']:.2f} "
                     f"| {r['output_tokens']} | {r['tok_per_s']:,.0f} | {ttft} | {itl} | {running} | {after} |")
    return "\n".join(lines)


def _report(r: dict) -> None:
    print(f"{r['run']}: {r['output_tokens']} tokens in {r['wall_s']:.2f} s, {r['failed']} failed, "
          f"{r['hung_up']} hung up, {r['blocks_in_use_after']:.0f} KV blocks in use after"
          + (f" ({r['errors']})" if r["errors"] else ""), file=sys.stderr, flush=True)


def run(args, start_server, headers: dict) -> tuple[list[dict], object, str]:
    """Offline first, then the server (started by ``start_server(args)``); returns the rows and
    the running server (proc, url) for the rate sweep that follows."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    if not 0 <= args.loop_hangup <= 1 or args.loop_passes < 1:
        raise ValueError("--loop-hangup must be a fraction in [0, 1] and --loop-passes at least 1")
    reqs = requests(args, args.seed)
    rows = [offline(args, reqs)]
    print(f"offline: {rows[0]['output_tokens']} tokens in {rows[0]['wall_s']:.2f} s", file=sys.stderr, flush=True)
    proc, url = start_server(args)
    procs = max(1, min(args.client_procs, args.closed_loop))
    with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for f in [pool.submit(_client_ready) for _ in range(procs)]:
            f.result()  # the client processes are up, this module and httpx imported, before the clock starts
        for i in range(args.loop_passes):
            name = "server, first load" if i == 0 else "server, warm"
            # Earlier passes send other prompts (of the same lengths): the measured one, offline's
            # requests, must find none of its prompts in the prefix cache.
            last = i == args.loop_passes - 1
            rows.append(closed_loop(url, reqs if last else requests(args, args.seed + 1 + i), args, headers,
                                    pool, name))
            _report(rows[-1])
        measured = rows[-1]
        if args.loop_hangup:
            reqs = requests(args, args.seed + args.loop_passes + 1, args.loop_hangup)
            rows.append(closed_loop(url, reqs, args, headers, pool, f"server, {args.loop_hangup:.0%} hang up"))
            _report(rows[-1])
    ratio = measured["tok_per_s"] / rows[0]["tok_per_s"]
    mode = "engine in the server's process" if getattr(args, "engine_in_process", False) else "engine process"
    if getattr(args, "api_server_count", 1) > 1:
        mode += f", {args.api_server_count} front ends"
    for r in rows[1:]:
        r["run"] += f" ({mode})"
    model = getattr(args, "random_weights", None) or args.model
    print(f"\nqkv bench serve --closed-loop {args.closed_loop}: model {model}, {args.loop_requests} chat requests, "
          f"{args.client_procs} client processes\n")
    print(table(rows))
    print(f"\nserver/offline output tok/s: {ratio:.2f}×\n", flush=True)
    return rows, proc, url
