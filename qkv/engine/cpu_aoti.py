"""The CPU decode step compiled ahead of time (AOTInductor): built once, loaded in milliseconds.

``engine/cpu_compile.py``'s one-graph decode step, exported with ``torch.export`` for one
sequence: its inputs are the token, each RoPE table's rows at its position, each attention
view's slot and the slots of the keys it sees (``reference.visible_pages``: a sliding window's
without a mask), and each layer's paged cache, which the step writes in place; the key counts
and each cache group's page count are symbolic. AOTInductor
(``torch._inductor.aoti_compile_and_package``) compiles it into a ``.pt2`` package under
``cache_dir()/aoti`` (``QKV_CACHE_DIR``, else ``~/.cache/qkv``).
A later process loads the package's shared library with torch's C++ loader (no Dynamo, no
``torch._inductor`` import: a few milliseconds) and hands it the eager model's own weight
tensors (``user_managed``: no copy, no second set of weights in memory).

Built by ``qkv compile MODEL`` (``scripts/setup.sh`` builds the default model's: about a
minute on 2 quiet cores for SmolLM2; Gemma 3 270M: ``qkv compile gemma3-270m``) or ``build(llm)``; ``LLM(...)`` on a CPU uses a package when one matches
(``aot_decode=None``, the default) and runs eagerly otherwise. The package is keyed by the
model file (resolved path, size, modification time), the weight quantization, dtype and KV
cache layout, torch's version, the CPU's instruction set and the source of the step's code,
so a changed file or a new torch means another key: the old package is never used. One whose
key does not match its file, or that fails to load, is refused with one line on stderr and
the engine runs eagerly: a package can make decode faster, never make the engine fail.

One-sequence decode steps run that package (the README's first command, ``qkv chat``).
Steps of 2 to ``MAX_BATCH`` sequences run a second one (``build(..., batched=True)``,
``KEY-batch.pt2``; int4 and float layers): the same ``decode_layers`` exported with the
batch size symbolic and each view's mask an input, its few-row int4 products and (bf16 pages)
its attention the eager step's C kernels as the torch operators ``qkv::int4_rows`` and
``qkv::decode_attn``, which the package calls back into; what it saves is the eager step's
~25 small ops a layer (a SmolLM2 16-row step ~47 -> ~37 ms, docs/benchmarks.md). Prefill and
mixed steps run eagerly. The eager model is the oracle: tests/test_cpu_aoti.py (Llama),
tests/test_cpu_aoti_gemma3.py and tests/test_cpu_aoti_batch.py compare the two.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from qkv.attention import reference
from qkv.engine.cpu_compile import decode_layers, plan, unsupported
from qkv.model import int4_rows

# The files whose code the exported step runs: an edit to any makes old packages stale.
STEP_SOURCES = ("engine/cpu_aoti.py", "engine/cpu_compile.py", "attention/reference.py", "model/layers.py",
                "model/int4.py", "model/quant.py", "model/int8_gemv.py", "model/llama.py", "model/gemma3.py",
                "kvcache/kv_pages.py", "model/int4_rows.py", "attention/decode_native.py")
# The batched package's batch sizes: from 2 (one sequence is the other package's) to where
# Int4Linear's products leave the few-row kernel for the bf16 GEMM (model/int4.py).
MAX_BATCH = 255
QKV_ROOT = Path(__file__).resolve().parent.parent
# The package is built and opened through torch's private AOTI API (torch._C._aoti), which
# changes between releases: verified on torch 2.13 (CI); on torch 2.11 (the H200 machine,
# 2026-12-04) AOTIModelPackageLoader segfaulted on a freshly built package. Older torch decodes
# eagerly: refused by name, never a crash.
MIN_TORCH = (2, 13)


def torch_unsupported(version: str | None = None) -> str | None:
    """Why this torch cannot build or open packages (one line), or None when it can."""
    version = version or torch.__version__
    try:
        have = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
    except ValueError:
        have = (0, 0)  # a version string we cannot read: treat as unverified
    if have >= MIN_TORCH:
        return None
    return f"the compiled CPU decode step needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} (this is torch {version})"


def log(msg: str) -> None:
    print(f"[qkv] {msg}", file=sys.stderr, flush=True)


def _settings(llm) -> str:
    """What the package depends on besides file versions: the model's path and the engine's
    settings (two packages with the same settings and different keys: the older is stale)."""
    engine = llm.engine
    cache = engine.runner.kv_caches[0]
    return "|".join([str(Path(llm.source).resolve()), str(getattr(llm, "quantization", None)), str(engine.dtype),
                     str(cache.dtype), str(tuple(cache.shape[2:]))])


def key(llm) -> str | None:
    """The package key of this LLM's model and settings (None: its source is not a file or a
    directory, nothing to key on)."""
    try:
        src = Path(llm.source).resolve()
        files = [src] if src.is_file() else sorted(p for p in src.iterdir() if p.is_file())
        ids = [f"{f}|{f.stat().st_size}|{f.stat().st_mtime_ns}" for f in files]
        code = b"".join((QKV_ROOT / s).read_bytes() for s in STEP_SOURCES)
    except OSError:
        return None
    parts = ids + [_settings(llm), torch.__version__, torch.backends.cpu.get_cpu_capability()]
    h = hashlib.sha256("\n".join(parts).encode())
    h.update(code)
    return h.hexdigest()[:32]


def _prune(directory: Path, keep: str, settings: str) -> None:
    """Delete the packages of the same model and settings other than ``keep`` (stale: built by
    other code, another torch, or before the model file changed)."""
    for f in directory.glob("*.json"):
        if f.stem == keep:
            continue
        try:
            if json.loads(f.read_text()).get("settings") == settings:
                f.with_suffix(".pt2").unlink(missing_ok=True)
                f.unlink()
        except (OSError, ValueError, AttributeError):
            continue  # unreadable or foreign: not ours to judge


def package_path(llm, batched: bool = False) -> Path | None:
    """Where this LLM's one-sequence package is (``batched``: its package for steps of 2 to
    ``MAX_BATCH`` sequences)."""
    from qkv.loading.models import cache_dir

    k = key(llm)
    return None if k is None else cache_dir() / "aoti" / f"{k}{BATCH_SUFFIX if batched else ''}.pt2"


BATCH_SUFFIX = "-batch"  # the batched package's file name and key: the one-sequence one's plus this


class _Step(torch.nn.Module):
    """The exported function: ``decode_layers`` for one sequence, its inputs flat (``_inputs``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.plan = plan(model)

    def forward(self, input_ids, *args):
        r, v = 2 * len(self.plan.ropes), 2 * len(self.plan.views)
        ropes = [(args[i], args[i + 1]) for i in range(0, r, 2)]
        views = [(args[i], args[i + 1], None) for i in range(r, r + v, 2)]
        return decode_layers(self.model, self.plan, input_ids, ropes, views, args[r + v :])


class _BatchStep(torch.nn.Module):
    """The batched package's function: ``decode_layers`` for 2 to ``MAX_BATCH`` sequences, each
    view's inputs (slots [B], pages [B, L], keep bool [B, L]); ``native``: the C attention
    operator (bf16 pages), else ``decode_pages`` with the mask."""

    def __init__(self, model, native: bool):
        super().__init__()
        self.model, self.native = model, native
        self.plan = plan(model)

    def forward(self, input_ids, *args):
        r, v = 2 * len(self.plan.ropes), 3 * len(self.plan.views)
        ropes = [(args[i], args[i + 1]) for i in range(0, r, 2)]
        views = [(args[i], args[i + 1], args[i + 2] if self.native else args[i + 2][:, None, None, :])
                 for i in range(r, r + v, 3)]
        return decode_layers(self.model, self.plan, input_ids, ropes, views, args[r + v :], self.native)


def _native_attention(model) -> bool:
    """Whether the batched step attends with the C kernel's operator, as the eager step does
    (attention/decode_native.py: bf16 pages of one width and a bf16 query)."""
    from qkv.attention import decode_native

    caches = _caches(model)
    a = model.model.layers[0].self_attn
    return (all(c.dtype == torch.bfloat16 and c.shape[-1] == a.head_dim for c in caches)
            and model.model.embed_tokens.weight.dtype == torch.bfloat16
            and a.head_dim <= decode_native.MAX_HEAD_DIM and decode_native.op() is not None)


def _batch_views(step, batch) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each view's (slots, pages, keep) for a step of several sequences, as the eager layers
    compute them (``reference.step_indices``, once a step)."""
    views = []
    for g, w in step.views:
        ix = reference.step_indices(batch, g, w)
        views.append((batch.slot_mappings[g], ix.from_pages, ix.mask.reshape(ix.from_pages.shape)))
    return views


def _inputs(step, input_ids, positions, views, caches) -> list[torch.Tensor]:
    """The package's inputs: the token, each RoPE table's cos and sin rows at its position, each
    attention view's (slots, visible pages), each layer's cache. ``step``: ``plan(model)``."""
    ropes = [t for r in step.ropes for t in (r.cos[positions][:, None, :], r.sin[positions][:, None, :])]
    return [input_ids, *ropes, *(t for view in views for t in view), *caches]


def _example(step, caches) -> list[torch.Tensor]:
    """The inputs the step is exported with (their dtypes are the ones it takes). The views'
    key counts and the groups' page counts differ, so that no two symbolic sizes start equal."""
    views = [(torch.tensor([1]), torch.arange(2 + i)[None]) for i in range(len(step.views))]
    return _inputs(step, torch.tensor([1]), torch.tensor([1]), views, caches)


def _batch_example(step, caches) -> list[torch.Tensor]:
    """The batched package's example inputs: 3 sequences, each view's key count its own (7, 8,
    ...) and none equal to the batch or a page count, so that each stays its own symbolic size."""
    b = 3
    views = [(torch.arange(b), torch.arange(7 + i).repeat(b, 1), torch.ones(b, 7 + i, dtype=torch.bool))
             for i in range(len(step.views))]
    return _inputs(step, torch.arange(b), torch.arange(b), views, caches)


def _fixed(step, batched: bool = False) -> int:
    """How many of the inputs come before the caches."""
    return 1 + 2 * len(step.ropes) + (3 if batched else 2) * len(step.views)


@contextlib.contextmanager
def _captured_constants():
    """The tensors inductor adds to the graph as new constants while compiling (the int4
    matmul's group size, a 0-d tensor): not the model's, so ``load_constants`` needs them
    saved beside the package (its weights are left out of it). Saved as JSON: they are a few
    numbers, and ``torch.load`` would add ~85 MB of peak memory to the first command."""
    from torch._inductor.graph import GraphLowering

    seen: dict[str, torch.Tensor] = {}
    orig = GraphLowering.allocate_non_dup_const_name

    def allocate(self, name, data):
        new = orig(self, name, data)
        seen[new] = data
        return new

    GraphLowering.allocate_non_dup_const_name = allocate
    try:
        yield seen
    finally:
        GraphLowering.allocate_non_dup_const_name = orig


def build(llm, path: Path | None = None, batched: bool = False) -> Path:
    """Export and compile this LLM's one-sequence decode step into its package (minutes);
    ``batched``: its step of 2 to ``MAX_BATCH`` sequences (another package). ValueError for a
    model or device it does not cover."""
    engine = llm.engine
    if engine.device.type != "cpu" or engine.tp is not None:
        raise ValueError("the compiled decode step is the CPU path (one process)")
    why = unsupported(engine.model, engine.runner)
    if why is not None:
        raise ValueError(f"the compiled decode step does not cover {why}")
    old_torch = torch_unsupported()
    if old_torch is not None:
        raise ValueError(old_torch)
    if batched and _has_int8_layers(engine.model):
        raise ValueError("the batched compiled step covers int4 and float layers (not int8 ones)")
    k = key(llm)
    path = path or package_path(llm, batched)
    if k is None or path is None:
        raise ValueError(f"{llm.source}: not a file or directory, so a package cannot be keyed to it")
    k, settings = (k + BATCH_SUFFIX, _settings(llm) + BATCH_SUFFIX) if batched else (k, _settings(llm))
    import torch._inductor

    model, step = engine.model, plan(engine.model)
    groups = [layer.self_attn.group for layer in model.model.layers]
    # Example caches of each group's shape with a page count of its own (a few pages: the
    # export does not run them), so that each group's count is its own symbolic size.
    real = _caches(model)
    caches = [torch.zeros((2, 3 + len(step.views) + g, *c.shape[2:]), dtype=c.dtype) for c, g in zip(real, groups)]
    blocks = {g: torch.export.Dim(f"blocks{g}", min=2) for g in sorted(set(groups))}
    if batched:
        example = _batch_example(step, caches)
        rows = torch.export.Dim("rows", min=2, max=MAX_BATCH)
        keys = [torch.export.Dim(f"keys{i}", min=2) for i in range(len(step.views))]
        shapes = ({0: rows}, tuple([{0: rows}] * 2 * len(step.ropes)
                                   + [x for k in keys for x in ({0: rows}, {0: rows, 1: k}, {0: rows, 1: k})]
                                   + [{1: blocks[g]} for g in groups]))
        module, tracing = _BatchStep(model, _native_attention(model)), int4_rows.as_op()
    else:
        example = _example(step, caches)
        keys = [{1: torch.export.Dim(f"keys{i}", min=2)} for i in range(len(step.views))]
        shapes = (None, tuple([None] * 2 * len(step.ropes) + [x for k in keys for x in (None, k)]
                              + [{1: blocks[g]} for g in groups]))  # input_ids, then *args as one tuple
        module, tracing = _Step(model), contextlib.nullcontext()
    with torch.no_grad(), warnings.catch_warnings(), tracing:
        warnings.simplefilter("ignore")  # torch's deprecation notices about its own internals
        ep = torch.export.export(module.eval(), tuple(example), dynamic_shapes=shapes, strict=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp.pt2")
    os.close(fd)
    try:
        with _captured_constants() as seen, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch._inductor.aoti_compile_and_package(ep, package_path=tmp, inductor_configs={
                "aot_inductor.package_constants_in_so": False, "aot_inductor.metadata": {"qkv_key": k}})
        mine = _fqns(model)
        wanted = torch._C._aoti.AOTIModelPackageLoader(tmp, "model", False, 1, -1).get_constant_fqns()
        extra = {n: {"dtype": str(seen[n].dtype).removeprefix("torch."), "shape": list(seen[n].shape),
                     "values": seen[n].flatten().tolist()} for n in wanted if n not in mine}
        path.with_suffix(".json").write_text(json.dumps({"settings": settings, "constants": extra}))
        os.replace(tmp, path)  # last: a package on disk always has its constants beside it
        _prune(path.parent, path.stem, settings)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _has_int8_layers(model) -> bool:
    from qkv.model.quant import Int8Linear

    return any(isinstance(m, Int8Linear) for m in model.model.layers.modules())


def _caches(model) -> list[torch.Tensor]:
    return [layer.self_attn.kv_cache for layer in model.model.layers]


def _fqns(model) -> dict[str, torch.Tensor]:
    """The model's tensors by the names the package gives them (the step holds it as ``model``):
    its state dict and its buffers that are not saved (Int8Linear's row sums)."""
    named = dict(model.state_dict(keep_vars=True))
    named.update(model.named_buffers())
    return {f"model.{n}": t for n, t in named.items()}


class AOTDecode:
    """``run(input_ids, positions, batch)`` for a decode batch, as CompiledDecode: the
    package for one sequence, the batched package (``batched``, where built) for 2 to
    ``MAX_BATCH``, the eager model otherwise."""

    def __init__(self, loader, model, caches, batched=None):
        self.loader, self.model, self.caches = loader, model, list(caches)
        self.batched = batched
        self.plan = plan(model)
        self.checked = self.batch_checked = False

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, batch) -> torch.Tensor:
        if 1 < batch.num_seqs <= MAX_BATCH and self.batched is not None:
            views = _batch_views(self.plan, batch)
            if all(pages.shape[1] >= 2 for _, pages, _ in views):  # (exported for 2 keys or more)
                args = _inputs(self.plan, input_ids, positions, views, self.caches)
                try:
                    if not self.batch_checked:  # as below, for the batched package
                        _check_inputs(args, _batch_example(self.plan, []), _fixed(self.plan, batched=True))
                        self.batch_checked = True
                    return self.batched.boxed_run(args)[0]
                except Exception as e:  # never fail a request for it: batched steps run eagerly from now on
                    log(f"compiled batched decode step failed ({_first_line(e)}); decoding batches eagerly from now on")
                    self.batched = None
        if batch.num_seqs == 1 and self.loader is not None:
            views = [(batch.slot_mappings[g], reference.visible_pages(batch, g, w)) for g, w in self.plan.views]
            # (Exported for 2 keys or more: a first step from a one-token prompt runs eagerly.)
            if all(pages.shape[1] >= 2 for _, pages in views):
                args = _inputs(self.plan, input_ids, positions, views, self.caches)
                try:
                    if not self.checked:  # the library reads raw pointers: the dtypes it was built for, once
                        _check_inputs(args, _example(self.plan, []), _fixed(self.plan))
                        self.checked = True
                    return self.loader.boxed_run(args)[0]
                except Exception as e:  # never fail a request for it: this step and the rest run eagerly
                    log(f"compiled decode step failed ({_first_line(e)}); decoding eagerly from now on")
                    self.loader = None
        return self.model(input_ids, positions, batch)


def _check_inputs(args: list, example: list, n: int) -> None:
    """Raise ValueError unless the first ``n`` inputs have the example's dtypes and are
    contiguous: a compiled package reads raw pointers."""
    got, want = [a.dtype for a in args[:n]], [a.dtype for a in example[:n]]
    if got != want or not all(a.is_contiguous() for a in args[:n]):
        raise ValueError(f"inputs of dtypes {got}, built for {want}")


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def load(llm, path: Path | None = None, verbose: bool = False) -> AOTDecode | None:
    """The package of this LLM, loaded onto its model and caches; None (with one line on stderr
    saying why, unless there is simply no package) when there is none to use. ``verbose``: a
    line saying that one is used."""
    t = time.perf_counter()
    engine = llm.engine
    if engine.device.type != "cpu" or engine.tp is not None or unsupported(engine.model, engine.runner):
        return None
    old_torch = torch_unsupported()
    if old_torch is not None:
        if verbose:
            log(f"decode steps run eagerly: {old_torch}")
        return None
    k = key(llm)
    one = path or package_path(llm)
    two = None if path is not None else package_path(llm, batched=True)  # a path given: that package alone
    if k is None or one is None or not (one.is_file() or (two is not None and two.is_file())):
        if verbose:
            log("decode steps run eagerly: no compiled step for this model and settings (build it: qkv compile)")
        return None
    loader = _open(one, k, engine.model) if one.is_file() else None
    batched = _open(two, k + BATCH_SUFFIX, engine.model) if two is not None and two.is_file() else None
    if loader is None and batched is None:
        return None
    if verbose:
        said = [f"{what} decode steps run the compiled step {p}" for what, p, ld in
                (("one-sequence", one, loader), ("batched", two, batched)) if ld is not None]
        log(f"{'; '.join(said)} (loaded in {time.perf_counter() - t:.3f} s)")
    return AOTDecode(loader, engine.model, _caches(engine.model), batched)


def _open(path: Path, k: str, model):
    """The package at ``path``, its constants loaded from ``model``; None with one line on
    stderr when it cannot be used."""
    try:
        from qkv.attention import decode_native
        from qkv.model import int4_rows, int8_gemv

        # The operators a package calls back into (its int8 and int4 products, the batched
        # step's attention): defined before it loads.
        int8_gemv.op(), int4_rows.op(), decode_native.op()
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        found = loader.get_metadata().get("qkv_key")
        if found != k:
            raise ValueError(f"it was built for another model or settings (key {found}, want {k})")
        consts = {n: torch.tensor(c["values"], dtype=getattr(torch, c["dtype"])).view(c["shape"])
                  for n, c in json.loads(path.with_suffix(".json").read_text())["constants"].items()}
        mine = _fqns(model)
        want = loader.get_constant_fqns()
        missing = [n for n in want if n not in mine and n not in consts]
        if missing:
            raise ValueError(f"it needs tensors this model does not have ({', '.join(missing[:3])})")
        loader.load_constants({n: (mine[n].detach() if n in mine else consts[n]) for n in want}, False, True, True, False)
    except Exception as e:  # a corrupt, foreign or stale file: run eagerly, say so once
        log(f"compiled decode step {path} not used ({_first_line(e)}); running eagerly (rebuild: qkv compile)")
        return None
    return loader
