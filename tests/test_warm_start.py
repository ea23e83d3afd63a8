"""Warm start (issue 20): start-up compiles every Triton kernel variant that serving launches,
so no step of a run JIT-compiles. On the GPU the compiled-variant caches of the kernels are
counted before and after a workload; without CUDA the kernels run in Triton's interpreter and
every launch's specialization key (constants, int classes, dtypes, alignment: what Triton
compiles a variant per) is compared instead."""

from __future__ import annotations

import inspect
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported: set it before
try:
    import triton
except ImportError:  # pragma: no cover - depends on the machine
    pytest.skip("triton is not installed", allow_module_level=True)

from qkv.attention.triton import decode, prefill  # noqa: E402
from qkv.attention.triton.decode import num_splits  # noqa: E402
from qkv.engine import gpu  # noqa: E402
from qkv.engine.request import SamplingParams  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _workload(eng, lens: list[int], max_tokens: int = 6) -> None:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    gen = torch.Generator().manual_seed(3)
    for n in lens:
        eng.add_request(torch.randint(2, 250, (n,), generator=gen).tolist(), params)
    while eng.has_unfinished():
        eng.step()


@pytest.mark.parametrize("block_n", [64, 128])  # 128: fp8 caches
def test_warm_lengths_give_every_split_count(block_n):
    """Every split count an eager decode launch can pick (any batch, any length up to
    max_model_len) is one a warm-up step picks: a one-sequence decode or a two-sequence mixed
    step at one of ``warm_lengths``."""
    for max_model_len in (100, 256, 300, 4096, 5000, 131072):
        for kvh in (1, 2, 8, 32):
            warm = {num_splits(b, kvh, n, block_n) for b in (1, 2) for n in gpu.warm_lengths(max_model_len)}
            seen = {num_splits(b, kvh, n, block_n) for b in (1, 2, 3, 7, 64, 256)
                    for n in range(1, max_model_len + 1, 37)}
            assert seen <= warm, (max_model_len, kvh, sorted(seen - warm))
            assert all(s & (s - 1) == 0 for s in seen)  # powers of two: six variants at most


@pytest.mark.parametrize("kvh", [1, 5, 8, 32])
def test_warm_batches_give_every_packed_launch_shape(kvh):
    """Every (tiling, split count, launch order) the int8/int4 decode kernel can pick for a step
    of any sequence count up to ``max_num_seqs`` and any length up to ``max_model_len`` is one
    that a warm-up step picks (the 1000/1000 run compiled two late: 66 and 131 sequences)."""
    from qkv.attention.triton import order, packed

    for D in (128, 256):
        for nbits in (4, 8):
            def shape(b, n):
                return packed.launch_shape(b, kvh, D, nbits, n, True) + (b * kvh >= order.MIN_ROWS,)

            for max_model_len in (100, 4096):
                for max_num_seqs in (8, 131, 384):
                    steps = [(1, n) for n in gpu.warm_lengths(max_model_len)]
                    steps += [(2, n) for n in gpu.warm_lengths(max_model_len)]
                    steps += gpu.warm_batches(max_model_len, max_num_seqs, kvh)
                    warm = {shape(b, n) for b, n in steps}
                    seen = {shape(b, n) for b in range(1, max_num_seqs + 1) for n in range(1, max_model_len + 1, 97)}
                    assert seen <= warm, (D, nbits, max_model_len, max_num_seqs, sorted(seen - warm))


class _Recorder:
    """Stands in for a Triton kernel: records each launch's specialization key, then launches."""

    def __init__(self, kernel, keys: set):
        self.kernel, self.keys = kernel, keys
        self.names = list(inspect.signature(kernel.fn).parameters)
        self.free = set(kernel.kwargs.get("do_not_specialize") or [])

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            key = [self.kernel.fn.__name__]
            for name, a in zip(self.names, args):
                if name in self.free:
                    continue
                if isinstance(a, torch.Tensor):
                    key.append((str(a.dtype), a.data_ptr() % 16 == 0))
                elif isinstance(a, bool) or not isinstance(a, int):
                    key.append(type(a).__name__ if not isinstance(a, bool) else a)
                else:
                    key.append(("int", a == 1, a % 16 == 0))
            key.append(tuple(sorted(kwargs.items())))
            self.keys.add(tuple(key))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.skipif(CUDA, reason="the interpreter check runs without CUDA; the GPU has its own test")
def test_a_workload_launches_only_warmed_variants(tiny_model, monkeypatch):
    """A tiny Llama on the Triton backend (interpreter): chunked prefill, mixed steps, eager
    decodes of 1-4 sequences up to 300 tokens, after ``warm_kernels``: no launch has a key
    that the warm-up did not launch."""
    from qkv.attention import backend
    from qkv.attention import triton as tri
    from qkv.engine.engine import LLMEngine
    from qkv.loading import load

    loaded = load(tiny_model("llama")[0])
    eng = LLMEngine(loaded.config, loaded.weights, None, dtype="float32", device="cpu", num_kv_blocks=128,
                    max_num_seqs=4, max_num_batched_tokens=64, max_model_len=512)
    tri.register()
    backend.use(eng.model, "triton")
    warm, run = set(), set()
    recorders = []
    for mod, name in [(decode, "_decode_kernel"), (decode, "_combine_kernel"), (prefill, "_prefill_kernel")]:
        recorders.append(_Recorder(getattr(mod, name), warm))
        monkeypatch.setattr(mod, name, recorders[-1])
    gpu.warm_kernels(eng.runner, eng.max_model_len)
    for r in recorders:
        r.keys = run
    _workload(eng, [300, 5, 40, 17, 90, 3])
    assert run and run <= warm, sorted(run - warm)
    assert eng.stats()["num_blocks_in_use"] == 0


def _variants() -> dict[str, int]:
    """Compiled variants per Triton kernel of qkv's GPU modules (Triton's per-device caches)."""
    import importlib

    from triton.runtime.jit import JITFunction

    counts = {}
    for m in ("decode", "prefill", "kv_write", "fused", "gemv", "sampling"):
        mod = importlib.import_module(f"qkv.attention.triton.{m}")
        for name, k in vars(mod).items():
            if isinstance(k, JITFunction):
                caches = getattr(k, "device_caches", None)
                if caches is None:
                    pytest.skip(f"triton {triton.__version__}: no device_caches to count")
                counts[f"{m}.{name}"] = sum(len(c[0]) for c in caches.values())
    return counts


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv_dtype", [None, "fp8"])
def test_no_kernel_compiles_after_start_up(tiny_model, kv_dtype):
    """After the engine is built (warm-up and graph capture), prefill chunks, mixed steps and
    decode batches of every size compile nothing."""
    from qkv.engine.engine import LLMEngine
    from qkv.loading import load

    loaded = load(tiny_model("llama")[0])
    eng = LLMEngine(loaded.config, loaded.weights, None, dtype="bfloat16", device="cuda", num_kv_blocks=256,
                    max_num_seqs=8, max_num_batched_tokens=128, max_model_len=512, kv_dtype=kv_dtype)
    before = _variants()
    _workload(eng, [300, 5, 40, 17, 90, 3, 130, 64, 1, 250], max_tokens=20)
    after = _variants()
    assert after == before, {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}
