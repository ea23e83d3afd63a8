"""The roofline's rates for the device in use, measured once and kept on disk.

    device_rates(torch.device("cuda"))  # {"copy_Bps": ..., "matmul_flops": ..., "key": ..., "measured": ...}

``copy_Bps``: bytes/s of a 1 GiB device-to-device copy, read + write counted (what a decode
step's weight and KV reads are held against). ``matmul_flops``: FLOP/s of an 8192^3 bf16
matmul (what prefill is held against). Both the median of timed repeats after a warm-up.
Measuring takes a few seconds, so the result is cached per card (name, torch, CUDA) in
``$QKV_CACHE_DIR`` (else ``$XDG_CACHE_HOME/qkv``, else ``~/.cache/qkv``) as
``device_rates.json``; an unreadable cache is measured again, an unwritable one only costs
the measurement next time.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def cache_path() -> Path:
    root = os.environ.get("QKV_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "qkv")
    return Path(root) / "device_rates.json"


def device_key(device: torch.device) -> str:
    """What the rates depend on: the card (or the CPU) and the software that drives it."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"{name} | torch {torch.__version__} | CUDA {torch.version.cuda}"
    import platform

    return f"cpu {platform.processor() or platform.machine()} x{os.cpu_count()} | torch {torch.__version__}"


def _median_s(fn: Callable[[], object], device: torch.device, reps: int, batch: int = 1) -> float:
    """Seconds per call: the median over ``reps`` samples of ``batch`` back-to-back calls (one
    synchronization per sample, so a GPU's launch and sync overheads stay out of it)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(batch):
            fn()
        sync()
        times.append((time.perf_counter() - t) / batch)
    return statistics.median(times)


@torch.inference_mode()
def measure(device: torch.device) -> dict:
    """Measure the copy and bf16 matmul rates of ``device`` now (seconds on a GPU)."""
    cuda = device.type == "cuda"
    n = (1 << 30) if cuda else (1 << 26)  # a CPU copy of 64 MiB already leaves its caches
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    copy_s = _median_s(lambda: b.copy_(a), device, 9 if cuda else 5, batch=20 if cuda else 1)
    del a, b
    m = 8192 if cuda else 1024
    x = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    mm_s = _median_s(lambda: x @ x, device, 9 if cuda else 3, batch=10 if cuda else 1)
    del x
    if cuda:
        torch.cuda.empty_cache()
    return {"copy_Bps": 2 * n / copy_s, "matmul_flops": 2 * m ** 3 / mm_s}


def device_rates(device: torch.device, path: Path | None = None,
                 measure_fn: Callable[[torch.device], dict] = measure) -> dict:
    """The cached rates of ``device``, measured (and cached) on first use."""
    path = path or cache_path()
    key = device_key(device)
    try:
        cached = json.loads(path.read_text())
        if not isinstance(cached, dict):
            cached = {}
    except (OSError, ValueError):
        cached = {}
    entry = cached.get(key)
    if isinstance(entry, dict) and all(isinstance(entry.get(k), (int, float)) and entry[k] > 0
                                       for k in ("copy_Bps", "matmul_flops")):
        return {**entry, "key": key, "measured": False}
    entry = {k: float(v) for k, v in measure_fn(device).items()}
    cached[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=2))
        tmp.replace(path)  # atomic: concurrent benches never read half a file
    except OSError:
        pass
    return {**entry, "key": key, "measured": True}
