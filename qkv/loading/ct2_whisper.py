"""Whisper from a CTranslate2 directory (``model.bin``, ``config.json``, ``tokenizer.json``):
weights under HF transformers' ``WhisperForConditionalGeneration`` names and a config dict
with ``WhisperConfig``'s fields.

CTranslate2 stores each attention's projections fused (self-attention: one ``linear_0`` of
``[q; k; v]``; cross-attention: ``linear_0`` = q and ``linear_1`` = ``[k; v]``), with a zero
bias block standing in for k's missing bias; layer norms as ``gamma``/``beta``; and the
output projection as an alias of the token embeddings. This module splits them back and
checks that every variable is used and every flag is the one Whisper has, so a file of
another shape or architecture is refused by name rather than loaded wrong.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .ct2 import read_model_bin
from .errors import LoadError

# Scalars CTranslate2 writes for Whisper, and the value Whisper needs (GELU = 3 in its enum).
_EXPECTED_FLAGS = {"decoder/activation": 3, "decoder/pre_norm": 1, "decoder/scale_embeddings": 0, "decoder/alibi": 0}
# Written for cross-attention alignment (timestamps) and for ALiBi, which is checked off above.
_IGNORED = {"decoder/alignment_heads", "decoder/alignment_layer", "decoder/start_from_zero_embedding",
            "decoder/alibi_use_positive_positions", "decoder/scale_alibi"}


class CT2Whisper(NamedTuple):
    config: dict[str, Any]  # WhisperConfig fields (``transformers.WhisperConfig(**config)`` builds it)
    weights: dict[str, torch.Tensor]  # float32, HF names; proj_out.weight is embed_tokens.weight (tied)
    tokenizer_file: Path | None  # tokenizer.json beside model.bin, when present
    source: str  # the model.bin read


def load_ct2_whisper(directory: str | Path, model_file: str | Path | None = None) -> CT2Whisper:
    """Read a CTranslate2 Whisper directory. ``model_file`` overrides ``directory/model.bin``
    (the named model joins its parts into a cache). Raises ``LoadError`` naming the file."""
    directory = Path(directory)
    path = Path(model_file) if model_file else directory / "model.bin"
    if not path.is_file():
        raise LoadError(f"{path}: no such file (a CTranslate2 directory holds model.bin)")
    ct2 = read_model_bin(path)
    if ct2.spec != "WhisperSpec":
        raise LoadError(f"{path}: a {ct2.spec!r} model, not WhisperSpec")
    if ct2.revision != 3:
        raise LoadError(f"{path}: WhisperSpec revision {ct2.revision}; this reader knows revision 3")
    v = {k: t for k, t in ct2.variables.items()}
    used: set[str] = set(_IGNORED) & set(v)

    def take(name: str) -> torch.Tensor:
        if name not in v:
            raise LoadError(f"{path}: missing variable {name!r}")
        used.add(name)
        return v[name]

    def scalar(name: str) -> int:
        t = take(name)
        if t.numel() != 1:
            raise LoadError(f"{path}: {name!r} should be a scalar, has shape {list(t.shape)}")
        return int(t.reshape(()).item())

    for name, want in _EXPECTED_FLAGS.items():
        if name in v and scalar(name) != want:
            raise LoadError(f"{path}: {name} = {scalar(name)}, Whisper needs {want}")

    w: dict[str, torch.Tensor] = {}
    f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731

    def norm(src: str, dst: str) -> None:
        w[f"{dst}.weight"], w[f"{dst}.bias"] = f32(take(f"{src}/gamma")), f32(take(f"{src}/beta"))

    def linear(src: str, dst: str, bias: bool = True) -> None:
        w[f"{dst}.weight"] = f32(take(f"{src}/weight"))
        if bias:
            w[f"{dst}.bias"] = f32(take(f"{src}/bias"))

    def split(src: str, dsts: list[str], d_model: int) -> None:
        """A fused projection of ``len(dsts)`` blocks of ``d_model`` rows; k has no bias."""
        weight, bias = take(f"{src}/weight"), take(f"{src}/bias")
        n = len(dsts) * d_model
        if list(weight.shape) != [n, d_model] or list(bias.shape) != [n]:
            raise LoadError(f"{path}: {src} has shapes {list(weight.shape)}, {list(bias.shape)}; expected [{n}, {d_model}], [{n}]")
        for i, dst in enumerate(dsts):
            rows = slice(i * d_model, (i + 1) * d_model)
            w[f"{dst}.weight"] = f32(weight[rows])
            if dst.endswith("k_proj"):
                if torch.any(bias[rows] != 0):
                    raise LoadError(f"{path}: {src} has a non-zero key bias, which Whisper does not have")
            else:
                w[f"{dst}.bias"] = f32(bias[rows])

    conv1 = take("encoder/conv1/weight")
    if conv1.dim() != 3 or conv1.shape[2] != 3:
        raise LoadError(f"{path}: encoder/conv1/weight has shape {list(conv1.shape)}, expected [d_model, n_mels, 3]")
    d_model, n_mels = int(conv1.shape[0]), int(conv1.shape[1])
    layers = {side: _count_layers(v, side) for side in ("encoder", "decoder")}
    if not layers["encoder"] or not layers["decoder"]:
        raise LoadError(f"{path}: no encoder or decoder layers (found {layers})")

    w["model.encoder.conv1.weight"] = f32(conv1)
    w["model.encoder.conv1.bias"] = f32(take("encoder/conv1/bias"))
    linear("encoder/conv2", "model.encoder.conv2")
    w["model.encoder.embed_positions.weight"] = f32(take("encoder/position_encodings/encodings"))
    norm("encoder/layer_norm", "model.encoder.layer_norm")
    for i in range(layers["encoder"]):
        src, dst = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        split(f"{src}/self_attention/linear_0", [f"{dst}.self_attn.{p}_proj" for p in "qkv"], d_model)
        linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
        norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
        linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
        linear(f"{src}/ffn/linear_1", f"{dst}.fc2")
        norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")

    w["model.decoder.embed_tokens.weight"] = f32(take("decoder/embeddings/weight"))
    w["model.decoder.embed_positions.weight"] = f32(take("decoder/position_encodings/encodings"))
    norm("decoder/layer_norm", "model.decoder.layer_norm")
    for i in range(layers["decoder"]):
        src, dst = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        split(f"{src}/self_attention/linear_0", [f"{dst}.self_attn.{p}_proj" for p in "qkv"], d_model)
        linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
        norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
        linear(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
        split(f"{src}/attention/linear_1", [f"{dst}.encoder_attn.k_proj", f"{dst}.encoder_attn.v_proj"], d_model)
        linear(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
        norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
        linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
        linear(f"{src}/ffn/linear_1", f"{dst}.fc2")
        norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
    projection = take("decoder/projection/weight")
    if not torch.equal(projection, v["decoder/embeddings/weight"]):
        raise LoadError(f"{path}: decoder/projection/weight differs from the embeddings; Whisper ties them")
    w["proj_out.weight"] = w["model.decoder.embed_tokens.weight"]

    heads = scalar("encoder/num_heads"), scalar("decoder/num_heads")
    leftover = sorted(set(v) - used)
    if leftover:
        raise LoadError(f"{path}: variables this Whisper reader does not map: {', '.join(leftover[:8])}")
    extra = _read_json(directory / "config.json")
    tokenizer_file = directory / "tokenizer.json"
    config = _config(w, layers, d_model, n_mels, *heads, extra,
                     _special_ids(tokenizer_file) if tokenizer_file.is_file() else {}, path)
    return CT2Whisper(config, w, tokenizer_file if tokenizer_file.is_file() else None, str(path))


def _count_layers(v: dict[str, torch.Tensor], side: str) -> int:
    found = {int(m.group(1)) for k in v if (m := re.match(rf"{side}/layer_(\d+)/", k))}
    if found != set(range(len(found))):
        raise LoadError(f"{side} layers are not numbered 0..{len(found) - 1}: {sorted(found)}")
    return len(found)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise LoadError(f"{path}: expected a JSON object")
    return data


def _special_ids(tokenizer_file: Path) -> dict[str, int]:
    data = _read_json(tokenizer_file)
    added = data.get("added_tokens", [])
    return {t["content"]: int(t["id"]) for t in added if isinstance(t, dict) and "content" in t and "id" in t}


def _config(w, layers, d_model, n_mels, enc_heads, dec_heads, extra, specials, path) -> dict[str, Any]:
    vocab = int(w["model.decoder.embed_tokens.weight"].shape[0])
    for heads, side in ((enc_heads, "encoder"), (dec_heads, "decoder")):
        if heads <= 0 or d_model % heads:
            raise LoadError(f"{path}: {side}/num_heads = {heads} does not divide d_model {d_model}")
    eot = specials.get("<|endoftext|>", vocab - 1608)  # whisper's layout when tokenizer.json is absent
    sot = specials.get("<|startoftranscript|>", eot + 1)
    return {
        "model_type": "whisper",
        "architectures": ["WhisperForConditionalGeneration"],
        "vocab_size": vocab,
        "num_mel_bins": n_mels,
        "d_model": d_model,
        "encoder_layers": layers["encoder"],
        "decoder_layers": layers["decoder"],
        "encoder_attention_heads": enc_heads,
        "decoder_attention_heads": dec_heads,
        "encoder_ffn_dim": int(w["model.encoder.layers.0.fc1.weight"].shape[0]),
        "decoder_ffn_dim": int(w["model.decoder.layers.0.fc1.weight"].shape[0]),
        "max_source_positions": int(w["model.encoder.embed_positions.weight"].shape[0]),
        "max_target_positions": int(w["model.decoder.embed_positions.weight"].shape[0]),
        "activation_function": "gelu",
        "scale_embedding": False,
        "tie_word_embeddings": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "decoder_start_token_id": sot,
        "suppress_tokens": list(extra.get("suppress_ids") or []),
        "begin_suppress_tokens": list(extra.get("suppress_ids_begin") or []),
        "lang_ids": list(extra.get("lang_ids") or []),
        "alignment_heads": [list(p) for p in extra.get("alignment_heads") or []],
    }


def load_ct2_dir(directory: str | Path):
    """``(ModelConfig, weights, tokenizer)`` of a CTranslate2 Whisper directory, as ``load_hf``
    returns for an HF one; the tokenizer is None without a ``tokenizer.json``."""
    from qkv.config import ConfigError, ModelConfig

    ct2 = load_ct2_whisper(directory)
    try:
        cfg = ModelConfig.from_hf(ct2.config, source=ct2.source)
    except ConfigError as e:
        raise LoadError(str(e)) from None
    tok = whisper_tokenizer(ct2.tokenizer_file) if ct2.tokenizer_file is not None else None
    if tok is not None:
        cfg = cfg.replace(eos_token_ids=sorted(set(cfg.eos_token_ids) | set(tok.eos_token_ids)))
    return cfg, ct2.weights, tok


def whisper_tokenizer(tokenizer_file: str | Path):
    """The qkv ``Tokenizer`` over a Whisper ``tokenizer.json`` (``<|endoftext|>`` ends a generation)."""
    import tokenizers

    from .tokenizer import Tokenizer

    path = Path(tokenizer_file)
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises bare Exceptions for bad files
        raise LoadError(f"{path}: not a valid tokenizer.json ({e})") from None
    if backend.token_to_id("<|startoftranscript|>") is None:
        raise LoadError(f"{path}: not a Whisper tokenizer (no <|startoftranscript|> token)")
    return Tokenizer(backend, eos_token="<|endoftext|>", name=str(path))
