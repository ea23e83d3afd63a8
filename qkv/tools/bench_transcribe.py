"""``qkv bench transcribe FILE [--peer faster-whisper]``: seconds per 30 s of audio (CPU), and
``qkv bench transcribe [FILE] --device cuda --concurrent N``: concurrent 30-second
transcriptions per second with continuous batching (tools/bench_transcribe_gpu.py).

qkv's ``LLM.transcribe`` (greedy, Whisper's suppress rules) and, with ``--peer
faster-whisper``, faster-whisper on the same CTranslate2 ``model.bin`` and the same samples
(greedy, no timestamps, no VAD, float32, the same thread count), one after the other in this
process. Each side runs ``--repeat`` times after a warm-up; the best run is reported, with
whether the two produced the same tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("file", metavar="FILE", nargs="?", default=None,
                    help="audio file (WAV, FLAC, OGG, MP3); optional with --device cuda (synthetic audio)")
    sp.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: N concurrent 30-s transcriptions through one engine (--concurrent)")
    sp.add_argument("--concurrent", type=int, default=1024, help="cuda: requests submitted at once")
    sp.add_argument("--tokens", type=int, default=96, help="cuda: tokens each request decodes (end-of-text ignored)")
    sp.add_argument("--max-num-seqs", type=int, default=256, help="cuda: requests running together at most")
    sp.add_argument("--max-num-batched-tokens", type=int, default=16384,
                    help="cuda: token budget of a step (each admitted request's encoder counts 1500)")
    sp.add_argument("--dtype", default="bfloat16", help="cuda: weights and KV cache dtype")
    sp.add_argument("--random-weights", action="store_true",
                    help="cuda: Whisper base's shape with random weights (no whisper-base packages needed)")
    sp.add_argument("--model", default="whisper-base", help="a Whisper model: named default or CTranslate2 directory")
    sp.add_argument("--threads", type=int, default=2, help="CPU threads, for qkv and the peer")
    sp.add_argument("--language", default="en", help="spoken language (fixed, so that no side detects it)")
    sp.add_argument("--repeat", type=int, default=2, help="timed runs per side after one warm-up; the best counts")
    sp.add_argument("--peer", choices=["faster-whisper", "none"], default="none",
                    help="also run faster-whisper on the same model.bin")
    sp.add_argument("--json", default=None, help="also write the results to this file")


def _best(fn, repeat: int) -> tuple[float, object]:
    result = fn()  # warm-up: first-call allocations, thread pools
    best = float("inf")
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def run(args) -> int:
    import torch

    from qkv import LLM
    from qkv.audio.io import load_audio
    from qkv.audio.features import SAMPLE_RATE
    from qkv.loading.models import NAMED, resolve

    for name in ("threads", "repeat"):  # --threads 0 was torch's RuntimeError, --repeat 0 one timed run unsaid
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.device == "cuda":
        from qkv.tools import bench_transcribe_gpu

        for name in ("concurrent", "tokens", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
        return bench_transcribe_gpu.run(args)
    if args.file is None:
        raise ValueError("FILE: the CPU benchmark needs an audio file (synthetic audio is for --device cuda)")
    if args.random_weights:
        raise ValueError("--random-weights is for --device cuda")
    if args.peer == "faster-whisper":
        try:
            import faster_whisper
        except ImportError:
            raise ValueError("--peer faster-whisper needs faster-whisper: pip install faster-whisper") from None
    samples = load_audio(args.file)
    seconds = samples.numel() / SAMPLE_RATE
    windows = seconds / 30
    torch.set_num_threads(args.threads)
    directory = resolve(args.model) if args.model in NAMED else Path(args.model)
    llm = LLM(str(directory), device="cpu", threads=args.threads)
    t_qkv, ours = _best(lambda: llm.transcribe(samples, language=args.language, response_format="verbose_json"),
                        args.repeat)
    results = {"file": str(args.file), "audio_s": round(seconds, 2), "threads": args.threads,
               "qkv_s_per_30s": round(t_qkv / windows, 3), "qkv_text": ours["text"]}
    print(f"qkv:            {t_qkv:.2f} s for {seconds:.1f} s of audio = {t_qkv / windows:.2f} s per 30 s")
    if args.peer == "faster-whisper":
        if not (directory / "model.bin").is_file():
            raise ValueError(f"{directory}: --peer faster-whisper needs a CTranslate2 directory (model.bin)")
        peer = faster_whisper.WhisperModel(str(directory), device="cpu", compute_type="float32",
                                           cpu_threads=args.threads)
        audio = samples.numpy()

        def peer_run():
            segments, _ = peer.transcribe(audio, language=args.language, beam_size=1, temperature=0.0,
                                          without_timestamps=True, vad_filter=False)
            return [s.tokens for s in segments]

        t_peer, peer_tokens = _best(peer_run, args.repeat)
        same = [s["tokens"] for s in ours["segments"]] == peer_tokens
        results.update(faster_whisper_s_per_30s=round(t_peer / windows, 3), same_tokens=same,
                       speedup=round(t_peer / t_qkv, 3))
        print(f"faster-whisper: {t_peer:.2f} s for {seconds:.1f} s of audio = {t_peer / windows:.2f} s per 30 s")
        print(f"qkv / faster-whisper speed: {t_peer / t_qkv:.2f}x; same tokens: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0
