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
``/metrics`` is sampled every 0.1 s for the mean number of running sequences. Prints one row
per run and the server/offline ratio of output tokens per second (the last pass's).
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


def _span(text: str, name: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise ValueError(f"{name} must be min:max with 1 <= min <= max, got {text!r}")
    return lo, hi


def requests(args, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    (ilo, ihi), (olo, ohi) = _span(args.loop_input_len, "--loop-input-len"), _span(args.loop_output_len,
                                                                                   "--loop-output-len")
    return [(" ".join(rng.choice(WORDS) for _ in range(rng.randint(ilo, ihi))), rng.randint(olo, ohi))
            for _ in range(args.loop_requests)]


# -------------------------------------------------------------------- offline
def offline(args, reqs: list[tuple[str, int]]) -> dict:
    """The same requests through ``LLM.generate`` in this process (then its memory is freed)."""
    from qkv import SamplingParams
    from qkv.server.cli import engine_llm

    llm = engine_llm(args, {})
    ids = [llm.chat_prompt([{"role": "user", "content": p}]) for p, _ in reqs]
    params = [SamplingParams(max_tokens=k, temperature=0, ignore_eos=True) for _, k in reqs]
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
async def _chat(http, url: str, prompt: str, max_tokens: int, headers: dict) -> Sample:
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    return await stream(http, url + "/v1/chat/completions", body, headers,
                        lambda choice: choice.get("delta", {}).get("content"))


async def _clients(url: str, reqs: list, clients: int, headers: dict) -> list[Sample]:
    import httpx

    todo, done = deque(reqs), []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as http:
        async def worker():
            while todo:
                prompt, k = todo.popleft()
                done.append(await _chat(http, url, prompt, k, headers))

        await asyncio.gather(*(worker() for _ in range(clients)))
    return done


def _client_proc(url: str, reqs: list, clients: int, headers: dict) -> list[Sample]:
    return asyncio.run(_clients(url, reqs, clients, headers))


def _sample_running(url: str, stop: threading.Event, out: list[float]) -> None:
    import httpx

    while not stop.wait(0.1):
        try:
            for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
                if line.startswith("qkv_requests_running "):
                    out.append(float(line.split()[1]))
        except Exception:
            pass


def closed_loop(url: str, reqs: list, args, headers: dict, pool, name: str) -> dict:
    procs = max(1, min(args.client_procs, args.closed_loop))
    per = [args.closed_loop // procs + (i < args.closed_loop % procs) for i in range(procs)]
    running: list[float] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_running, args=(url, stop, running), daemon=True)
    t0 = time.perf_counter()
    sampler.start()
    futures = [pool.submit(_client_proc, url, reqs[i::procs], per[i], headers) for i in range(procs)]
    samples = [s for f in futures for s in f.result()]
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    ok = [s for s in samples if s.error is None]
    itl = [x for s in ok for x in s.itl]
    ms = 1000.0
    return {"run": name, "requests": len(samples), "failed": len(samples) - len(ok),
            "errors": sorted({s.error for s in samples if s.error})[:3], "wall_s": wall,
            "prompt_tokens": sum(s.prompt_tokens for s in ok), "output_tokens": sum(s.tokens for s in ok),
            "tok_per_s": sum(s.tokens for s in ok) / wall,
            "running_mean": sum(running) / len(running) if running else math.nan,
            **{f"ttft_p{q}_ms": percentile([s.ttft for s in ok], q) * ms for q in (50, 99)},
            **{f"itl_p{q}_ms": percentile(itl, q) * ms for q in (50, 99)}}


def table(rows: list[dict]) -> str:
    lines = ["| run | requests | failed | wall (s) | output tokens | out tok/s | TTFT p50 / p99 (ms) "
             "| ITL p50 / p99 (ms) | mean running |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ttft = f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f}" if "ttft_p50_ms" in r else "-"
        itl = f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f}" if "itl_p50_ms" in r else "-"
        running = "-" if math.isnan(r["running_mean"]) else f"{r['running_mean']:.1f}"
        lines.append(f"| {r['run']} | {r['requests']} | {r['failed']} | {r['wall_s']:.2f} | {r['output_tokens']} "
                     f"| {r['tok_per_s']:,.0f} | {ttft} | {itl} "
                     f"| {running} |")
    return "\n".join(lines)


def run(args, start_server, headers: dict) -> tuple[list[dict], object, str]:
    """Offline first, then the server (started by ``start_server(args)``); returns the rows and
    the running server (proc, url) for the rate sweep that follows."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    reqs = requests(args, args.seed)
    rows = [offline(args, reqs)]
    print(f"offline: {rows[0]['output_tokens']} tokens in {rows[0]['wall_s']:.2f} s", file=sys.stderr, flush=True)
    proc, url = start_server(args)
    procs = max(1, min(args.client_procs, args.closed_loop))
    with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for f in [pool.submit(time.sleep, 0) for _ in range(procs)]:
            f.result()  # the client processes are up before the clock starts
        for i in range(args.loop_passes):
            name = "server, first load" if i == 0 else "server, warm"
            # Earlier passes send other prompts (of the same lengths): the measured one, offline's
            # requests, must find none of its prompts in the prefix cache.
            last = i == args.loop_passes - 1
            rows.append(closed_loop(url, reqs if last else requests(args, args.seed + 1 + i), args, headers,
                                    pool, name))
            r = rows[-1]
            print(f"{name}: {r['output_tokens']} tokens in {r['wall_s']:.2f} s, {r['failed']} failed"
                  + (f" ({r['errors']})" if r["errors"] else ""), file=sys.stderr, flush=True)
    ratio = rows[-1]["tok_per_s"] / rows[0]["tok_per_s"]
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
