"""Build a model with no weights in memory, then fill it one tensor at a time in its dtype.

The eager way (build on the CPU with a random init, copy float32 weights in, cast the model)
holds the file's float32 expansion, the random init and the cast copy at once: SmolLM2 peaked
at 2.4 GB for 270 MB of bfloat16 weights. Here parameters are created on the meta device
(their init costs nothing) while buffers stay real (RoPE tables are computed, not loaded);
then each parameter is read from the weights (straight into the dtype when they are
``LazyWeights``: loading/lazy.py), transformed, fused, and put in place of its meta
tensor, after which nothing else holds it. The peak is about the final weights plus one
parameter's pieces.

The result equals the eager path bit for bit: the same transforms and concatenations, and
casting a float32 value to the dtype once (``tests/test_materialize.py``).

With a CPU ``quantization`` (int8, int4: model/quant.py) each linear's weight is rounded as
soon as it is read, block of rows by block of rows, and its float copy dropped: the float
model is never whole in memory, so the peak is about the rounded weights plus one
parameter's float pieces (SmolLM2 int8: 845 MB before, see docs/benchmarks.md). The layers
equal those rounded from the whole float model bit for bit (``tests/test_quant_chunked.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager

import torch
from torch import nn

from qkv.loading.lazy import read_as
from qkv.model.base import CausalLM, WeightError


def supported(model: nn.Module) -> bool:
    """Whether ``materialize`` loads this model as its ``load_weights`` would (a model that
    overrides ``load_weights`` adds its own rules: it is built the eager way)."""
    return isinstance(model, CausalLM) and type(model).load_weights is CausalLM.load_weights


# The random inits of torch.nn.init: skipped on meta tensors, where they would do nothing but
# import torch's Python decompositions (torch._refs, torch._prims: 2-5 s on 2 cores) to run.
_INITS = ("constant_", "kaiming_normal_", "kaiming_uniform_", "normal_", "ones_", "trunc_normal_", "uniform_",
          "xavier_normal_", "xavier_uniform_", "zeros_")


@contextmanager
def parameters_on_meta():
    """Inside, every parameter a module registers goes to the meta device, so constructors
    and their random inits allocate and compute nothing; buffers are created as usual. The
    patch is of ``nn.Module.register_parameter`` and torch.nn.init's functions for the whole
    process while the block runs (as accelerate's ``init_empty_weights``): build nothing on
    other threads meanwhile."""
    register_parameter = nn.Module.register_parameter
    inits = {name: getattr(nn.init, name) for name in _INITS}

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    def skip_on_meta(init):
        def run(tensor, *args, **kwargs):
            return tensor if tensor.is_meta else init(tensor, *args, **kwargs)

        return run

    nn.Module.register_parameter = register
    for name, init in inits.items():
        setattr(nn.init, name, skip_on_meta(init))
    try:
        yield
    finally:
        nn.Module.register_parameter = register_parameter
        for name, init in inits.items():
            setattr(nn.init, name, init)


def build(config, groups: list[int], weights: Mapping | None, dtype: torch.dtype,
          quantization: str | None = None) -> CausalLM:
    """The model of ``config`` on the CPU in ``dtype``, its weights read one at a time;
    ``weights=None`` or a model with its own ``load_weights``: built the eager way.
    ``quantization`` (model/quant.py's METHODS): its linears rounded, each as it is read."""
    from qkv.model import build_model
    from qkv.model.quant import check, quantize

    cpu = torch.device("cpu")
    if quantization:
        check(quantization, cpu)  # refused by name before anything is read
    if weights is not None:
        with parameters_on_meta():
            model = build_model(config, groups)
        if supported(model):
            from qkv.model import weight_cache

            # A GGUF's int4/int8 weights converted by an earlier load (model/weight_cache.py).
            cached = weight_cache.entry(weights, model, groups, dtype, quantization)
            hit = cached is not None and weight_cache.load(model, cached, dtype, quantization)
            if not hit:
                materialize(model, weights, dtype, quantization)
            model = model.to(dtype)  # buffers (RoPE tables) as the eager cast leaves them
            if quantization:
                with one_thread():  # what is left to round (a tied lm_head) in blocks of a few MB
                    quantize(model, quantization, cpu)
            if cached is not None and not hit:
                weight_cache.save(model, cached)
            return model
    model = build_model(config, groups)
    if weights is not None:
        model.load_weights(weights)
    model = model.to(dtype)
    return quantize(model, quantization, cpu) if quantization else model


@contextmanager
def one_thread():
    """One intra-op thread inside. Each copy, cast or rounding here is a few MB and memory-bound:
    a second thread only adds a barrier per op, and on a busy machine it made SmolLM2's
    copies and concatenations ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def materialize(model: CausalLM, weights: Mapping, dtype: torch.dtype, quantization: str | None = None) -> None:
    """Put every meta parameter of ``model`` from ``weights`` (HF names, as ``load_weights``
    takes them), read in ``dtype``, one parameter at a time. WeightError, as
    ``load_weights``, for an unexpected weight, a wrong shape or a missing parameter.
    ``quantization`` "int8"/"int4": an nn.Linear's weight is rounded as read and kept on the
    module (model/quant.py's ROUNDED), its parameter left on meta for ``quantize`` to swap."""
    rounding = quantization in ("int8", "int4")
    params = dict(model.named_parameters())
    plan: dict[str, dict[int, str]] = {}  # our parameter -> {shard index: HF name}
    for name in weights:
        ours = model.hf_name(name)
        if ours is None:
            continue
        for frag, (new, idx) in model.stacked.items():
            if frag in ours:
                plan.setdefault(ours.replace(frag, new), {})[idx] = name
                break
        else:
            plan.setdefault(ours, {})[-1] = name
    slots = _slots(model)
    try:
        with one_thread():
            for ours, names in plan.items():
                _put(model, weights, dtype, params[ours] if ours in params else None, ours, names, slots,
                     quantization if rounding else None)
    finally:
        _trim(force=True)
    if model.config.tie_word_embeddings and "lm_head.weight" not in plan and "lm_head.weight" in params:
        model.lm_head.weight = model.embedding_weight()
    from qkv.model.quant import ROUNDED

    rounded = {f"{n}.weight" for n, m in model.named_modules() if ROUNDED in m.__dict__}
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta" and n not in rounded]
    if missing:
        raise WeightError(f"weights missing for {len(missing)} parameters, e.g. {missing[:4]}")


def _from_q4_1(model, weights: Mapping, p, ours: str, names: dict[int, str], holders: list) -> bool:
    """Round linear weight ``ours`` to int4 straight from the file's Q4_1 blocks, keeping its
    codes (model/int4.py's ``pack_q4_1``), when every piece is stored so and the model takes
    them unchanged; False (nothing read) otherwise."""
    from qkv.loading.lazy import LazyWeights
    from qkv.model.int4 import pack_q4_1
    from qkv.model.quant import ROUNDED, uses_int4

    linear = _linear_of(holders)
    if not (isinstance(weights, LazyWeights) and linear is not None and type(model).transform is CausalLM.transform):
        return False
    if not uses_int4("int4", ours.split(".")[-2], linear) or not all(weights.has_q4_1(n) for n in names.values()):
        return False
    blocks = [weights.q4_1(names[i]) for i in sorted(names)]
    codes, d, m = (torch.cat(parts, 0) if len(parts) > 1 else parts[0] for parts in zip(*blocks))
    del blocks
    if tuple(codes.shape) != tuple(p.shape):
        raise WeightError(f"weight {names.get(-1, ours)!r} has shape {tuple(codes.shape)}, expected {tuple(p.shape)}")
    linear.__dict__[ROUNDED] = ("int4", *pack_q4_1(codes, d, m))
    _trim(codes.numel() * 3)
    return True


def _linear_of(holders: list) -> nn.Linear | None:
    """The nn.Linear whose weight (and only that) this parameter is: what may be rounded as read."""
    if len(holders) == 1 and holders[0][1] == "weight" and isinstance(holders[0][0], nn.Linear):
        return holders[0][0]
    return None


def _put(model, weights: Mapping, dtype: torch.dtype, p, ours: str, names: dict[int, str], slots: dict,
         quantization: str | None = None) -> None:
    """Read parameter ``ours`` (its pieces fused) and put it in place of meta parameter ``p``;
    with ``quantization``, a linear's weight is rounded instead (``materialize``)."""
    source = names.get(-1, ours)
    if p is None:
        raise WeightError(f"unexpected weight {source!r} (no parameter {ours!r})")
    if quantization == "int4" and _from_q4_1(model, weights, p, ours, names, slots[id(p)]):
        return
    pieces = [model.transform(names[i], read_as(weights, names[i], dtype)) for i in sorted(names)]
    w = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 0)
    del pieces
    if tuple(p.shape) != tuple(w.shape):
        raise WeightError(f"weight {source!r} has shape {tuple(w.shape)}, expected {tuple(p.shape)}")
    holders = slots[id(p)]
    linear = _linear_of(holders) if quantization else None
    if linear is not None:
        from qkv.model.quant import ROUNDED, quantize_weight

        linear.__dict__[ROUNDED] = quantize_weight(quantization, ours.split(".")[-2], linear, w)
        nbytes = w.numel() * w.element_size() * 3  # the pieces, their concatenation, the rounding's scratch
        del w
        _trim(nbytes)
        return
    new = nn.Parameter(w.contiguous(), requires_grad=p.requires_grad)
    for module, attr in holders:
        module._parameters[attr] = new
    _trim(w.numel() * w.element_size() * 2)  # the pieces and their concatenation
    del w, new


# Scratch freed between two trims: each ``malloc_trim`` walks the whole heap (182 calls were
# 0.15-0.4 s of SmolLM2's start-up), so it runs once this much has been freed, and at the end.
TRIM_BYTES = 8 << 20
_freed = 0


def _trim(nbytes: int = 0, force: bool = False) -> None:
    """Give the freed scratch of the last reads back to the OS. glibc keeps freed blocks of a
    few MB in its heap, between the parameters allocated after them, so without this the
    scratch of 272 reads stayed resident: SmolLM2 bf16 ended its build 60-90 MB above its
    weights, varying from run to run. ``malloc_trim`` returns free pages anywhere in the heap;
    it runs once ``TRIM_BYTES`` have been freed (``nbytes`` at a time), or with ``force``."""
    global _freed
    _freed += nbytes
    if _LIBC is not None and (force or _freed >= TRIM_BYTES):
        _LIBC.malloc_trim(0)
        _freed = 0


def _glibc():
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()


def _slots(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(parameter) -> every (module, attribute) holding it (a tied one is held twice)."""
    out: dict[int, list] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((module, attr))
    return out
