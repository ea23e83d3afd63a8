"""LLMEngine: the loop request -> scheduler -> cache manager -> runner -> model -> sampler.

``add_request`` queues work, ``step`` runs one forward pass and reports every request that
got a token or finished, ``abort`` ends a request at any point. It is single-threaded:
the server drives it from one background thread and talks to it through queues.
"""

from __future__ import annotations

import numbers
import sys
import time

import torch

from qkv.attention import backend
from qkv.config import ModelConfig
from qkv.engine import budget, encoder, processors, sampler, structured
from qkv.engine.dtype import DTYPES, parse_dtype, resolve_dtype
from qkv.engine.detokenizer import SampleText
from qkv.engine.pending import PendingTokens
from qkv.engine.request import Logprob, Request, RequestOutput, SamplingParams, Status
from qkv.engine.runner import ModelRunner
from qkv.engine.scheduler import PoolBusy, ScheduledBatch, Scheduler
from qkv.kvcache.manager import KVCacheManager, group_layers
from qkv.kvcache.plan import capacity_line, plan_num_blocks  # noqa: F401 (plan_num_blocks: re-exported)
from qkv.kvcache.kv_int import resolve as resolve_kv
from qkv.kvcache.kv_pages import with_packed
from qkv.kvcache.spec import layer_specs

# KV cache storage may also be fp8 (e4m3): half the bytes of bf16, so twice the tokens.
KV_DTYPES = {**DTYPES, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
             "float8_e4m3fn": torch.float8_e4m3fn}


def resolve_kv_dtype(kv_dtype, dtype: torch.dtype) -> torch.dtype:
    """The KV cache's storage dtype: ``None``/"auto" is the model's."""
    return dtype if kv_dtype in (None, "auto") else parse_dtype(kv_dtype, KV_DTYPES)


def check_sizes(**sizes) -> None:
    """Each of ``sizes`` (an engine argument's name -> value) is None or a positive whole
    number; anything else is a ValueError naming the argument."""
    for name, value in sizes.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise ValueError(f"{name} must be a positive whole number, got {value!r}")


def check_flags(**flags) -> None:
    """Each of ``flags`` is None (the default's own rule) or a bool: the string "false" was
    truthy, and turned on what it was meant to turn off."""
    for name, value in flags.items():
        if value is not None and not isinstance(value, bool) and not (isinstance(value, int) and value in (0, 1)):
            raise ValueError(f"{name} must be true or false, got {value!r}")


def check_cpu_pool(specs, block_size: int, n_blocks: list[int], ranks: int = 1) -> None:
    """Refuse CPU pools larger than the machine's memory: the pages are only reserved, but a
    mapping past RAM fails with ENOMEM, and a billion blocks' bookkeeping (num_kv_blocks=10**9)
    had the process killed for memory before it printed a word. ``specs`` are one rank's
    (tensor parallelism): each of the ``ranks`` processes holds such a pool."""
    import os

    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no such sysconf here: nothing to compare with
        return
    need = ranks * sum(n * spec.bytes_per_token * block_size * len(layers)
                       for n, (spec, layers) in zip(n_blocks, group_layers(specs)))
    if need > ram:
        raise ValueError(f"a KV cache of {n_blocks} blocks of {block_size} tokens"
                         f"{f' on each of {ranks} ranks' if ranks > 1 else ''} takes "
                         f"{float(need) / 2**30:,.1f} GiB, more than this machine's {ram / 2**30:,.1f} GiB "
                         f"of memory; lower num_kv_blocks or kv_cache_memory")


class LLMEngine:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], tokenizer=None, *,
                 dtype="auto", device="cpu", block_size: int = 16, num_kv_blocks: int | list[int] | None = None,
                 kv_cache_memory: int | None = None, max_num_batched_tokens: int | str | None = "auto",
                 max_num_seqs: int = 64, enable_prefix_caching: bool = True, max_model_len: int | None = None,
                 kv_dtype=None, attention_backend: str = "auto", enforce_eager: bool = False,
                 gpu_memory_utilization: float = 0.9, quantization: str | None = None,
                 async_scheduling: bool | None = None, k_dtype=None, v_dtype=None,
                 tensor_parallel_size: int = 1, log_stats: bool = True, compile_decode: bool = False):
        """``weights=None`` keeps the model's random initialization (benchmarks of shapes only).
        ``dtype``: "auto" (the checkpoint's on CUDA; float32 on the CPU, bfloat16 with int8 weights:
        engine/dtype.py) or a name.
        ``attention_backend``: a registered name (attention/backend.py), this engine's alone (set
        on its model's modules, so engines on other devices keep theirs); "auto" is Triton on
        CUDA, the reference on the CPU. On CUDA decode steps replay CUDA graphs unless
        ``enforce_eager``; without ``num_kv_blocks``/``kv_cache_memory`` the KV cache
        takes ``gpu_memory_utilization`` of the card minus what a profiled forward pass needs.
        KV pools (kvcache/plan.py): ``num_kv_blocks`` an int gives every full-attention group
        that many blocks and each sliding group at most that many; a list gives each layer
        group's count; else the budget (``kv_cache_memory``, 1 GiB on the CPU) is split.
        ``max_num_batched_tokens``: tokens a step (the prefill chunk); "auto"/None: 8192 on a
        CUDA device of at least 70 GiB, else 2048 (engine/budget.py).
        ``quantization="int8"`` (CPU): int8 weights for the linear layers (model/quant.py);
        "fp8" (GPU; an emulation on the CPU): e4m3 weights and activations (model/fp8.py).
        ``async_scheduling``: launch each step before reading the previous step's tokens on the
        host (engine/pending.py); same tokens, outputs one ``step`` later. None: on exactly when
        decode steps replay CUDA graphs (there the host would otherwise idle the GPU).
        ``kv_dtype``: the cache's storage, one format or "K,V" ("int4,int8"); ``k_dtype`` and
        ``v_dtype`` set either side (int8/int4 pages: kvcache/kv_int.py, kv_pages.py).
        ``tensor_parallel_size=N``: N processes, one per rank (qkv/distributed/); the cache
        specs, pools and ``kv_cache_memory`` are per rank. ``compile_decode`` (CPU, Llama family):
        decode steps run as one torch.compile'd graph, compiled on the first decode step
        (engine/cpu_compile.py); refused by name where it does not apply. ``log_stats=False``: no start-up or
        first-request lines on stderr (``qkv generate`` without ``--verbose``)."""
        t_start = time.perf_counter()
        # Refused by name before anything is built: a block size of 0 failed deep in the pool
        # planning with a TypeError, and 0 for an optional size meant "the default" unsaid.
        check_sizes(block_size=block_size, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                    kv_cache_memory=kv_cache_memory, tensor_parallel_size=tensor_parallel_size,
                    num_kv_blocks=None if isinstance(num_kv_blocks, (list, tuple)) else num_kv_blocks)
        check_flags(enable_prefix_caching=enable_prefix_caching, enforce_eager=enforce_eager,
                    async_scheduling=async_scheduling, log_stats=log_stats, compile_decode=compile_decode)
        self.config, self.tokenizer = config, tokenizer
        self.device = torch.device(device)
        self.dtype, why = resolve_dtype(dtype, config, self.device, quantization)  # the rule: engine/dtype.py
        if quantization:  # refused by name before anything is built or read
            from qkv.model.quant import check as check_quantization

            check_quantization(quantization, self.device)
            if quantization == "fp8":
                from qkv.model import fp8

                fp8.check(config, self.device)
            elif quantization in ("int8", "int4") and "mla" in config.layer_types:
                # MLA splits kv_b_proj's weight per head itself, which an int8/int4 linear no
                # longer holds: the first step failed with an AttributeError.
                raise ValueError(f"quantization={quantization!r} does not support {config.model_type} (MLA reads "
                                 f"kv_b_proj's float weight); use 'bf16' or 'none'")
        self.log_stats = log_stats
        if log_stats:
            print(f"[qkv] dtype {str(self.dtype).removeprefix('torch.')} ({why})", file=sys.stderr, flush=True)
        max_num_batched_tokens, why = budget.resolve(max_num_batched_tokens, self.device)  # engine/budget.py
        if log_stats:
            print(f"[qkv] max_num_batched_tokens {max_num_batched_tokens} ({why})", file=sys.stderr, flush=True)
        # One float format for K and V: plain pages of that dtype; int8/int4 or K != V: packed
        # uint8 pages with scales (kvcache/kv_pages.py), their specs carrying the formats.
        self.kv_dtype, self.kv_packed = resolve_kv(kv_dtype, k_dtype, v_dtype, self.dtype)
        kv_dtype = self.kv_dtype
        self.tp, specs_config = None, config  # self.tp: TensorParallelExecutor when tensor_parallel_size > 1
        from qkv.distributed import layout_forced

        tp_layout = tensor_parallel_size != 1 or layout_forced()  # QKV_TP_LAYOUT=1: TP=1 through it too
        if tp_layout:  # refused by name before anything is allocated
            from qkv.distributed.shard import Layout, rank_config

            if quantization:
                raise ValueError("quantization is not supported with tensor_parallel_size > 1")
            if compile_decode:  # else refused only after the ranks had started, as a CUDA matter
                raise ValueError("compile_decode is not supported with tensor_parallel_size > 1 "
                                 "(it compiles one process's CPU decode step)")
            if self.kv_packed is not None:
                raise ValueError(f"kv_dtype {self.kv_packed.label} (packed int8/int4 pages) is not supported with "
                                 f"tensor_parallel_size > 1; use a float kv_dtype")
            if encoder.is_encoder_decoder(config):
                raise ValueError(f"{config.model_type} (encoder-decoder) is not supported with tensor_parallel_size > 1")
            specs_config = rank_config(config, Layout.of(config, tensor_parallel_size))  # per-rank heads
        specs = with_packed(layer_specs(specs_config, kv_dtype.itemsize), self.kv_packed)
        self.specs = specs
        if max_model_len is not None and max_model_len > config.max_context:  # was capped to it, unsaid
            raise ValueError(f"max_model_len ({max_model_len}) exceeds the model's context length "
                             f"({config.max_context} tokens)")
        self.max_model_len = max_model_len or config.max_context
        on_gpu = self.device.type == "cuda"
        encoder.check_device(config, self.device, self.kv_packed)  # encoder-decoder: float pages only
        if on_gpu:
            from qkv.engine import gpu

            self.attention_backend = gpu.select_backend(attention_backend)
            if self.attention_backend == "triton" and self.kv_packed is not None:
                from qkv.attention.triton.packed import check_supported

                check_supported(self.kv_packed, specs)
        elif attention_backend == "triton":
            raise ValueError(f"attention backend {attention_backend!r} needs a CUDA device")
        else:  # "auto" is the reference here; a registered name (a test's, a tool's) is honoured
            self.attention_backend = backend.check("reference" if attention_backend == "auto" else attention_backend)
        grouped = group_layers(specs)
        layer_group = {layer: g for g, (_, layers) in enumerate(grouped) for layer in layers}
        groups = [layer_group[i] for i in range(len(specs))]  # cross layers too (kvcache/cross.py)
        if tp_layout:
            from qkv.distributed.executor import TensorParallelExecutor

            self.tp = TensorParallelExecutor(config, weights, tensor_parallel_size, self.device, self.dtype, groups,
                                             attention_backend=self.attention_backend)
            model = self.tp.model
        elif on_gpu:  # build straight on the card in the target dtype: no fp32 copy on the host
            model = gpu.build_on_device(config, groups, weights, self.device, self.dtype)
        else:  # parameters on meta, then filled one at a time in the dtype: no fp32 copy of the model
            from qkv.model.materialize import build

            # in the dtype, linears rounded as they are read: no cast after (int4's scales stay bf16)
            model, quantization = build(config, groups, weights, self.dtype, quantization), None
        if self.tp is not None or on_gpu:
            model = model.to(device=self.device, dtype=self.dtype)
        self.model = model.eval()
        if quantization:
            from qkv.model.quant import quantize

            self.model = quantize(self.model, quantization, self.device)
        if self.device.type == "cpu" and self.tp is None:  # decode GEMVs over both cores (model/cpu_layout.py)
            from qkv.model.cpu_layout import column_major_fp32

            column_major_fp32(self.model)
            if getattr(self.model, "cpu_blas_gemv", False):  # one-row products through numpy's BLAS
                from qkv.model.cpu_gemv import blas_threads, use_blas_gemv

                if blas_threads(torch.get_num_threads()):
                    use_blas_gemv(self.model)
        backend.use(self.model, self.attention_backend)  # this engine's model only, not the process
        if on_gpu and num_kv_blocks is None and kv_cache_memory is None:
            profiler = gpu if self.tp is None else self.tp  # with TP every rank runs the profile
            kv_cache_memory = profiler.profile_kv_budget(self.model, specs, block_size, max_num_batched_tokens,
                                                         max_num_seqs, gpu_memory_utilization, self.device, kv_dtype)
        n_blocks = plan_num_blocks(specs, block_size, max_num_seqs, kv_cache_memory or (1 << 30), num_kv_blocks,
                                   prefix_caching=enable_prefix_caching,
                                   max_num_batched_tokens=max_num_batched_tokens, max_model_len=self.max_model_len)
        if min(n_blocks) < 1:
            raise ValueError(f"the KV cache budget holds no block (groups got {n_blocks})")
        if self.device.type == "cpu":
            check_cpu_pool(specs, block_size, n_blocks, tensor_parallel_size)
        self.kv = KVCacheManager(specs, block_size, n_blocks, enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, max_num_batched_tokens, max_num_seqs, self.max_model_len)
        self.runner = (ModelRunner(self.model, self.kv, self.device, kv_dtype) if self.tp is None else
                       self.tp.start_cache(specs, block_size, n_blocks, enable_prefix_caching, kv_dtype, self.kv))
        if log_stats:
            print(f"[qkv] {capacity_line(self.kv, self.max_model_len, self.runner.kv_cache_bytes)}",
                  file=sys.stderr, flush=True)
        if on_gpu:
            if self.attention_backend == "triton":
                gpu.warm_sampler(config.vocab_size, self.device, max_num_seqs)
                if self.tp is None:  # with TP, runner is rank 0's proxy; the ranks compile on first use
                    t = gpu.warm_kernels(self.runner, self.max_model_len, max_num_batched_tokens, max_num_seqs)
                    gpu.log(f"compiled the prefill and mixed-step kernels in {t:.1f} s "
                            f"(Triton cache: {gpu.triton_cache_dir()})")
            graphs_ok = getattr(self.model, "supports_cuda_graphs", True)  # host-synchronizing models opt out
            if graphs_ok and self.tp is not None and not self.tp.group.can_capture:
                gpu.log("CUDA graphs off: this tensor-parallel group's collectives cannot be captured")
                graphs_ok = False
            if not enforce_eager and self.attention_backend != "reference" and graphs_ok:
                (gpu if self.tp is None else self.tp).capture_graphs(self.runner, max_num_seqs, self.max_model_len)
            gpu.log_late_compiles()
        if compile_decode:
            self._compile_decode()
        if on_gpu and self.tp is None and self.attention_backend == "triton":
            # After graph capture, which empties the allocator's cache (engine/gpu.py warm_allocator).
            t = gpu.warm_allocator(self.runner, max_num_batched_tokens, max_num_seqs, self.max_model_len)
            gpu.log(f"allocator grown to a full step of {max_num_batched_tokens} tokens in {t:.2f} s "
                    f"(reserved {torch.cuda.memory_reserved(self.device) / 2**30:.2f} GiB)")
            gpu.watch_steps(self.runner)  # with QKV_LOG_LATE_COMPILES=1: allocator growth, slow launches
        self.eos_ids = set(tokenizer.eos_token_ids if tokenizer is not None else []) | set(config.eos_token_ids)
        if async_scheduling is None:
            async_scheduling = self.runner.graphs is not None
        self.async_scheduling = bool(async_scheduling)
        self._pending = PendingTokens(self.device)  # sampled, not yet read on the host
        self._requests: dict[str, Request] = {}
        self._detok: dict[str, object] = {}
        # False: outputs carry token ids only (no text, no stop strings); the process-split
        # server detokenizes and matches stop strings in its front end (engine/detokenizer.py).
        self.detokenize = True
        self.num_generated_tokens = 0
        # Structured outputs: compiled grammars (built on first use) and the live requests
        # that have a matcher; steps without one pay nothing (engine/structured.py).
        self.grammars = (structured.GrammarCache(tokenizer, config.vocab_size, sorted(self.eos_ids))
                         if tokenizer is not None else None)
        self._structured: set[str] = set()
        self.startup_s = time.perf_counter() - t_start  # weights given to ready: profiling, warm-up, graphs
        self._first_request_logged = not log_stats
        if log_stats:
            print(f"[qkv] engine ready in {self.startup_s:.1f} s", file=sys.stderr, flush=True)

    def _compile_decode(self) -> None:
        from qkv.engine import cpu_compile

        if self.device.type != "cpu" or self.tp is not None:
            raise ValueError("compile_decode is the CPU decode path (one process); on CUDA decode replays CUDA graphs")
        why = cpu_compile.unsupported(self.model, self.runner)
        if why is not None:
            raise ValueError(f"compile_decode does not cover {why}; run without it")
        self.runner.compiled = cpu_compile.CompiledDecode(self.model)

    # ---------------------------------------------------------------- requests
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    cache_salt: str | None = None, encoder_features: torch.Tensor | None = None) -> list[Request]:
        """Queue a prompt; returns its n sample requests. ``encoder_features``: an encoder-decoder
        model's input (Whisper: log-mel [num_mel_bins, 2 * encoder_len]), required there and
        refused elsewhere (engine/encoder.py). Raises ValueError at once, with
        nothing queued, for out-of-vocabulary ids, an id in use (samples are ``id/1..n-1``)
        and (RequestTooLarge) a request that can never run."""
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none (use stop_token_ids)")
        if params.bad_words and self.tokenizer is None:
            raise ValueError("bad_words need a tokenizer; this model has none (use logit_bias)")
        prompt_token_ids = self.check_token_ids(prompt_token_ids, "prompt")
        if params.prompt_logprobs is not None and encoder.is_encoder_decoder(self.config):
            # Scoring runs the decoder alone; score()'s own refusal told a caller who had passed
            # encoder_features to pass them.
            raise ValueError(f"prompt_logprobs is not supported for {self.config.model_type} (encoder-decoder): "
                             f"its scoring pass has no encoder input; use logprobs for the output")
        for name in ("logprobs", "prompt_logprobs"):  # a top-k past the vocabulary failed the whole step
            k = getattr(params, name)
            if k is not None and k > self.config.vocab_size:
                raise ValueError(f"{name} ({k}) must not exceed the vocabulary size ({self.config.vocab_size})")
        if params.stop_token_ids:  # min_tokens bans them in the logits: one past the vocabulary fails the step
            self.check_token_ids(params.stop_token_ids, "stop_token_ids")
        if params.logit_bias:
            self.check_token_ids(list(params.logit_bias), "logit_bias")
        if params.allowed_token_ids is not None:
            self.check_token_ids(params.allowed_token_ids, "allowed_token_ids")
        for name in ("suppress_token_ids", "begin_suppress_token_ids"):
            if getattr(params, name):
                self.check_token_ids(getattr(params, name), name)
        so = params.structured_outputs
        if so is not None and self.grammars is None:
            raise ValueError("structured_outputs need a tokenizer; this model has none")
        if so is not None and params.allowed_token_ids is not None:
            self.grammars.check_allowed(so, params.allowed_token_ids)
        bound = so.max_tokens_bound() if so is not None else None
        if bound is not None and params.min_tokens > bound:
            raise ValueError(f"min_tokens ({params.min_tokens}) exceeds the longest output structured_outputs."
                             f"{so.kind} allows ({bound} bytes, so at most {bound} tokens)")
        matchers = [self.grammars.matcher(so) for _ in range(params.n)] if so is not None else None
        features, enc_len, cache_salt = encoder.encoder_input(self.config, encoder_features, cache_salt)
        base_seed = params.seed
        head = Request(prompt_token_ids, params, request_id, cache_salt, index=0, seed=base_seed)
        self._check_new_id(head.request_id, params.n)
        reqs = [head] + [
            Request(prompt_token_ids, params, f"{head.request_id}/{i}", cache_salt, index=i,
                    seed=None if base_seed is None else base_seed + i)
            for i in range(1, params.n)
        ]
        if params.prompt_logprobs is not None:
            # Scoring computes the prompt and caches its blocks: admission then finds them, but
            # the request paid for them, so only what was cached before counts as cached.
            head.cached_cap = self.kv.cached_prefix(head)
        stop_ids = sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids))
        bad = self._bad_words_ids(params.bad_words) if params.bad_words else []
        if params.allowed_token_ids is not None:
            # Options that mask every allowed token leave a row of -inf: the sampler then drew
            # the vocabulary's last id, a token outside allowed_token_ids, at every step.
            left = set(params.allowed_token_ids) - {ids[0] for ids in bad if len(ids) == 1}
            if not left:
                raise ValueError("bad_words ban every token of allowed_token_ids: nothing could be sampled")
            if params.min_tokens and left <= set(stop_ids):
                raise ValueError(f"min_tokens ({params.min_tokens}) bans every token allowed_token_ids leaves "
                                 f"(stop or end-of-sequence ids {sorted(left)}): nothing could be sampled")
        prompt_lps = self._prompt_logprobs(prompt_token_ids, params.prompt_logprobs, cache_salt)
        for r in reqs:
            r.encoder_features, r.encoder_len = features, enc_len
        self.scheduler.add(head)
        head.forks = reqs[1:]
        for r in reqs:
            r.prompt_logprobs = prompt_lps
            r.min_tokens_ids = stop_ids if params.min_tokens else []
            r.bad_words_ids = bad
            if matchers:
                r.structured = matchers[r.index]
                self._structured.add(r.request_id)
            self._requests[r.request_id] = r
            if self.tokenizer is not None and self.detokenize:
                self._detok[r.request_id] = SampleText(self.tokenizer, params, frozenset(self.eos_ids))
        return reqs

    def _bad_words_ids(self, words: list[str]) -> list[list[int]]:
        """vLLM's rule: each word as encoded alone and after a space (its in-text form)."""
        seqs: dict[tuple, list[int]] = {}  # a dict, not a list search: 60k words took minutes
        for w in words:
            for text in (w.lstrip(), " " + w.lstrip()):
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                if ids and all(0 <= t < self.config.vocab_size for t in ids):
                    seqs.setdefault(tuple(ids), ids)
        return list(seqs.values())

    def _prompt_logprobs(self, ids: list[int], k: int | None, cache_salt: str | None) -> list | None:
        """Per prompt token, {token: Logprob} for it and the top ``k`` (the first token: None).
        Computed by scoring the prompt (one extra prefill) at admission, between steps."""
        if k is None:
            return None
        try:
            # Scored under the request's own salt: its blocks are cached for those who share it only.
            # Preempting running requests if need be, as a step that runs dry does: under load
            # the pool is full, and the request must not fail for that (it got a 429).
            lp = self.score(ids, cache_salt, make_room=True)[:-1].log_softmax(dim=-1)  # row t predicts t+1
        except PoolBusy as e:  # the free blocks cannot hold the prompt right now
            raise PoolBusy(f"prompt_logprobs: {e}") from None
        target = torch.tensor(ids[1:], device=lp.device)
        tok_lp = lp.gather(1, target[:, None]).squeeze(1)
        rank = (lp > tok_lp[:, None]).sum(dim=-1) + 1
        top = lp.topk(k, dim=-1) if k else None
        host = (tok_lp.tolist(), rank.tolist(), top.values.tolist() if top else [[]] * len(target),
                top.indices.tolist() if top else [[]] * len(target))
        return [None] + [self._logprob_entry(t, *(h[i] for h in host)) for i, t in enumerate(ids[1:])]

    def _logprob_entry(self, tok: int, lp: float, rank: int, top_lps: list[float], top_ids: list[int]) -> dict:
        """{token: Logprob}: the chosen token first, then the top-k in rank order."""
        def text(t):
            return self.tokenizer.decode([t], skip_special_tokens=False) if self.tokenizer is not None else None

        entry = {tok: Logprob(lp, rank, text(tok))}
        for r, (t, v) in enumerate(zip(top_ids, top_lps), start=1):
            if t not in entry:
                entry[t] = Logprob(v, r, text(t))
        return entry

    def check_token_ids(self, ids, what: str) -> list[int]:
        """``ids`` as a list of Python ints; ValueError unless it is a non-empty sequence of
        in-vocabulary integers (numpy ints count, bools do not). Reads only the config, so the
        server calls it from its handlers, off the engine thread. A 1-D integer tensor is taken
        as its list (its elements are 0-d tensors, not ints, so they read as out of range)."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                raise ValueError(f"the {what} as a tensor must be 1-D of integers, got {tuple(ids.shape)} {ids.dtype}")
            ids = ids.tolist()
        ids = list(ids)
        if not ids:
            raise ValueError(f"the {what} is empty: at least one token id is needed")
        vocab = self.config.vocab_size
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{what} token ids out of the vocabulary (integers in [0, {vocab})): {bad[:5]}")
        return [int(t) for t in ids]

    def _check_new_id(self, request_id: str, n: int) -> None:
        """Refuse an id that is live, or that shares the ``id/i`` sample namespace with a live
        one: ``abort(id)`` ends ``id/*``, so a clash would end or overwrite another request."""
        if not isinstance(request_id, str):  # an int failed below as "unsupported operand type(s) for +"
            raise ValueError(f"request_id must be a string, got {type(request_id).__name__} {request_id!r}")
        new = [request_id] + [f"{request_id}/{i}" for i in range(1, n)]
        clash = next((r for r in self._requests if r in new or r.startswith(request_id + "/")
                      or request_id.startswith(r + "/")), None)
        if clash is not None:
            raise ValueError(f"request id {request_id!r} is already in use (clashes with live request {clash!r})")

    def abort(self, request_id: str) -> None:
        """End a request (and its sibling samples) now; its blocks go back to the pool."""
        self._abort([r for r in self._requests if r == request_id or r.startswith(request_id + "/")])

    def abort_all(self) -> None:
        """``abort`` every request the engine holds."""
        self._abort(list(self._requests))

    def _abort(self, sample_ids: list[str]) -> None:
        for rid in sample_ids:
            req = self._requests[rid]
            if not req.finished:
                self.scheduler.finish(req, "abort")
            self._forget(req)
        self._pending.drop_finished()  # an aborted request's token in flight is never read

    def finish(self, request_id: str, reason: str = "stop") -> None:
        """End one sample (not its siblings, unlike ``abort``) as if it had stopped on its own:
        for a stop string matched outside the engine. Its blocks go back to the pool."""
        req = self._requests.get(request_id)
        if req is None:
            return
        if not req.finished:
            self.scheduler.finish(req, reason)
        self._forget(req)
        self._pending.drop_finished()

    def _forget(self, req: Request) -> None:
        self._requests.pop(req.request_id, None)
        self._detok.pop(req.request_id, None)
        self._structured.discard(req.request_id)

    def has_unfinished(self) -> bool:
        """Whether ``step`` has more to do or report (a step in flight counts)."""
        return self.scheduler.has_unfinished() or bool(self._pending)

    # ---------------------------------------------------------------- the step
    def step(self) -> list[RequestOutput]:
        """Run one forward pass; return an output for every request that got a token (or
        finished) since the last call. With async scheduling those are the tokens of the
        step launched by the previous call: this call launches its own step before reading
        them, so the host's work overlaps the device's. The order of tokens is the same.

        If the step raises, every unfinished request is aborted (its blocks go back to the
        pool) before the error propagates: a failed step can leave a request half advanced
        (blocks taken for tokens never computed, tokens computed but never read), and no later
        step may build on that. The engine then takes new requests."""
        try:
            sched = self.scheduler.schedule()
            logits = None
            with self.runner.step_threads(sched):
                if sched:
                    logits = self.runner.execute(sched, prev_tokens=self._pending.tokens)
                outputs = self._read_tokens() if self.async_scheduling else []
                if logits is not None:
                    self._sample(sched, logits)
                if not self.async_scheduling:
                    outputs = self._read_tokens()
            return outputs
        except BaseException:
            self.abort_all()
            raise

    def _sample(self, sched: ScheduledBatch, logits: torch.Tensor) -> None:
        """Advance the scheduled requests and launch sampling for those whose token is due;
        the tokens are held in ``self._pending`` until ``_read_tokens``."""
        picks: list[int] = []  # each due request's logits row
        due = self.scheduler.update(sched, picks)
        for i, req in enumerate(list(due)):  # siblings sample from their parent's prompt logits
            for child in req.forks:
                if child.finished:  # aborted on its own before its prompt was computed
                    continue
                self.scheduler.fork(req, child)
                due.append(child)
                picks.append(picks[i])
            req.forks = []
        if not due:
            return
        if picks != list(range(logits.shape[0])):
            logits = logits[torch.tensor(picks, device=logits.device)]
        ks = [r.params.logprobs for r in due if r.params.logprobs is not None]
        raw = logits.float().log_softmax(dim=-1) if ks else None  # the model's own distribution
        if self._structured:  # grammar masks first, as vLLM: processors see only allowed tokens
            logits = structured.apply_masks(logits, due, self.grammars)
        tokens = sampler.sample(processors.apply(logits, due), due)
        lps = None
        if raw is not None:
            tok_lp = raw.gather(1, tokens[:, None]).squeeze(1)
            rank = (raw > tok_lp[:, None]).sum(dim=-1) + 1
            top = raw.topk(max(ks), dim=-1)
            lps = (tok_lp, rank, top.values, top.indices)
        self._pending.push(tokens, due, lps)

    def _read_tokens(self) -> list[RequestOutput]:
        """Read the pending tokens on the host and append them (stop checks, finishing)."""
        now = time.monotonic()
        finished = Status.FINISHED  # aborted while in flight: nothing to report
        return [self._append(req, tok, now, lp) for req, tok, lp in self._pending.pop()
                if req.status is not finished]

    def _append(self, req: Request, tok: int, now: float, lp: tuple | None = None) -> RequestOutput:
        tokens = req.all_token_ids
        # The grammar first: a token it rejects (the request's other options left it none to
        # take) never enters the output; the request ends there (engine/structured.py).
        grammar = req.structured.advance(tok) if req.structured is not None else None
        if grammar == structured.DEAD_END:
            return self._output(req, grammar, self._end(req, grammar))
        tokens.append(tok)
        k = req.params.logprobs
        if k is not None and lp is not None:
            value, rank, top_lps, top_ids = lp
            req.logprobs.append(self._logprob_entry(tok, value, rank, top_lps[:k], top_ids[:k]))
            req.cumulative_logprob += value
        num_tokens = len(tokens)
        self.num_generated_tokens += 1
        if req.first_token_time is None:
            req.first_token_time = now
        p = req.params
        reason, delta = None, ""
        detok = self._detok.get(req.request_id)  # SampleText: text and stop strings (engine/detokenizer.py)
        if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            reason = "stop"
        elif detok is not None:
            # The delta holds back what may begin a stop string: a stream never shows part of one.
            delta, stopped = detok.push(tok)
            req.text = detok.text
            reason = "stop" if stopped else None
        if reason is None:  # "stop" once the grammar is complete
            reason = grammar
            if grammar == "stop" and num_tokens - req.num_prompt_tokens < p.min_tokens:
                # Nothing may follow and min_tokens is not met: "stop" would say it was.
                reason = structured.DEAD_END
        if reason is None and (num_tokens - req.num_prompt_tokens >= p.max_tokens or num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            delta += self._end(req, reason)
            if not self._first_request_logged:  # the first request after start-up: is it warm?
                self._first_request_logged = True
                print(f"[qkv] first request: first token {req.first_token_time - req.arrival_time:.2f} s, "
                      f"done {now - req.arrival_time:.2f} s after it arrived "
                      f"({num_tokens - req.num_prompt_tokens} tokens)", file=sys.stderr, flush=True)
        return self._output(req, reason, delta)

    def _end(self, req: Request, reason: str) -> str:
        """Finish ``req`` with ``reason``; returns the text its detokenizer held back (as a
        possible stop string's start), which no stop string can follow now."""
        detok = self._detok.get(req.request_id)
        held = detok.flush() if detok is not None else ""
        self.scheduler.finish(req, reason)
        self._forget(req)
        return held

    def _output(self, req: Request, reason: str | None, delta: str) -> RequestOutput:
        tokens = req.all_token_ids
        return RequestOutput(req.request_id, tokens, req.num_prompt_tokens, len(tokens), req.text,
                             reason, req.num_cached_tokens, req.index, delta, _logprobs=req.logprobs,
                             prompt_logprobs=req.prompt_logprobs, cumulative_logprob=req.cumulative_logprob)

    # ---------------------------------------------------------------- scoring
    @torch.inference_mode()
    def score(self, token_ids: list[int], cache_salt: str | None = "score", make_room: bool = False) -> torch.Tensor:
        """Float32 logits [len, vocab] of every position, computed through the paged cache in
        chunks of the token budget. Row t predicts token t+1. Runs alone: call it between steps.
        Raises ValueError for empty or out-of-vocabulary ids and for more than ``max_model_len``
        tokens (positions past the model's context have no embedding). ``cache_salt``: the
        prefix-cache salt the scored blocks are cached under (a request's own, for its
        prompt_logprobs). ``make_room``: preempt running requests (newest first) while the free
        blocks cannot hold a chunk; without it, or with nothing left to preempt, PoolBusy."""
        if encoder.is_encoder_decoder(self.config):
            raise ValueError(f"scoring (logits, prompt_logprobs) of {self.config.model_type} is not supported: "
                             f"it needs the encoder input; generate with encoder_features instead")
        token_ids = self.check_token_ids(token_ids, "scored sequence")
        if len(token_ids) > self.max_model_len:
            raise ValueError(f"{len(token_ids)} tokens exceed the maximum context length of "
                             f"{self.max_model_len} tokens (max_model_len); score at most that many")
        # Not PoolBusy, which says retry: it never fits.
        self.scheduler.check_fits(len(token_ids), None, f"{len(token_ids)} tokens need")
        req = Request(token_ids, SamplingParams(max_tokens=1), cache_salt=cache_salt)
        try:
            self.kv.match_prefix(req, lookup=False)  # every position's logits are wanted
            chunks = []
            while req.num_computed_tokens < len(token_ids):
                n = min(self.scheduler.max_num_batched_tokens, len(token_ids) - req.num_computed_tokens)
                n = min(n, self.kv.chunk_limit(req) or n)  # a window table holds chunk + window
                copies = self.kv.allocate(req, n)
                while copies is None and make_room and self.scheduler.preempt_newest():
                    copies = self.kv.allocate(req, n)
                if copies is None:
                    raise PoolBusy(f"{len(token_ids)} tokens do not fit in the free KV blocks")
                chunks.append(self.runner.execute(ScheduledBatch([req], [n], copies), all_logits=True))
                req.num_computed_tokens += n
                self.kv.cache_blocks(req)  # a window group lets go of what left the window
            return torch.cat(chunks)
        finally:
            self.kv.free(req)

    # ---------------------------------------------------------------- stats
    def stats(self) -> dict:
        s = self.kv.usage()
        s.update(
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_hit_rate=self.scheduler.prefix_cache_hit_rate,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_generated_tokens=self.num_generated_tokens,
            num_prompt_tokens=self.scheduler.num_prompt_tokens,
            num_cached_prompt_tokens=self.scheduler.num_hit_tokens,
            kv_cache_bytes=self.runner.kv_cache_bytes,
            block_size=self.kv.block_size,
        )
        return s
