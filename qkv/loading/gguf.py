"""Load a GGUF file: ModelConfig, weights under HF names (read on access), and the tokenizer.

The weights equal what ``transformers`` makes of the same file
(``from_pretrained(dir, gguf_file=...)``): llama.cpp's converter changes some tensors, and
loading/gguf_dequant.py undoes each change the way transformers does.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import struct
from functools import partial
from typing import NamedTuple

import numpy as np
import torch

from qkv.config import ConfigError, ModelConfig

from .errors import LoadError
from .gguf_dequant import needs_whole, read_q4_1, read_tensor, unpermute
from .lazy import LazyWeights
from .tokenizer import ChatTemplateError, Tokenizer

# GGUF ``general.architecture`` -> HF ``model_type``.
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text", "gpt2": "gpt2"}

_LLAMA_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GEMMA3_LAYER = {
    **_LLAMA_LAYER,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GPT2_LAYER = {
    "attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj",
}
_LLAMA_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GPT2_GLOBAL = {
    "token_embd": "transformer.wte", "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f", "output": "lm_head",
}
# Tensors llama.cpp adds that HF recomputes (llama 3 RoPE frequencies).
_IGNORED = {"rope_freqs.weight"}


def load_gguf(path: str) -> tuple[ModelConfig, LazyWeights, Tokenizer | None]:
    """Read ``path``; raise LoadError naming it for anything unreadable or unsupported. The
    weights stay in the memory-mapped file until read (loading/lazy.py); names, shapes and
    quantization types are checked here, before anything is dequantized."""
    meta, tensors = read_gguf(path)
    if meta.get("split.count", 1) != 1:  # a part names its siblings; we read one file only
        raise LoadError(f"{path}: part of a split GGUF ({meta.get('split.count')} parts); merge them first "
                        f"(llama-gguf-split --merge FIRST-PART OUT.gguf)")
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or arch not in MODEL_TYPES:
        raise LoadError(f"{path}: unsupported GGUF architecture {arch!r} (supported: {', '.join(MODEL_TYPES)})")
    if "tokenizer.ggml.tokens" in meta:  # before the slow weight conversion
        _check_tokenizer_meta(meta, path)
    names = {t.name for t in tensors}
    cfg = gguf_config(meta, names, path)
    weights = lazy_weights(tensors, arch, cfg, path)
    tok = gguf_tokenizer(meta, path, checked=True) if "tokenizer.ggml.tokens" in meta else None
    if tok is not None:
        cfg = cfg.replace(eos_token_ids=list(dict.fromkeys(cfg.eos_token_ids + tok.eos_token_ids)))
    return cfg, weights, tok


class TensorInfo(NamedTuple):
    name: str
    qtype: int  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (GGUF lists dims fastest-first)
    data: np.ndarray  # raw bytes, shape (*shape[:-1], bytes per row), memory-mapped


# The fewest bytes one array element of each type takes: a string its length, an array its
# type and count. Counts are checked against what is left of the file with them.
_MIN_VALUE_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 8: 8, 9: 12, 10: 8, 11: 8, 12: 8}
_MAX_ARRAY_DEPTH = 4  # llama.cpp reads none nested; gguf-py's writer nests lists

_U64 = struct.Struct("<Q")
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_lib():
    """The ``gguf`` package (a dependency, imported when a GGUF file is read), or LoadError
    naming it: a missing package is a clear message, not a ModuleNotFoundError trace."""
    try:
        import gguf
        import gguf.quants  # noqa: F401
    except ImportError as e:
        raise LoadError(f"reading GGUF files needs the gguf package ({e}): pip install 'gguf>=0.10'") from None
    return gguf


def read_gguf(path: str) -> tuple[dict, list[TensorInfo]]:
    """Parse a GGUF file's metadata and tensor table; tensor data stays memory-mapped.

    A small reader of our own: ``gguf.GGUFReader`` builds a numpy view per
    vocabulary string and takes ~20 s on Gemma's 262k-token vocabulary.
    Raises LoadError for a bad magic, a truncated header or tensor data
    lying past the end of the file.
    """
    lib = gguf_lib()
    GGML_QUANT_SIZES, GGMLQuantizationType = lib.GGML_QUANT_SIZES, lib.GGMLQuantizationType

    try:
        buf = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise LoadError(f"{path}: cannot read file ({e})") from None
    raw = memoryview(buf)
    pos = 0

    def take(fmt: str):
        nonlocal pos
        v = struct.unpack_from(fmt, raw, pos)[0]
        pos += struct.calcsize(fmt)
        return v

    key = "the header"  # what is being read, for the error message

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        if pos + n > len(raw):
            raise struct.error("string runs past the end of the file")
        pos += n
        try:  # GGUF strings are UTF-8; a corrupt byte must not become a silently different token
            return bytes(raw[pos - n : pos]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{key}: a string is not valid UTF-8 ({e.reason} at byte {e.start})") from None

    def strings(count: int) -> list[str]:
        """``count`` strings in a row: ``string`` inlined, since a vocabulary holds ~10^5 of
        them (SmolLM2's tokens and merges: 0.42 s the generic way)."""
        nonlocal pos
        out, end, at, unpack = [], len(raw), pos, _U64.unpack_from
        append = out.append
        try:
            for _ in range(count):
                n = unpack(raw, at)[0]
                at += 8
                if at + n > end:
                    raise struct.error("string runs past the end of the file")
                append(str(raw[at : at + n], "utf-8"))
                at += n
        except UnicodeDecodeError as e:
            raise ValueError(f"{key}: a string is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        finally:
            pos = at
        return out

    def room(count: int, least: int, what: str) -> None:
        """Refuse a count the rest of the file cannot hold (``least`` bytes each) before any
        loop or allocation trusts it."""
        if count * least > len(raw) - pos:
            raise ValueError(f"{key}: {what} claims {count:,} items, more than the file's "
                             f"{len(raw) - pos:,} remaining bytes can hold")

    def value(vtype: int, depth: int = 0):
        nonlocal pos
        if vtype == 8:
            return string()
        if vtype == 9:
            if depth >= _MAX_ARRAY_DEPTH:
                raise ValueError(f"{key}: arrays nested more than {_MAX_ARRAY_DEPTH} deep")
            itype, count = take("<I"), take("<Q")
            room(count, _MIN_VALUE_BYTES.get(itype, 1), "an array")
            if itype in _SCALARS and itype != 7:
                dt = np.dtype(_SCALARS[itype])
                if pos + count * dt.itemsize > len(raw):
                    raise struct.error("array runs past the end of the file")
                arr = np.frombuffer(raw, dtype=dt, count=count, offset=pos)
                pos += count * dt.itemsize
                return arr.tolist()
            if itype == 8:
                return strings(count)
            return [value(itype, depth + 1) for _ in range(count)]
        if vtype not in _SCALARS:
            raise ValueError(f"unknown metadata value type {vtype}")
        return take(_SCALARS[vtype])

    try:
        if bytes(raw[:4]) != b"GGUF":
            raise ValueError(f"bad magic {bytes(raw[:4])!r}, expected b'GGUF'")
        pos = 4
        version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        room(n_kv, 8 + 4 + 1, "the metadata count")  # key length, value type, a byte of value
        room(n_tensors, 8 + 4 + 8 + 4 + 8, "the tensor count")  # name length, ndim, a dim, type, offset
        meta = {}
        for _ in range(n_kv):
            key = "a metadata key"
            key = string()
            meta[key] = value(take("<I"))
        infos = []
        key = "the tensor table"
        for _ in range(n_tensors):
            name, ndim = string(), take("<I")
            if not 1 <= ndim <= 4:  # GGML_MAX_DIMS
                raise ValueError(f"tensor {name!r} has {ndim} dimensions (1 to 4 allowed)")
            dims = [take("<Q") for _ in range(ndim)]
            qtype = GGMLQuantizationType(take("<I"))
            if qtype not in GGML_QUANT_SIZES:
                raise ValueError(f"tensor {name!r} has type {qtype.name}, which has no known block size")
            if min(dims) < 1 or dims[0] % GGML_QUANT_SIZES[qtype][0]:
                raise ValueError(f"tensor {name!r} has impossible dimensions {dims} for {qtype.name}")
            infos.append((name, dims, qtype, take("<Q")))
    except (struct.error, ValueError) as e:
        raise LoadError(f"{path}: not a valid GGUF file ({e})") from None
    align = meta.get("general.alignment", 32)
    if type(align) is not int or align < 1:
        raise LoadError(f"{path}: general.alignment must be a positive integer, got {align!r}")
    start = (pos + align - 1) // align * align
    tensors = []
    spans = []
    for name, dims, qtype, offset in infos:
        block, type_size = GGML_QUANT_SIZES[qtype]
        row_bytes = dims[0] // block * type_size
        n_bytes = row_bytes * math.prod(dims[1:])  # Python ints: a corrupt header cannot overflow
        begin = start + offset
        if begin + n_bytes > len(buf):
            raise LoadError(f"{path}: truncated GGUF file: tensor {name!r} ends past the end of the file")
        spans.append((offset, offset + n_bytes, name))
        byte_shape = (*reversed(dims[1:]), row_bytes)
        tensors.append(TensorInfo(name, qtype, (*reversed(dims[1:]), dims[0]), buf[begin : begin + n_bytes].reshape(byte_shape)))
    # Overlapping tensors would let a small file claim (and dequantize into) any amount of memory.
    spans.sort()
    for (_, end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < end:
            raise LoadError(f"{path}: not a valid GGUF file (tensor {name!r} overlaps tensor {prev!r})")
    return meta, tensors


def gguf_config(meta: dict, tensor_names: set[str], path: str) -> ModelConfig:
    """Translate GGUF metadata to an HF-style config dict, then normalize it with ``ModelConfig.from_hf``."""
    arch = meta["general.architecture"]
    model_type = MODEL_TYPES[arch]
    if arch == "llama" and "mistral" in str(meta.get("general.name", "")).lower():
        model_type = "mistral"  # as transformers does

    floats = ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon", "rope.freq_base",
              "rope.scaling.factor", "final_logit_softcapping")

    def get(key, default=None, required=True):
        """``{arch}.{key}``, checked: a positive int, a positive finite float (``floats``) or,
        for the RoPE scaling type, a string. A wrong type is a LoadError naming the key."""
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            if required:
                raise LoadError(f"{path}: GGUF metadata lacks {arch}.{key}")
            return None
        if key == "rope.scaling.type":
            ok = isinstance(v, str)
        elif key in floats:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        else:
            ok = type(v) is int and v > 0
        if not ok:
            want = "a string" if key == "rope.scaling.type" else "a positive number" if key in floats else "a positive integer"
            raise LoadError(f"{path}: GGUF metadata {arch}.{key} must be {want}, got {v!r}")
        return v

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    head_dim = get("attention.key_length", required=False)
    if head_dim is None and arch == "llama":
        head_dim = get("rope.dimension_count", required=False)
    if head_dim is None and hidden % heads:
        raise LoadError(f"{path}: {arch}.embedding_length {hidden} is not a multiple of "
                        f"{arch}.attention.head_count {heads}, and no head size is given")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size", required=False) or (len(tokens) if tokens else None)
    if vocab is None:
        raise LoadError(f"{path}: GGUF metadata gives no vocabulary size")
    d = {
        "model_type": model_type,
        "dtype": "bfloat16",  # what "auto" computes a GGUF model in on CUDA (engine/dtype.py)
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads, required=False),
        "head_dim": head_dim or hidden // heads,
        "intermediate_size": get("feed_forward_length"),
        "max_position_embeddings": get("context_length", 2048, required=False),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6, required=False),
        "rope_theta": get("rope.freq_base", 10000.0, required=False),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    scaling = get("rope.scaling.type", required=False)
    if scaling not in (None, "none"):
        d["rope_scaling"] = {"rope_type": scaling, "factor": get("rope.scaling.factor", 1.0, required=False)}
        if (orig := get("rope.scaling.original_context_length", required=False)) is not None:
            d["rope_scaling"]["original_max_position_embeddings"] = orig
    if arch == "gemma3":
        # The file lacks the local RoPE base and the 5:1 pattern; these are
        # Gemma 3's fixed values (HF config: rope_local_base_freq, sliding_window_pattern).
        d.update(
            sliding_window=get("attention.sliding_window"),
            rope_local_base_freq=10000.0,
            sliding_window_pattern=6,
            query_pre_attn_scalar=d["head_dim"],
            hidden_activation="gelu_pytorch_tanh",
            final_logit_softcapping=get("final_logit_softcapping", required=False),
        )
    if arch == "gpt2":
        d = {
            **{k: d[k] for k in ("model_type", "dtype", "vocab_size", "tie_word_embeddings", "bos_token_id",
                                 "eos_token_id")},
            "n_embd": hidden, "n_layer": d["num_hidden_layers"], "n_head": heads,
            "n_positions": get("context_length"), "n_inner": d["intermediate_size"],
            "layer_norm_epsilon": get("attention.layer_norm_epsilon", 1e-5, required=False),
        }
    try:
        cfg = ModelConfig.from_hf(d, source=path)
    except ConfigError as e:
        raise LoadError(str(e)) from None
    except (TypeError, ValueError, ArithmeticError, AttributeError, KeyError) as e:
        raise LoadError(f"{path}: invalid GGUF metadata ({type(e).__name__}: {e})") from None
    if arch != "gpt2":  # biases: trust the tensors present, not per-architecture defaults
        cfg = cfg.replace(
            qkv_bias="blk.0.attn_q.bias" in tensor_names,
            o_bias="blk.0.attn_output.bias" in tensor_names,
            mlp_bias="blk.0.ffn_up.bias" in tensor_names,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        )
    return cfg.replace(extra={**cfg.extra, "gguf_name": meta.get("general.name")})


def hf_name(arch: str, name: str) -> str | None:
    """HF parameter name of GGUF tensor ``name``, or None if it has none."""
    glob, layer, prefix = (
        (_GPT2_GLOBAL, _GPT2_LAYER, "transformer.h")
        if arch == "gpt2"
        else (_LLAMA_GLOBAL, _GEMMA3_LAYER if arch == "gemma3" else _LLAMA_LAYER, "model.layers")
    )
    base, _, suffix = name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    if base in glob:
        return f"{glob[base]}.{suffix}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in layer:
        return f"{prefix}.{m.group(1)}.{layer[m.group(2)]}.{suffix}"
    return None


def lazy_weights(tensors: list[TensorInfo], arch: str, cfg: ModelConfig, path: str) -> LazyWeights:
    """The tensors under their HF names, each dequantized when read (loading/gguf_dequant.py)."""
    lib = gguf_lib()
    GGMLQuantizationType, _type_traits = lib.GGMLQuantizationType, lib.quants._type_traits

    readable = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, *_type_traits}
    readers, shapes, q4_1 = {}, {}, {}
    for t in tensors:
        if t.name in _IGNORED:
            continue
        hf = hf_name(arch, t.name)
        if hf is None:
            raise LoadError(f"{path}: tensor {t.name!r} has no Hugging Face equivalent for {arch}")
        if t.qtype not in readable:
            raise LoadError(f"{path}: cannot dequantize tensor {t.name!r} ({t.qtype.name}): the gguf library "
                            f"does not implement {t.qtype.name}")
        readers[hf] = partial(read_tensor, t, arch, cfg.num_heads, cfg.num_kv_heads, path)
        shapes[hf] = tuple(reversed(t.shape)) if needs_whole(t.name, arch) and arch == "gpt2" else tuple(t.shape)
        if t.qtype == GGMLQuantizationType.Q4_1 and len(t.shape) == 2 and arch != "gpt2":  # gpt2's are transposed
            q4_1[hf] = partial(read_q4_1, t, arch, cfg.num_heads, cfg.num_kv_heads)
    weights = LazyWeights(readers, shapes, q4_1)
    weights.source = path
    return weights


def _convert(t: TensorInfo, arch: str, cfg: ModelConfig, path: str) -> torch.Tensor:
    """Tensor ``t`` in float32, as HF lays it out (the eager form of ``lazy_weights``)."""
    return read_tensor(t, arch, cfg.num_heads, cfg.num_kv_heads, path, torch.float32)


_unpermute = unpermute


# ---------------------------------------------------------------- tokenizer
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# ``tokenizer.ggml.pre`` -> the split regex the BPE merges were learned with.
_PRE_SPLITS = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"], _LLAMA3_SPLIT),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen"], _QWEN2_SPLIT),
}
# Byte-level vocabularies whose split is GPT-2's own (ByteLevel's built-in regex). SmolLM:
# llama.cpp splits digits one by one, but its vocabulary has no multi-digit token, so
# GPT-2's split gives the same ids (tests/test_tokenizer.py::test_smollm2_parity).
_GPT2_SPLIT_PRES = ("default", "gpt-2", "gpt2", "smollm")
_CONTROL, _USER_DEFINED = 3, 4
# A merge: two non-empty tokens joined at its first space (the second may hold spaces).
_MERGE = re.compile(r"[^ ]+ .", re.DOTALL)


def _check_tokenizer_meta(meta: dict, path: str) -> None:
    """Refuse tokenizer metadata of the wrong shape with a LoadError naming the key.

    llama.cpp refuses an unknown byte-level pre-tokenizer rather than guess its split,
    since a wrong split loads fine and tokenizes wrongly; so do we.
    """

    def bad(key: str, problem: str):
        raise LoadError(f"{path}: malformed GGUF tokenizer metadata: tokenizer.ggml.{key} {problem}")

    # The per-element tests run in C (``map``, ``set``, a regex): ~10^5 tokens and merges
    # cost 0.08 s a pass as Python generators.
    tokens = meta["tokenizer.ggml.tokens"]
    if not isinstance(tokens, list) or not tokens:
        bad("tokens", "must be a non-empty array of strings")
    if not set(map(type, tokens)) <= {str}:
        bad("tokens", "must hold strings only")
    n = len(tokens)
    for key, kinds in (("token_type", {int}), ("scores", {int, float})):  # type(): bool is no number here
        v = meta.get(f"tokenizer.ggml.{key}")
        if v is None:
            continue
        if not isinstance(v, list) or len(v) != n or not set(map(type, v)) <= kinds:
            bad(key, f"must be an array of {n} numbers, one per token")
    merges = meta.get("tokenizer.ggml.merges")
    if merges is not None:
        if not isinstance(merges, list) or not set(map(type, merges)) <= {str}:
            bad("merges", "must be an array of strings")
        wrong = next(itertools.filterfalse(_MERGE.match, merges), None)
        if wrong is not None:
            bad("merges", f"holds {wrong!r}; each merge is two tokens joined by one space")
    for key in ("bos", "eos", "unknown", "padding"):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and (type(i) is not int or not 0 <= i < n):
            bad(f"{key}_token_id", f"is {i!r}, not a token id below {n}")
    for key in ("model", "pre", "chat_template"):
        v = meta.get(f"tokenizer.ggml.{key}" if key != "chat_template" else "tokenizer.chat_template")
        if v is not None and not isinstance(v, str):
            bad(key, f"must be a string, got {type(v).__name__}")
    for key in ("add_bos_token", "add_eos_token"):
        if not isinstance(meta.get(f"tokenizer.ggml.{key}", False), bool):
            bad(key, "must be a boolean")
    pre = meta.get("tokenizer.ggml.pre")
    if meta.get("tokenizer.ggml.model") == "gpt2" and pre is not None and pre not in (*_GPT2_SPLIT_PRES, *_PRE_SPLITS):
        raise LoadError(f"{path}: unsupported GGUF pre-tokenizer tokenizer.ggml.pre={pre!r}; its split is "
                        f"unknown, so text would tokenize wrongly (supported: "
                        f"{', '.join([*_GPT2_SPLIT_PRES, *_PRE_SPLITS])})")


def gguf_tokenizer(meta: dict, path: str = "GGUF", *, checked: bool = False) -> Tokenizer:
    """Build the tokenizer a GGUF vocabulary describes, as transformers' GGUF converter does.

    ``tokenizer.ggml.model`` "gpt2" is byte-level BPE; "llama" is SentencePiece
    BPE with byte fallback, whose merges are rebuilt from the token scores
    (Gemma: from the token order, which is its merge order).
    """
    import tokenizers  # noqa: F401  (missing, it is an ImportError here, not a "malformed" LoadError below)

    if not checked:  # ``checked``: _check_tokenizer_meta has passed (load_gguf runs it first)
        _check_tokenizer_meta(meta, path)
    try:
        return _build_tokenizer(meta, path)
    except LoadError:
        raise
    except ChatTemplateError as e:
        raise LoadError(str(e)) from None
    except Exception as e:  # the tokenizers library raises bare Exception for an inconsistent vocabulary
        raise LoadError(f"{path}: malformed GGUF tokenizer metadata ({type(e).__name__}: {e})") from None


def _build_tokenizer(meta: dict, path: str) -> Tokenizer:
    from .tokenizer_cache import cached

    # Merges rebuilt from scores (SentencePiece vocabularies: Gemma's 262k, ~20 s) are worth
    # caching; a byte-level vocabulary's merges are in the file, and its build (0.5 s for
    # SmolLM2) is faster than the library reading its own JSON back (1.4 s).
    if meta.get("tokenizer.ggml.model") == "llama" and not meta.get("tokenizer.ggml.merges"):
        backend = cached(path, lambda: _build_backend(meta, path))
    else:
        backend = _build_backend(meta, path)
    raw = meta["tokenizer.ggml.tokens"]

    def tok(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return raw[i] if i is not None and 0 <= i < len(raw) else None

    eos_ids = [meta["tokenizer.ggml.eos_token_id"]] if "tokenizer.ggml.eos_token_id" in meta else []
    if meta.get("general.architecture", "").startswith("gemma") and backend.token_to_id("<end_of_turn>") is not None:
        # Gemma's generation_config stops on <end_of_turn> too; the GGUF keeps only <eos>.
        eos_ids.append(backend.token_to_id("<end_of_turn>"))
    return Tokenizer(
        backend, bos_token=tok("bos"), eos_token=tok("eos"), eos_token_ids=eos_ids,
        chat_template=meta.get("tokenizer.chat_template"), name=path,
        template_source=f"{path}: tokenizer.chat_template",
    )


def _build_backend(meta: dict, path: str):
    """The tokenizers-library tokenizer of the GGUF vocabulary (what tokenizer_cache.py saves)."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend

    kind = meta.get("tokenizer.ggml.model")
    arch = meta.get("general.architecture")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    # (a, b) pairs split at the first space, in C (``map``): 49k merges 26 -> ~8 ms
    merges = list(map(tuple, map(str.split, meta.get("tokenizer.ggml.merges") or [], itertools.repeat(" "),
                                 itertools.repeat(1))))
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if kind == "gpt2":
        spelling = _bytes_to_unicode()
        spelled = _byte_alphabet().fullmatch  # a regex: a set per token cost 0.2 s for 49k tokens
        if spelled("".join(tokens)):  # every token spelled so (llama.cpp's files): one match, no per-token test
            vocab = dict(zip(tokens, range(len(tokens))))
        else:
            vocab = {(t if spelled(t) else "".join(spelling[b] for b in t.encode())): i for i, t in enumerate(tokens)}
        backend = Backend(models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
    elif kind == "llama":
        gemma = arch in ("gemma", "gemma2", "gemma3")
        if gemma:  # multi-space tokens are stored as real spaces, looked up as "▁▁"
            tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
            scores = [-i for i in range(len(tokens))]
        else:
            scores = list(meta.get("tokenizer.ggml.scores") or [])
        vocab = {t: i for i, t in enumerate(tokens)}
        if not merges:
            merges = _merges_from_scores(vocab, dict(zip(tokens, scores)))
        unk = tokens[meta["tokenizer.ggml.unknown_token_id"]] if gemma else None
        backend = Backend(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
        dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if gemma:
            backend.normalizer = normalizers.Replace(" ", "\u2581")
            backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        else:
            backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
            dec.append(decoders.Strip(content=" ", left=1))
        backend.decoder = decoders.Sequence(dec)
        add_bos = True if add_bos is None else add_bos
    else:
        raise LoadError(f"{path}: unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")

    # Control tokens stay whole and count as special; in a byte-level vocab a
    # "control" token outside the byte alphabet is a llama.cpp mislabel.
    alphabet = set(_bytes_to_unicode().values()) if kind == "gpt2" else None
    raw = meta["tokenizer.ggml.tokens"]
    backend.add_special_tokens([
        AddedToken(t, normalized=False, special=True)
        for t, ty in zip(raw, types) if ty == _CONTROL and (alphabet is None or set(t) <= alphabet)
    ])
    backend.add_tokens([  # token_to_id: get_vocab() would copy the whole vocabulary out of Rust
        AddedToken(t, normalized=False, special=False)
        for t, ty in zip(raw, types) if ty == _USER_DEFINED and backend.token_to_id(t) is not None
    ])
    if split := _PRE_SPLITS.get(meta.get("tokenizer.ggml.pre")):
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])

    def tok(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return raw[i] if i is not None and 0 <= i < len(raw) else None

    bos, eos = tok("bos"), tok("eos")
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token")) and eos is not None
    add_bos = bool(add_bos) and bos is not None
    single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
    specials = [(t, backend.token_to_id(t)) for t in dict.fromkeys([bos] * add_bos + [eos] * add_eos)]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=f"{single} $B:1", special_tokens=specials)
    return backend


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token
    into two vocabulary pieces, best token score first (transformers' ``generate_merges``)."""
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda x: (x[2], len(x[0]), len(x[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


@functools.cache
def _byte_alphabet() -> re.Pattern:
    """Strings spelled in GPT-2's byte alphabet only."""
    return re.compile("[" + re.escape("".join(_bytes_to_unicode().values())) + "]*")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))
