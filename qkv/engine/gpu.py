"""GPU set-up of an engine: attention backend, building on the card, KV sizing, CUDA graphs.

Called only by ``LLMEngine`` when its device is CUDA; the CPU path never imports this file.
"""

from __future__ import annotations

import sys
import time

import torch

from qkv.attention import backend
from qkv.attention.batch import AttentionBatch
from qkv.kvcache.kv_pages import new_cache
from qkv.kvcache.manager import group_layers
from qkv.kvcache.spec import SlidingWindow
from qkv.model import build_model


def log(msg: str) -> None:
    print(f"[qkv] {msg}", file=sys.stderr, flush=True)


def select_backend(name: str) -> str:
    """The backend a CUDA engine's model calls: "auto" -> "triton" when triton imports (and is
    registered), else "reference"; another name must be registered. Sets nothing global: the
    engine applies it to its own model (``backend.use``)."""
    from qkv.attention import triton as tri

    if name in ("auto", "triton"):
        if tri.available():
            tri.register()
            name = "triton"
        elif name == "triton":
            raise ValueError("attention backend 'triton' needs the triton package")
        else:
            name = "reference"
    return backend.check(name)


@torch.no_grad()
def build_on_device(config, groups: list[int], weights: dict | None, device: torch.device,
                    dtype: torch.dtype):
    """The model built directly on ``device`` in ``dtype``; ``weights=None`` keeps a random
    init (normal, std 0.02, for matrices) generated on the card."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = build_model(config, groups)
    finally:
        torch.set_default_dtype(prev)
    if weights is not None:
        model.load_weights(weights)
    else:
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    return model


def dummy_step(model, lens: list[int], rings: list[int | None], block_size: int, device: torch.device,
               max_seq_len: int | None = None) -> None:
    """One forward pass (and logits) over sequences of ``lens`` new tokens, nothing cached
    before them, that writes nothing: slots -1, and every table entry block 0 (read as garbage
    by nobody who looks). The tables are as wide as the longest sequence (or its ring) needs:
    a kernel that reads this step's own K/V back from the pages (the packed int8/int4 prefill)
    walks them, and a one-column table would send it past its end. ``max_seq_len`` (default:
    the longest) is what the kernels size themselves by. The caller holds inference mode and
    bound caches."""
    i64 = dict(dtype=torch.int64, device=device)
    qsl = [0]
    for n in lens:
        qsl.append(qsl[-1] + n)
    B, T = len(lens), qsl[-1]
    width = -(-max(lens) // block_size)
    batch = AttentionBatch(
        query_start_loc=torch.tensor(qsl, **i64), num_computed=torch.zeros(B, **i64),
        query_lens=torch.tensor(lens, **i64), max_query_len=max(lens), max_seq_len=max_seq_len or max(lens),
        block_size=block_size, block_tables=[torch.zeros(B, max(width, ring or 1), **i64) for ring in rings],
        slot_mappings=[torch.full((T,), -1, **i64) for _ in rings], ring_blocks=list(rings),
        logits_indices=torch.tensor(qsl[1:], **i64) - 1,
        encoder_lens=torch.ones(B, **i64) if getattr(model, "is_encoder_decoder", False) else None)
    # Positions wrap at the model's table: learned position embeddings (Whisper's 448) would
    # index past it, a device-side assert that ends the CUDA context. Memory is the same.
    limit = model.config.max_position_embeddings
    hidden = model(torch.zeros(T, **i64), torch.cat([torch.arange(n, **i64) % limit for n in lens]), batch)
    model.compute_logits(hidden[batch.logits_indices])


@torch.inference_mode()
def profile_kv_budget(model, specs, block_size: int, max_tokens: int, max_num_seqs: int,
                      utilization: float, device: torch.device, kv_dtype: torch.dtype | None = None) -> int:
    """Bytes left for the KV cache: ``utilization`` of the card, minus what others hold, minus
    the peak of one forward pass over a full token budget (activations, logits)."""
    if not 0.0 < utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    grouped = group_layers(specs)
    rings = [s.ring_blocks(block_size) if isinstance(s, SlidingWindow) else None for s, _ in grouped]
    layers = model.attention_layers()
    kv_dtype = kv_dtype or next(model.parameters()).dtype
    for m in layers:  # one-block stand-in caches: the profile run writes nothing (slots -1)
        m.kv_cache = new_cache(specs[m.layer], 1, block_size, kv_dtype, device)

    # Two shapes of a full token budget: many short sequences (the most logits rows) and one
    # long one (attention that is quadratic in the prompt, as the reference MLA prefill is:
    # 16 heads x 512^2 fp32 scores per sequence already take 16 MiB).
    B = max(1, min(max_num_seqs, max_tokens))
    for rope in model.rotary_embeddings():  # positions up to max_tokens - 1 (as the runner does)
        rope.ensure(max_tokens)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    dummy_step(model, [max_tokens // B + (i < max_tokens % B) for i in range(B)], rings, block_size, device)
    dummy_step(model, [max_tokens], rings, block_size, device)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    T = max_tokens
    for m in layers:
        m.kv_cache = None
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    others = total - free - torch.cuda.memory_reserved()  # CUDA context, other processes
    graph_reserve = 256 << 20  # graph pools: per-size activations beyond the profiled peak
    budget = int(total * utilization) - others - peak - graph_reserve
    log(f"memory: {total / 2**30:.1f} GiB card, weights {before / 2**30:.2f} GiB, forward peak "
        f"{(peak - before) / 2**30:.2f} GiB over {T} tokens, others {others / 2**30:.2f} GiB -> "
        f"KV budget {budget / 2**30:.2f} GiB at utilization {utilization}")
    if budget <= 0:
        raise ValueError(f"no GPU memory left for the KV cache at gpu_memory_utilization={utilization}")
    return budget


def warm_sampler(vocab_size: int, device: torch.device, max_num_seqs: int = 1) -> None:
    """Compile the GPU sampler's kernel at start-up, not inside the first sampled step, and run
    the sampler's torch ops (argmax, softmax) at one row and at ``max_num_seqs`` rows."""
    from qkv.attention.triton import gpu_sampling

    fast = gpu_sampling()
    for n in sorted({1, max(1, max_num_seqs)}):
        logits = torch.zeros(n, vocab_size, dtype=torch.float32, device=device)
        logits.argmax(dim=-1)
        if fast is not None:
            noise = fast.exponential_noise(n, vocab_size, torch.zeros(n, dtype=torch.int64, device=device))
            (logits.softmax(dim=-1) / noise).argmax(dim=-1)


WARM_CHUNK = 16  # tokens of the prefill chunk in warm-up steps: any length compiles the same kernels
WARM_MID = 256  # ... except the fused MoE's, whose tiles depend on the token count (x top-k)


def warm_lengths(max_model_len: int) -> list[int]:
    """The longest-sequence lengths the warm-up steps claim: 64 * 2^i up to ``max_model_len``,
    which give every split count the decode kernel picks (a power of two, from
    ``cdiv(len, 4 * block_n)``; block_n 64 or 128 with fp8, 16 or 32 over int4 pages) for
    sequences up to it."""
    lengths, n = [], 64
    while n < max_model_len and n <= 256 * 64:
        lengths.append(n)
        n *= 2
    return lengths + [max_model_len]


def warm_batches(max_model_len: int, max_num_seqs: int, kv_heads: int) -> list[tuple[int, int]]:
    """(sequences, longest length) of the warm-up's mixed steps of many sequences: a prefill
    chunk beside one-token decodes. The packed decode kernel picks its tiling and split count
    by ``sequences * kv_heads`` against the SMs (``packed.launch_shape``: a power of two of
    splits, 32-key tiles from 1,024 rows), so sequence counts whose row counts sit at each
    power of two and 1.5x it reach every band, each at every ``warm_lengths`` length (the
    split count is the smaller of the batch's and the length's). Without them the
    1000/1000 run's mixed steps of 66 and 131 sequences compiled a variant each (0.56 and
    0.87 s, H200, 2026-12-04)."""
    counts, rows = set(), 1
    while rows <= 2 * max(1, max_num_seqs) * kv_heads:
        counts |= {-(-rows // kv_heads), -(-3 * rows // (2 * kv_heads))}
        rows *= 2
    counts = sorted(b for b in counts if 3 <= b <= max_num_seqs)
    return [(b, n) for b in counts for n in warm_lengths(max_model_len)]


def budget_lengths(max_num_batched_tokens: int) -> list[int]:
    """Token counts of the warm-up's large steps: pairs ``3p/4 - 1, p`` for p = 512, 1024, 2048,
    ... below the budget (383, 512, 767, 1024, 1535, 2048, 3071, 4096, 6143, ...), then the
    budget less one and the budget. cuBLAS picks its GEMM kernels by M (a step's token count),
    and each kernel is loaded on its first launch; the odd counts give the kernels whose integer
    arguments carry the token count (the fused MoE's) their variants for counts not divisible
    by 16, in each of the MoE's tile bands (moe.py ``_config``)."""
    out, p = [], 512
    while True:
        out += [n for n in (3 * p // 4 - 1, p) if n < max_num_batched_tokens - 1]
        if p >= max_num_batched_tokens:
            break
        p *= 2
    return out + [n for n in (max_num_batched_tokens - 1, max_num_batched_tokens) if n > 0]


def full_step(runner, tokens: int, max_num_seqs: int, max_model_len: int) -> None:
    """One dummy step of ``tokens`` tokens shaped like a mixed step of a loaded server: a prefill
    in chunks of at most ``max_model_len`` (one sequence cannot be longer) beside one-token
    decodes, ``max_num_seqs`` sequences in all where the tokens allow (at most half of them
    decodes)."""
    def cut(n):
        return [max_model_len] * (n // max_model_len) + ([n % max_model_len] if n % max_model_len else [])

    decodes = max(0, min(max_num_seqs - 1, tokens // 2))
    decodes = max(0, min(decodes, max_num_seqs - len(cut(tokens - decodes))))
    chunks = cut(tokens - decodes)
    dummy_step(runner.model, chunks + [1] * decodes, list(runner.kv.ring), runner.kv.block_size, runner.device)


@torch.inference_mode()
def warm_kernels(runner, max_model_len: int, max_num_batched_tokens: int | None = None,
                 max_num_seqs: int = 1) -> float:
    """Compile at start-up the kernel variants that eager steps launch, which the first steps
    of a run would otherwise JIT-compile inside it (issue 20: half the throughput of a cold
    ``qkv bench throughput``): a one-sequence prefill, then for each ``warm_lengths`` a
    mixed step (a prefill chunk beside a decode: the prefill kernel skipping decode rows, the
    decode kernel with that length's split count, and the combine kernel past 8 splits) and a
    one-sequence eager decode, then mixed steps of many sequences (``warm_batches``: the packed
    decode kernel's tiling and splits also depend on the sequence count). Pure decode steps in
    CUDA graphs are compiled by the capture.
    Variants are also kept on disk by Triton (``triton_cache_dir``), so a second process loads
    them instead of compiling. With ``max_num_batched_tokens``: mixed steps of every
    ``budget_lengths`` count up to that budget, so the first load's large steps (2,049 to 8,192
    tokens at an 8192 budget) meet no GEMM kernel, Triton variant or allocator size for the
    first time (issue 23: the first load after start-up was 0.80x offline at 8192, 0.93x at
    2048). Writes nothing (``dummy_step``). Returns the seconds it took."""
    t0 = time.perf_counter()
    rings, bs = list(runner.kv.ring), runner.kv.block_size
    for rope in runner.ropes:  # as graph capture does: positions up to max_model_len
        rope.ensure(max_model_len)
    dummy_step(runner.model, [WARM_CHUNK], rings, bs, runner.device)
    # A mid-sized step as well: the fused MoE picks its tiles by token count (moe.py
    # ``_config``), and the band between decode batches and full prefill steps was compiled
    # inside the first run's steps (QKV_LOG_LATE_COMPILES on an H200, DeepSeek-V2-Lite).
    # Two counts: Triton specializes the kernels' integer arguments on divisibility by 16, and
    # 256 alone compiled the variant for multiples of 16 while the run's steps wanted the other
    # (H200, 2026-12-03: the MoE GEMMs and the sort still compiled late).
    for n in (WARM_MID, WARM_MID - 6):
        dummy_step(runner.model, [n], rings, bs, runner.device)
    for n in warm_lengths(max_model_len):
        dummy_step(runner.model, [WARM_CHUNK, 1], rings, bs, runner.device, max_seq_len=n)
        dummy_step(runner.model, [1], rings, bs, runner.device, max_seq_len=n)
    for b, n in warm_batches(max_model_len, max_num_seqs, runner.model.config.num_kv_heads):
        if max_num_batched_tokens and WARM_CHUNK + b - 1 > max_num_batched_tokens:
            continue  # (no step holds more tokens than the budget the memory was profiled for)
        dummy_step(runner.model, [WARM_CHUNK] + [1] * (b - 1), rings, bs, runner.device, max_seq_len=n)
    if max_num_batched_tokens:
        for n in budget_lengths(max_num_batched_tokens):
            full_step(runner, n, max_num_seqs, max_model_len)
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


@torch.inference_mode()
def warm_allocator(runner, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int) -> float:
    """Grow torch's caching allocator to what a full step needs, after graph capture (which
    empties the allocator's cache when it starts each graph, ``torch.cuda.graph``): else the
    first load's full steps ``cudaMalloc`` their activations again. The memory was profiled
    (``profile_kv_budget``: the peak of a full step is kept out of the KV cache), so holding it
    takes nothing from the cache. Returns the seconds it took."""
    t0 = time.perf_counter()
    full_step(runner, max_num_batched_tokens, max_num_seqs, max_model_len)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def log_late_compiles() -> None:
    """With ``QKV_LOG_LATE_COMPILES=1``: from now on (start-up done), log each Triton kernel
    variant a step uses for the first time in this process, and how long getting it took
    (a compile, or a load from Triton's disk cache). Start-up should leave none for a run's
    steps; the log names what ``warm_kernels`` misses (``watch_steps``: what else does)."""
    import os

    if os.environ.get("QKV_LOG_LATE_COMPILES") != "1":
        return
    try:
        from triton import knobs
    except ImportError:
        return
    started: dict[str, float] = {}

    def before(*, repr, **_):
        started[repr] = time.perf_counter()
        return False  # compile as usual

    def after(*, repr, **_):
        log(f"kernel variant first used after start-up ({time.perf_counter() - started.pop(repr, 0.0):.2f} s): "
            f"{repr}")

    knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = before, after


def watch_steps(runner, slow_s: float = 0.05, max_slow: int = 20) -> None:
    """With ``QKV_LOG_LATE_COMPILES=1`` (a CUDA runner, start-up done): wrap ``runner.execute``
    to log each step that grows torch's caching allocator (``cudaMalloc``: what
    ``warm_allocator`` misses) and the first ``max_slow`` steps whose launch holds the host
    over ``slow_s`` (a lazily loaded CUDA module, a cuBLAS set-up, a synchronization)."""
    import os

    if os.environ.get("QKV_LOG_LATE_COMPILES") != "1" or runner.device.type != "cuda":
        return

    def segments():
        stats = torch.cuda.memory_stats(runner.device)
        return stats.get("segment.all.allocated", 0), stats.get("reserved_bytes.all.current", 0)

    execute, last, slow = runner.execute, [segments()], [0]

    def watched(sched, *args, **kwargs):
        t0 = time.perf_counter()
        out = execute(sched, *args, **kwargs)
        dt = time.perf_counter() - t0
        shape = f"{sum(sched.num_new_tokens)} tokens, {len(sched.requests)} sequences"
        now = segments()
        if now[0] > last[0][0]:
            log(f"allocator grew after start-up: {now[0] - last[0][0]} cudaMalloc, "
                f"{(now[1] - last[0][1]) / 2**20:+.0f} MiB (reserved {now[1] / 2**30:.2f} GiB), step of {shape}")
        last[0] = now
        if dt > slow_s and slow[0] < max_slow:
            slow[0] += 1
            log(f"slow step launch after start-up: {dt:.3f} s on the host, step of {shape}")
        return out

    runner.execute = watched


def triton_cache_dir() -> str:
    """Where Triton keeps compiled kernels across processes (``TRITON_CACHE_DIR``, else
    ``~/.triton/cache``)."""
    import os

    try:
        from triton import knobs  # triton >= 3.4

        return knobs.cache.dir
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")


def capture_graphs(runner, max_num_seqs: int, max_model_len: int) -> None:
    from qkv.engine.cuda_graph import DecodeGraphs

    graphs = DecodeGraphs(runner, max_num_seqs, max_model_len)
    t = graphs.capture()
    runner.graphs = graphs
    log(f"captured CUDA graphs for decode batch sizes {graphs.sizes} in {t:.1f} s")
