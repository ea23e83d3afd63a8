"""``qkv bench transcribe --device cuda --concurrent N``: concurrent 30-second transcriptions/s.

``N`` requests, each one 30-s window of its own audio, arrive at once; the engine admits
them as seats (``--max-num-seqs``) and cross pages free up (continuous batching: the encoder
runs for each step's newly admitted requests as one batch, decode steps replay CUDA graphs).
Timed from the samples: log-mel on the card, ``add_request`` (the input check and hash on the
host), then engine steps until every request is done. Every request decodes exactly
``--tokens`` tokens after Whisper's 4 prompt tokens (end-of-text ignored), so the work does
not depend on what the weights say: 96 tokens is about what 30 s of English speech gives
(~150 words a minute, ~1.3 tokens a word). Audio without ``FILE``: a distinct synthetic signal
per request (tones and noise), since what the audio says does not change the work either.

``--random-weights`` builds Whisper base's shape (74 M parameters, the config below) with
random weights on the card, for machines without the ``whisper-base`` packages. The
cross-attention memory is reported as ``qkv memory`` computes it (tools/memory.py
``footprint``), per request and at the peak number of requests running together, beside the
engine's cross pool.
"""

from __future__ import annotations

import time

import torch

# Whisper base (openai/whisper-base's config.json): the shape --random-weights builds.
WHISPER_BASE = dict(model_type="whisper", vocab_size=51865, num_mel_bins=80, encoder_layers=6,
                    encoder_attention_heads=8, decoder_layers=6, decoder_attention_heads=8, d_model=512,
                    encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_source_positions=1500,
                    max_target_positions=448, decoder_start_token_id=50258, eos_token_id=50257)
PROMPT = [50258, 50259, 50359, 50363]  # <|startoftranscript|><|en|><|transcribe|><|notimestamps|>


def synthetic_audio(i: int, device: torch.device) -> torch.Tensor:
    """30 s at 16 kHz: three tones (100-3,000 Hz, seeded by ``i``) and noise, peak about 0.3."""
    from qkv.audio.features import N_SAMPLES, SAMPLE_RATE

    g = torch.Generator().manual_seed(i)
    freqs = (100 + 2900 * torch.rand(3, generator=g)).to(device)
    t = torch.arange(N_SAMPLES, device=device) / SAMPLE_RATE
    x = (0.08 * torch.sin(2 * torch.pi * freqs[:, None] * t)).sum(0)
    return x + 0.02 * torch.randn(N_SAMPLES, generator=g).to(device)


def build_engine(args):
    from qkv.config import ModelConfig
    from qkv.engine.engine import LLMEngine

    kw = dict(dtype=args.dtype, device="cuda", max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, block_size=16)
    if args.random_weights:
        config = ModelConfig.from_hf(WHISPER_BASE, "whisper-base shape (--random-weights)")
        return LLMEngine(config, None, None, **kw), "whisper-base shape, random weights"
    from pathlib import Path

    from qkv.loading import load
    from qkv.loading.models import NAMED, resolve

    loaded = load(str(resolve(args.model) if args.model in NAMED else Path(args.model)))
    return LLMEngine(loaded.config, loaded.weights, loaded.tokenizer, **kw), str(loaded.source)


def cross_memory(engine, running: int, context: int) -> dict:
    """Cross-attention bytes as ``qkv memory`` computes them, and the engine's cross pool."""
    from qkv.tools.memory import footprint

    bits = engine.kv_dtype.itemsize * 8
    fp = footprint(engine.config, context, batch=max(1, running), bits=bits, block_size=engine.kv.block_size)
    (cross,) = [g for g in fp.groups if g.spec.kind == "cross"]
    (pool,) = [g for g, c in zip(engine.kv.groups, engine.kv.cross) if c]
    return {"cross_bytes_per_request": int(cross.bytes_per_sequence),
            "cross_bytes_at_peak": int(cross.bytes_per_sequence) * running,
            "cross_pool_bytes": int(cross.block_bytes) * pool.pool.num_blocks,
            "cross_pool_requests": pool.pool.num_blocks // cross.blocks_per_sequence}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wave(engine, args, first: int, count: int) -> dict:
    """Submit ``count`` requests at once (audio ``first``, ``first + 1``, ... or ``args.samples``)
    and step until all are done. Returns the timings and the peak number running together."""
    from qkv.audio.features import log_mel
    from qkv.engine.request import SamplingParams

    extra = engine.config.extra
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True, skip_special_tokens=False,
                            suppress_token_ids=list(extra.get("suppress_tokens") or []),
                            begin_suppress_token_ids=list(extra.get("begin_suppress_tokens") or []))
    dev = engine.device
    audio = [args.samples.to(dev) if args.samples is not None else synthetic_audio(first + i, dev)
             for i in range(count)]
    sync(dev)
    t0 = time.perf_counter()
    reqs = []
    for i in range(0, count, 64):  # log-mel in batches on the card
        feats = log_mel(torch.stack(audio[i:i + 64]), extra["num_mel_bins"]).cpu()
        for f in feats:
            reqs += engine.add_request(list(PROMPT), params, encoder_features=f)
    t_inputs = time.perf_counter() - t0
    steps = peak = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        peak = max(peak, len(engine.scheduler.running))
    sync(dev)
    wall = time.perf_counter() - t0
    assert all(len(r.output_token_ids) == args.tokens for r in reqs), "a request stopped early"
    return {"wall_s": wall, "inputs_s": t_inputs, "steps": steps, "peak_running": peak}


def run(args) -> int:
    import json
    from pathlib import Path

    if not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible")
    args.samples = None
    if args.file:
        from qkv.audio.features import N_SAMPLES
        from qkv.audio.io import load_audio

        args.samples = load_audio(args.file)[:N_SAMPLES]  # one 30-s window (log_mel pads it)
    engine, what = build_engine(args)
    replays = [0]
    if engine.runner.graphs is not None:
        graph_run = engine.runner.graphs.run
        engine.runner.graphs.run = lambda *a: replays.__setitem__(0, replays[0] + 1) or graph_run(*a)
    wave(engine, args, 10 ** 6, min(args.concurrent, 2 * args.max_num_seqs))  # warm-up: kernels, allocator
    replays[0] = 0
    r = wave(engine, args, 0, args.concurrent)
    s = engine.stats()
    assert s["num_blocks_free"] + s["num_blocks_cached"] == s["num_blocks_total"], "blocks leaked"
    rate = args.concurrent / r["wall_s"]
    mem = cross_memory(engine, r["peak_running"], len(PROMPT) + args.tokens)
    results = {"model": what, "device": torch.cuda.get_device_name(), "dtype": args.dtype,
               "concurrent": args.concurrent, "tokens_per_request": args.tokens,
               "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
               "transcriptions_per_s": round(rate, 1), "wall_s": round(r["wall_s"], 3),
               "inputs_s": round(r["inputs_s"], 3), "decode_tokens_per_s": round(rate * args.tokens),
               "steps": r["steps"], "graph_replays": replays[0], "peak_running": r["peak_running"],
               "num_preemptions": s["num_preemptions"], **mem}
    print(f"{what} on {results['device']}, {args.dtype}: {args.concurrent} concurrent 30-s transcriptions "
          f"({args.tokens} tokens each) in {r['wall_s']:.2f} s = {rate:.1f} transcriptions/s "
          f"(log-mel and input checks {r['inputs_s']:.2f} s; {r['steps']} steps, {replays[0]} graph replays, "
          f"peak {r['peak_running']} running)")
    print(f"cross-attention memory (qkv memory): {mem['cross_bytes_per_request']:,} B per request, "
          f"{mem['cross_bytes_at_peak']:,} B for the {r['peak_running']} running at the peak; engine cross pool "
          f"{mem['cross_pool_bytes']:,} B = {mem['cross_pool_requests']} requests")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0
