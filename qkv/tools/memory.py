"""``qkv memory``: what a model's KV cache costs, exactly, and what its attention twins would cost.

    qkv memory smollm2 --context 8192 --batch 4
    qkv memory ./llama-7b-config-dir --context 16384 --kv-bits 4 --json
    qkv memory gemma3-270m --plot kv.png
    qkv memory gemma3-270m --dtype float32 --kv-cache-memory 1073741824 --max-num-seqs 64

The last lines print the pools ``LLMEngine`` would build for a budget (``kvcache/plan.py``)
and the context they buy: tokens one sequence can reach, and tokens of global context all
sequences hold together.

The arithmetic is the engine's own: the cache specs of ``qkv.kvcache.spec`` (``layer_specs``,
``bytes_per_token``, ``blocks_needed``, the sliding-window ring) grouped by
``qkv.kvcache.manager.group_layers``, counted in whole blocks. There is no second formula
here, so a prediction equals what ``LLMEngine`` allocates for the same tokens, to the block.

Only the configuration is read: a directory needs just ``config.json``, and of a GGUF file
only the header (metadata and tensor names) is parsed; weights are never loaded.

Twins. Beside the model's own attention we price the same model with:
  - MHA: one KV head per query head;
  - GQA-g: g KV heads (the model's own g if it is GQA, else the largest divisor of the head
    count that is at most a quarter of it, e.g. 8 of 32; ``--gqa-kv-heads`` overrides);
  - MQA: one KV head;
  - MLA: every layer caches one latent of ``kv_lora_rank = 4 * head_dim`` plus a shared RoPE
    key of ``head_dim / 2``: DeepSeek-V2's ratio (512 + 64 for head_dim 128), scaled. The MLA
    twin has no sliding windows (DeepSeek-V2 has none).
For an MLA model the MHA/GQA/MQA twins use ``v_head_dim`` as head_dim, as the DeepSeek-V2
paper does when it compares with MHA (2 * heads * 128 values per layer-token).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

from qkv.config import ConfigError, ModelConfig
from qkv.kvcache.manager import group_layers
from qkv.kvcache.spec import CacheSpec, CrossAttention, SlidingWindow, layer_specs

DTYPE_BITS = {"float32": 32, "fp32": 32, "bfloat16": 16, "bf16": 16, "float16": 16, "fp16": 16,
              "int8": 8, "fp8": 8, "int4": 4}


# ---------------------------------------------------------------- config only
def read_config(model: str) -> ModelConfig:
    """The ModelConfig of a named model, a GGUF file, a directory or a ``config.json`` file,
    without loading any weights. Raises LoadError (a ValueError) naming the file."""
    from qkv.loading import LoadError
    from qkv.loading.models import NAMED, resolve

    path = resolve(model) if model in NAMED else Path(model).expanduser()
    if not path.exists():
        raise LoadError(f"{path}: no such file or directory (known names: {', '.join(NAMED)})")
    if path.is_dir():
        if (path / "model.bin").is_file() and not any(path.glob("*.safetensors")):  # as qkv.loading.load
            from qkv.loading.ct2_whisper import load_ct2_dir

            # A CTranslate2 Whisper directory (the named whisper-base): its config.json is not
            # HF's ("no 'model_type' field"); the shapes come from model.bin's variables.
            return load_ct2_dir(path)[0]
        path = path / "config.json"
    if path.suffix == ".json":
        from qkv.loading.hf import _read_json

        try:
            return ModelConfig.from_hf(_read_json(path, required=True), source=str(path))
        except ConfigError as e:
            raise LoadError(str(e)) from None
    from qkv.loading.gguf import MODEL_TYPES, gguf_config, read_gguf

    meta, tensors = read_gguf(str(path))  # header only: tensor data stays memory-mapped, unread
    arch = meta.get("general.architecture")
    if arch not in MODEL_TYPES:
        raise LoadError(f"{path}: unsupported GGUF architecture {arch!r}")
    cfg = gguf_config(meta, {t.name for t in tensors}, str(path))
    return cfg.replace(extra={**cfg.extra, "name": meta.get("general.name")})


# ---------------------------------------------------------------- arithmetic
def kv_specs(config: ModelConfig, bits: int | str) -> list[CacheSpec]:
    """The engine's per-layer cache specs at ``bits`` per element (a Fraction of a byte for
    4-bit, so every product stays exact), or, for a format name ("int4", "int4,int8"), the
    engine's packed specs: values and their group scales (kvcache/kv_pages.py)."""
    if isinstance(bits, str):
        from qkv.kvcache.kv_int import resolve
        from qkv.kvcache.kv_pages import with_packed

        return with_packed(layer_specs(config, 1), resolve(bits, None, None, None)[1])
    return layer_specs(config, Fraction(bits, 8))


class GroupFootprint(NamedTuple):
    spec: CacheSpec
    layers: list[int]
    bytes_per_token_per_layer: Fraction
    blocks_per_sequence: int  # per layer, from spec.blocks_needed (a ring caps it)
    bytes_per_sequence: Fraction  # whole blocks, all layers of the group
    block_bytes: Fraction  # one block of this group, all its layers (the engine's pool unit)


class Footprint(NamedTuple):
    config: ModelConfig
    context: int
    batch: int
    bits: int
    block_size: int
    groups: list[GroupFootprint]

    @property
    def bytes_per_token(self) -> Fraction:
        """What one cached token costs over all layers (before any window drops it). Cross-attention
        groups are per request, not per token: they count in ``bytes_per_sequence`` only."""
        return sum((g.bytes_per_token_per_layer * len(g.layers) for g in self.groups
                    if not isinstance(g.spec, CrossAttention)), Fraction(0))

    @property
    def bytes_per_sequence(self) -> Fraction:
        return sum((g.bytes_per_sequence for g in self.groups), Fraction(0))

    @property
    def total_bytes(self) -> Fraction:
        return self.bytes_per_sequence * self.batch

    @property
    def total_values(self) -> Fraction:
        """Cached values (scales not counted): bytes times each group's values per byte."""
        per_seq = sum((Fraction(g.bytes_per_sequence) * math.prod(g.spec.entry_shape) / g.bytes_per_token_per_layer
                       for g in self.groups), Fraction(0))
        return per_seq * self.batch


def footprint(config: ModelConfig, context: int, batch: int = 1, bits: int = 16,
              block_size: int = 16) -> Footprint:
    """KV bytes of ``batch`` sequences of ``context`` tokens each, windows applied, whole blocks."""
    if context < 1 or batch < 1 or block_size < 1:
        raise ValueError(f"context, batch and block size must be positive (got {context}, {batch}, {block_size})")
    groups = []
    for spec, layers in group_layers(kv_specs(config, bits)):
        blocks = spec.blocks_needed(context, block_size)
        block_bytes = spec.bytes_per_token * block_size * len(layers)
        groups.append(GroupFootprint(spec, layers, spec.bytes_per_token, blocks, blocks * block_bytes, block_bytes))
    return Footprint(config, context, batch, bits, block_size, groups)


def pool_bytes(config: ModelConfig, num_blocks: list[int], bits: int, block_size: int = 16,
               prefix_caching: bool = True) -> int:
    """Bytes of the cache tensors the engine's runner allocates for pools of ``num_blocks``
    (one count per layer group): each layer's ``spec.cache_shape`` times the element size.
    With prefix caching a sliding-window group has one more page, the null page that stands
    for blocks dropped out of the window (kvcache/manager.py)."""
    total = Fraction(0)
    for (spec, layers), n in zip(group_layers(kv_specs(config, bits)), num_blocks, strict=True):
        n += prefix_caching and isinstance(spec, SlidingWindow)
        total += math.prod(spec.cache_shape(n, block_size)) * spec.dtype_bytes * len(layers)
    return exact(total)


def engine_pools(config: ModelConfig, bits: int, block_size: int = 16, budget: int = 1 << 30,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048, prefix_caching: bool = True,
                 max_model_len: int | None = None) -> dict:
    """What the engine's pools would be for ``budget`` bytes (``LLMEngine``'s own split,
    kvcache/plan.py) and the context they buy: tokens one sequence can reach, and tokens of
    global context all sequences hold together."""
    from qkv.kvcache.manager import KVCacheManager
    from qkv.kvcache.plan import context_capacity, plan_num_blocks

    specs = kv_specs(config, bits)
    n = plan_num_blocks(specs, block_size, max_num_seqs, budget, prefix_caching=prefix_caching,
                        max_num_batched_tokens=max_num_batched_tokens,
                        max_model_len=min(max_model_len or config.max_context, config.max_context))
    kv = KVCacheManager(specs, block_size, n, prefix_caching)
    one, together = context_capacity(kv, max_model_len or config.max_context)
    return {"budget": budget, "max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens,
            "prefix_caching": prefix_caching, "blocks": {pool_name(g.spec): b for g, b in zip(kv.groups, n)},
            "bytes": pool_bytes(config, n, bits, block_size, prefix_caching),
            "context_per_sequence": one, "global_context_all_sequences": together}


def pool_name(spec: CacheSpec) -> str:
    """A group's key in ``pools.blocks``: its kind, and its dilation when dilated (two sliding
    groups then differ only by it)."""
    return spec.kind + (f" dilation {spec.dilation}" if getattr(spec, "dilation", 1) > 1 else "")


def exact(x: Fraction) -> int | float:
    """An int when whole (always, unless 4-bit elements come in odd counts)."""
    return int(x) if x.denominator == 1 else float(x)


# ---------------------------------------------------------------- twins
def default_gqa_kv_heads(config: ModelConfig) -> int | None:
    if 1 < config.num_kv_heads < config.num_heads and not config.kv_lora_rank:
        return config.num_kv_heads
    divisors = [d for d in range(2, config.num_heads) if config.num_heads % d == 0]
    quarter = [d for d in divisors if d <= config.num_heads // 4]
    return (quarter or divisors or [None])[-1]


def twins(config: ModelConfig, gqa_kv_heads: int | None = None,
          bits: int | str | None = None) -> dict[str, ModelConfig]:
    """The model under its own attention and as MHA, GQA-g, MQA and MLA (see module doc). No
    MLA twin for K and V stored apart (``bits`` "int4,int8"): its latent is one plane, and the
    engine refuses that (kv_pages.with_packed)."""
    n = config.num_heads
    if config.kv_lora_rank:  # an MLA model: its twins cache per-head K and V of v_head_dim
        base = config.replace(kv_lora_rank=None, q_lora_rank=None, head_dim=config.v_head_dim,
                              layer_types=["full"] * config.num_layers)
    else:
        base = config
    g = default_gqa_kv_heads(config) if gqa_kv_heads is None else gqa_kv_heads  # 0 is refused, not the default
    if g is not None and (g < 1 or n % g):
        raise ValueError(f"--gqa-kv-heads {g} must divide the {n} query heads")
    out = {f"model ({config.attention_kind})": config, "MHA": base.replace(num_kv_heads=n)}
    if g is not None and 1 < g < n:
        out[f"GQA-{g}"] = base.replace(num_kv_heads=g)
    out["MQA"] = base.replace(num_kv_heads=1)
    hd = base.head_dim
    if not _k_and_v_apart(bits):
        out["MLA"] = base.replace(kv_lora_rank=4 * hd, qk_rope_head_dim=max(1, hd // 2),
                                  layer_types=["mla"] * config.num_layers, dilation=1)
    return out


def _k_and_v_apart(bits: int | str | None) -> bool:
    """Does ``bits`` name different formats for K and V ("int4,int8")?"""
    if not isinstance(bits, str):
        return False
    from qkv.kvcache.kv_int import resolve

    packed = resolve(bits, None, None, None)[1]
    return packed is not None and packed.k != packed.v


# ---------------------------------------------------------------- report
def human(n: float) -> str:
    n = float(n)
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{float(n):.4g} B"


def describe(spec: CacheSpec) -> str:
    if spec.kind == "mla":
        return f"mla latent {spec.kv_lora_rank}+rope {spec.rope_dim}"
    text = f"{spec.kind} {spec.num_kv_heads}x{spec.head_dim}"
    text += f" window {spec.window}" if isinstance(spec, SlidingWindow) else ""
    return text + (f" dilation {spec.dilation}" if getattr(spec, "dilation", 1) > 1 else "")


def group_dict(g: GroupFootprint) -> dict:
    d = {"kind": g.spec.kind, "num_layers": len(g.layers), "layers": g.layers,
         "bytes_per_token_per_layer": exact(g.bytes_per_token_per_layer),
         "bytes_per_token": exact(g.bytes_per_token_per_layer * len(g.layers)),
         "blocks_per_sequence": g.blocks_per_sequence, "bytes_per_sequence": exact(g.bytes_per_sequence)}
    if g.spec.kind == "mla":
        d.update(kv_lora_rank=g.spec.kv_lora_rank, rope_dim=g.spec.rope_dim)
    else:
        d.update(num_kv_heads=g.spec.num_kv_heads, head_dim=g.spec.head_dim)
    if isinstance(g.spec, SlidingWindow):
        d["window"] = g.spec.window
        if g.spec.dilation > 1:
            d["dilation"] = g.spec.dilation
    if isinstance(g.spec, CrossAttention):
        d["encoder_len"] = g.spec.encoder_len  # blocks_per_sequence: the encoder's, whatever the context
    return d


def summary(f: Footprint) -> dict:
    return {"attention": f.config.attention_kind, "bytes_per_token": exact(f.bytes_per_token),
            "bytes_per_sequence": exact(f.bytes_per_sequence), "total_bytes": exact(f.total_bytes),
            "total_values": exact(f.total_values), "groups": [group_dict(g) for g in f.groups]}


def report(model: str, config: ModelConfig, context: int, batch: int, bits: int, block_size: int,
           gqa_kv_heads: int | None = None, pools: dict | None = None) -> dict:
    """Everything ``--json`` prints: the model's footprint at the top level, its twins under
    ``variants``, and the engine's pools for a budget under ``pools`` (``engine_pools`` kwargs)."""
    own = footprint(config, context, batch, bits, block_size)
    out = {"model": model, "name": config.extra.get("name") or config.extra.get("gguf_name"),
           "model_type": config.model_type, "num_layers": config.num_layers, "num_heads": config.num_heads,
           "context": context, "batch": batch, "kv_bits": bits, "block_size": block_size, **summary(own)}
    out["variants"] = {name: summary(footprint(c, context, batch, bits, block_size))
                       for name, c in twins(config, gqa_kv_heads, bits).items()}
    out["pools"] = engine_pools(config, bits, block_size, **(pools or {}))
    return out


def print_report(r: dict, file=None) -> None:
    p = lambda *a: print(*a, file=file or sys.stdout)  # noqa: E731
    p(f"{r['name'] or r['model']}: {r['model_type']}, {r['num_layers']} layers, {r['num_heads']} heads, "
      f"{r['attention']}")
    kv = f"{r['kv_bits']}-bit" if isinstance(r["kv_bits"], int) else f"{r['kv_bits']} (group scales included)"
    p(f"context {r['context']:,} tokens x batch {r['batch']}, KV {kv}, blocks of {r['block_size']} tokens")
    if r.get("tensor_parallel_size", 1) > 1:
        p(f"per rank of tensor_parallel_size {r['tensor_parallel_size']}: heads, bytes and pools are one rank's")
    p("")
    p(f"{'layer group':<36}{'layers':>7}{'B/token/layer':>15}{'B/token':>12}{'blocks/seq':>12}{'bytes/seq':>26}")
    for g in r["groups"]:
        label = f"{g['kind']} " + (f"latent {g['kv_lora_rank']}+rope {g['rope_dim']}" if g["kind"] == "mla"
                                   else f"{g['num_kv_heads']} kv heads x {g['head_dim']}")
        label += f" window {g['window']}" if "window" in g else ""
        label += f" dil {g['dilation']}" if "dilation" in g else ""
        label += f" encoder {g['encoder_len']}" if "encoder_len" in g else ""
        p(f"{label:<36}{g['num_layers']:>7}{g['bytes_per_token_per_layer']:>15,}{g['bytes_per_token']:>12,}"
          f"{g['blocks_per_sequence']:>12,}{g['bytes_per_sequence']:>16,} {human(g['bytes_per_sequence']):>9}")
    p("")
    p(f"per token (all layers): {r['bytes_per_token']:,} B ({human(r['bytes_per_token'])})")
    p(f"per sequence:           {r['bytes_per_sequence']:,} B ({human(r['bytes_per_sequence'])})")
    p(f"total (batch {r['batch']}):        {r['total_bytes']:,} B ({human(r['total_bytes'])}), "
      f"{r['total_values']:,} values")
    q = r["pools"]
    together = q["global_context_all_sequences"]
    p("")
    p(f"engine pools for a {human(q['budget'])} budget, max_num_seqs {q['max_num_seqs']}, prefix caching "
      f"{'on' if q['prefix_caching'] else 'off'}: " + ", ".join(f"{k} {v:,} blocks" for k, v in q["blocks"].items())
      + f" ({human(q['bytes'])})")
    p(f"context capacity: one sequence up to {q['context_per_sequence']:,} tokens; "
      + (f"{together:,} tokens of global context for all sequences together" if together is not None
         else "sliding windows only"))
    p("")
    p(f"{'variant':<16}{'B/token':>12}{'total':>27}{'vs model':>10}")
    for name, v in r["variants"].items():
        ratio = v["total_bytes"] / r["total_bytes"]
        p(f"{name:<16}{v['bytes_per_token']:>12,}{v['total_bytes']:>17,} {human(v['total_bytes']):>9}{ratio:>9.3f}x")


def plot(config: ModelConfig, context: int, batch: int, bits: int, block_size: int, out: str,
         gqa_kv_heads: int | None = None) -> None:
    """PNG of total KV bytes against context length for the model and its twins."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    xs = sorted({2 ** k for k in range(int(math.log2(max(block_size, 1))), int(math.log2(context)) + 1)} | {context})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, c in twins(config, gqa_kv_heads, bits).items():
        ys = [float(footprint(c, x, batch, bits, block_size).total_bytes) / (1 << 30) for x in xs]
        ax.plot(xs, ys, marker=".", linewidth=2.5 if name.startswith("model") else 1.2, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"KV cache (GiB, batch {batch}, {bits}-bit)")
    ax.set_title(f"KV cache of {config.extra.get('name') or config.model_type}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)


# ---------------------------------------------------------------- CLI
class _DeprecatedDtype(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        print("qkv memory: --dtype is deprecated, use --kv-dtype (the KV element type)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="named model, .gguf file, HF directory (config.json is enough) or config.json")
    p.add_argument("--context", type=int, default=None, help="tokens per sequence (default: the model's maximum)")
    p.add_argument("--batch", type=int, default=1, help="sequences held at once")
    p.add_argument("--kv-dtype", default="float16", type=_kv_dtype_arg,
                   help="KV element type (fp8: the engine's kv_dtype='fp8'; int8, int4 and 'K,V' pairs such as "
                        "int4,int8: the engine's packed pages, group scales included)")
    # Every other command's --dtype is the model's compute dtype; here it meant the KV element.
    p.add_argument("--dtype", dest="kv_dtype", choices=list(DTYPE_BITS), action=_DeprecatedDtype,
                   help=argparse.SUPPRESS)
    p.add_argument("--kv-bits", type=int, choices=(4, 8, 16, 32), default=None, help="overrides --kv-dtype")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (the engine's default: 16)")
    p.add_argument("--gqa-kv-heads", type=int, default=None, help="KV heads of the GQA twin")
    p.add_argument("--kv-cache-memory", type=int, default=1 << 30, metavar="BYTES",
                   help="the engine's KV budget to split into pools (default: 1 GiB, the CPU default)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="the engine's max_num_seqs (default 64)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="the engine's token budget per step (default 2048, the engine's on the CPU; on a GPU of "
                        ">= 70 GiB its auto picks 8192)")
    p.add_argument("--no-prefix-caching", action="store_true", help="size the pools for ring buffers")
    p.add_argument("--attention-override", default=None, metavar="JSON",
                   help='as the engine\'s flag, e.g. \'{"dilation": 2}\' (a dilated window holds more blocks)')
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor_parallel_size: report one rank's share (its KV heads, its bytes, its pools)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="draw KV bytes against context length")


def _kv_dtype_arg(value: str) -> str:
    from qkv.kvcache.kv_int import check_arg

    return value if value in DTYPE_BITS else check_arg(value)


def run(args) -> int:
    from qkv.attention_override import apply_attention_override

    config = apply_attention_override(read_config(args.model), args.attention_override, "--attention-override")
    # int8/int4 and K,V pairs: the engine's packed pages (scales included); --kv-bits: values only.
    packed = args.kv_dtype in ("int8", "int4") or args.kv_dtype not in DTYPE_BITS
    bits = args.kv_bits if args.kv_bits is not None else args.kv_dtype if packed else DTYPE_BITS[args.kv_dtype]
    if isinstance(bits, str):  # packed pages: the engine refuses them for an encoder-decoder, so its pools do not exist
        from qkv.engine.encoder import is_encoder_decoder

        if is_encoder_decoder(config):
            raise ValueError(f"--kv-dtype {args.kv_dtype}: {config.model_type}'s cross-attention cache does not read "
                             f"int8/int4 pages, and the engine refuses them; use a float --kv-dtype")
    # The engine refuses these at 0; here they printed pools for a default (--context 0: the
    # model's maximum) or for settings no engine runs with.
    for name in ("context", "max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    context = args.context or config.max_context
    if args.tp != 1:  # every number below is then per rank (qkv/distributed/shard.py)
        from qkv.distributed.shard import Layout, rank_config

        config = rank_config(config, Layout.of(config, args.tp))
    pools = dict(budget=args.kv_cache_memory, max_num_seqs=args.max_num_seqs,
                 max_num_batched_tokens=args.max_num_batched_tokens, prefix_caching=not args.no_prefix_caching)
    r = report(args.model, config, context, args.batch, bits, args.block_size, args.gqa_kv_heads, pools)
    r["tensor_parallel_size"] = args.tp
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print_report(r)
    if args.plot:
        plot(config, context, args.batch, bits, args.block_size, args.plot, args.gqa_kv_heads)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
