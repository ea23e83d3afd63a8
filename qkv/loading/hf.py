"""Load a Hugging Face model directory: ``config.json`` + ``*.safetensors`` (+ tokenizer files).

Weights are read with ``safetensors`` only (never pickle), when asked for (float32 by
default, or straight into the engine's dtype) and kept under their HF names. Sharded checkpoints are found through
``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch

from qkv.config import ConfigError, ModelConfig

from .errors import LoadError
from .lazy import LazyWeights
from .tokenizer import ChatTemplateError, Tokenizer


def load_hf(path: str | Path) -> tuple[ModelConfig, LazyWeights, Tokenizer | None]:
    """Read an HF directory; raise LoadError naming the offending file. The weights stay in
    the memory-mapped files until read (loading/lazy.py); headers are checked here."""
    d = Path(path)
    config_file = model_file(d, "config.json")
    raw = _read_json(config_file, required=True)
    try:
        cfg = ModelConfig.from_hf(raw, source=str(config_file))
    except ConfigError as e:
        raise LoadError(str(e)) from None
    except (TypeError, ValueError, ArithmeticError, AttributeError, KeyError) as e:
        # from_hf does arithmetic on fields it does not type-check ("2" layers, 0 heads)
        raise LoadError(f"{config_file}: invalid field value ({type(e).__name__}: {e})") from None
    weights = lazy_safetensors(safetensors_files(d))
    tok = hf_tokenizer(d, cfg.eos_token_ids + _generation_eos(d))
    if tok is not None:
        cfg = cfg.replace(eos_token_ids=tok.eos_token_ids)
    return cfg, weights, tok


def model_file(d: Path, name: str) -> Path:
    """``d / name``, refused (LoadError) unless it resolves inside ``d``, symlinks followed.

    A model directory is untrusted input: an index naming "../../x" or "/etc/x", or a
    symlink pointing out, must not make us open files elsewhere. One exception: in the
    Hugging Face hub cache, ``snapshots/<rev>/*`` are symlinks to ``../../blobs/<hash>``.
    """
    root = d.resolve()
    f = d / name
    target = f.resolve()
    allowed = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    if not any(target.is_relative_to(a) for a in allowed):
        raise LoadError(f"{f}: resolves to {target}, outside the model directory {root}")
    return f


def safetensors_files(d: Path) -> list[Path]:
    index = model_file(d, "model.safetensors.index.json")
    if index.is_file():
        weight_map = _read_json(index, required=True).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
            raise LoadError(f"{index}: weight_map must map tensor names to shard file names")
        names = sorted(set(weight_map.values()))
        shards = [model_file(d, s) for s in names]
        missing = [n for n, s in zip(names, shards) if not s.is_file()]
        if missing or not shards:
            raise LoadError(f"{index}: shard files missing: {missing or 'none listed'}")
        return shards
    files = [model_file(d, f.name) for f in sorted(d.glob("*.safetensors"))]
    if not files:
        raise LoadError(f"{d}: no *.safetensors weights (pickle .bin checkpoints are not loaded)")
    return files


def read_safetensors(f: Path) -> dict[str, torch.Tensor]:
    """All tensors of one file as float32. A truncated or corrupt file raises LoadError."""
    lazy = lazy_safetensors([f])
    return {k: lazy[k] for k in lazy}


# Float formats whose cast to any other goes through float32 exactly; others are made
# float32 first, as the eager loader did (a float64 cast straight to bfloat16 could round twice).
_EXACT_VIA_FP32 = (torch.float32, torch.bfloat16, torch.float16)


def lazy_safetensors(files: list[Path]) -> LazyWeights:
    """The tensors of ``files``, read when asked for. Each file's header is checked now
    (safetensors refuses one whose data runs past the end): a bad file is a LoadError."""
    from safetensors import safe_open

    readers, shapes = {}, {}
    for f in files:
        try:
            st = safe_open(str(f), framework="pt")
            for k in st.keys():
                readers[k] = partial(_read_one, st, f, k)
                shapes[k] = tuple(st.get_slice(k).get_shape())
        except Exception as e:  # SafetensorError, OSError, ...: all mean an unreadable file
            raise LoadError(f"{f}: corrupt or truncated safetensors file ({type(e).__name__}: {e})") from None
    weights = LazyWeights(readers, shapes)
    weights.safetensors_files = list(files)  # tensor parallelism reads each rank's slices from them
    return weights


def _read_one(st, f: Path, name: str, dtype: torch.dtype) -> torch.Tensor:
    try:
        t = st.get_tensor(name)
    except Exception as e:
        raise LoadError(f"{f}: corrupt or truncated safetensors file ({type(e).__name__}: {e})") from None
    if t.dtype not in _EXACT_VIA_FP32:
        t = t.to(torch.float32)
    return t.to(dtype)


def hf_tokenizer(d: Path, eos_ids: list[int]) -> Tokenizer | None:
    """The tokenizer from ``tokenizer.json`` (+ ``tokenizer_config.json``), or None if there is none."""
    import tokenizers

    tj = model_file(d, "tokenizer.json")
    if not tj.is_file():
        return None
    try:
        backend = tokenizers.Tokenizer.from_file(str(tj))
    except Exception as e:
        raise LoadError(f"{tj}: unreadable tokenizer ({e})") from None
    tc_file = model_file(d, "tokenizer_config.json")
    tc = _read_json(tc_file, required=False)
    template, template_file = tc.get("chat_template"), tc_file
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    if (jinja := model_file(d, "chat_template.jinja")).is_file():
        template_file = jinja
        template = _read_text(template_file)
    if template is not None and not isinstance(template, str):
        raise LoadError(f"{template_file}: chat_template must be a string, got {type(template).__name__}")
    try:
        return Tokenizer(
            backend,
            bos_token=_token_str(tc.get("bos_token")),
            eos_token=_token_str(tc.get("eos_token")),
            eos_token_ids=eos_ids,
            chat_template=template,
            name=str(tj),
            template_source=str(template_file),
        )
    except ChatTemplateError as e:
        raise LoadError(str(e)) from None


# generation_config.json fields that set default sampling, as vLLM reads them
# (``get_diff_sampling_param``): HF name -> SamplingParams name.
GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                       "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(d: str | Path) -> dict:
    """The sampling defaults an HF directory's generation_config.json sets ({} without one),
    in SamplingParams' names. vLLM ignores ``do_sample``, and so does this."""
    d = Path(d)
    if not d.is_dir():
        return {}
    f = model_file(d, "generation_config.json")
    cfg = _read_json(f, required=False)
    out = {}
    for hf_name, name in GENERATION_DEFAULTS.items():
        v = cfg.get(hf_name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise LoadError(f"{f}: {hf_name} must be a number, got {v!r}")
        out[name] = int(v) if name in ("top_k", "max_tokens") else float(v)
    return out


def _generation_eos(d: Path) -> list[int]:
    f = model_file(d, "generation_config.json")
    eos = _read_json(f, required=False).get("eos_token_id")
    ids = [] if eos is None else [eos] if isinstance(eos, int) else eos
    if not isinstance(ids, list) or not all(type(i) is int and i >= 0 for i in ids):
        raise LoadError(f"{f}: eos_token_id must be a token id or a list of them, got {eos!r}")
    return ids


def _token_str(t) -> str | None:
    t = t.get("content") if isinstance(t, dict) else t
    if t is not None and not isinstance(t, str):
        raise LoadError(f"tokenizer_config.json: a special token must be a string or {{'content': ...}}, got {t!r}")
    return t


def _read_text(f: Path) -> str:
    try:
        return f.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LoadError(f"{f}: unreadable ({e})") from None


def _read_json(f: Path, required: bool) -> dict:
    if not f.is_file():
        if required:
            raise LoadError(f"{f}: file not found")
        return {}
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LoadError(f"{f}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise LoadError(f"{f}: expected a JSON object, got {type(data).__name__}")
    return data
