"""``qkv convert SRC DST --kv-heads G``: MHA or GQA -> GQA-G (G=1: MQA) by mean-pooling K/V heads.

    qkv convert smollm2 /tmp/smollm2-mqa --kv-heads 1
    qkv convert smollm2 /tmp/smollm2-mqa --kv-heads 1 --uptrain --uptrain-tokens 20M --report mqa.md

As in "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints"
(Ainslie et al., 2023): the KV heads are split into G groups of consecutive heads (the query
heads that will share a KV head are exactly the ones that used those heads), and each
group's K and V projections, weights and biases, are replaced by their mean. Queries,
outputs and everything else are untouched. Without uptraining this loses quality;
``qkv perplexity`` measures how much, and ``--uptrain`` wins it back by distillation
from the original model (``qkv/tools/uptrain.py``); ``--report`` writes the memory and
perplexity figures (``qkv/tools/uptrain_report.py``).

SRC is a named model, a GGUF file or an HF directory (read with ``qkv.loading.load``). DST is
written as an HF directory that both qkv and transformers load: config.json (the HF config
rebuilt from the ModelConfig, with the new ``num_key_value_heads``), generation_config.json,
model.safetensors, and tokenizer.json + tokenizer_config.json (with the chat template) when
the source has a tokenizer.

Supported: the Llama family (llama, mistral, qwen2, qwen3; SmolLM2). GPT-2 is refused:
its HF architecture has no GQA, so a pooled checkpoint could not be loaded there.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from qkv.config import ModelConfig

HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM"}


def check_poolable(config: ModelConfig, kv_heads: int) -> None:
    """ValueError unless ``config``'s KV heads can be pooled to ``kv_heads`` and written for HF."""
    if config.model_type not in HF_CLASSES:
        raise ValueError(f"qkv convert supports {', '.join(HF_CLASSES)} models, not {config.model_type!r}"
                         + (" (HF GPT-2 has no grouped KV heads)" if config.model_type == "gpt2" else ""))
    n = config.num_kv_heads
    if kv_heads < 1 or n % kv_heads:
        raise ValueError(f"--kv-heads {kv_heads} must divide the model's {n} KV heads "
                         f"(divisors: {[d for d in range(1, n + 1) if n % d == 0]})")


def pool_kv_heads(config: ModelConfig, weights: dict[str, torch.Tensor], kv_heads: int
                  ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A new config and weights with ``kv_heads`` KV heads, each the mean of its group.
    ``weights`` (HF names) is not modified; unchanged tensors are shared, not copied."""
    check_poolable(config, kv_heads)
    n = config.num_kv_heads
    hd = config.head_dim
    out = dict(weights)
    for i in range(config.num_layers):
        for proj in ("k_proj", "v_proj"):
            for kind in ("weight", "bias"):
                name = f"model.layers.{i}.self_attn.{proj}.{kind}"
                if name not in weights:
                    if kind == "weight":
                        raise ValueError(f"missing tensor {name}")
                    continue
                w = weights[name]
                if w.shape[0] != n * hd:
                    raise ValueError(f"{name} has {w.shape[0]} rows, expected {n} heads x {hd}")
                # rows are [head, head_dim]: group consecutive heads, average within a group
                grouped = w.reshape(kv_heads, n // kv_heads, hd, *w.shape[1:])
                out[name] = grouped.mean(dim=1).reshape(kv_heads * hd, *w.shape[1:]).contiguous()
    return config.replace(num_kv_heads=kv_heads), out


def hf_config(config: ModelConfig, dtype: str = "float32") -> dict:
    """A transformers ``config.json`` for a Llama-family ModelConfig (``from_hf``'s inverse)."""
    mt = config.model_type
    if mt not in HF_CLASSES:
        raise ValueError(f"cannot write an HF config for {mt!r}")
    if mt in ("llama", "qwen3") and config.qkv_bias != config.o_bias:
        raise ValueError(f"{mt}: HF's attention_bias covers q/k/v and o together; this model has "
                         f"qkv bias={config.qkv_bias}, o bias={config.o_bias}")
    if mt == "qwen2" and not config.qkv_bias:
        raise ValueError("qwen2 without q/k/v biases cannot be written as an HF qwen2 config")
    eos = config.eos_token_ids
    d = {
        "architectures": [HF_CLASSES[mt]],
        "model_type": mt,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.norm_eps,
        "hidden_act": config.hidden_act,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "tie_word_embeddings": config.tie_word_embeddings,
        "mlp_bias": config.mlp_bias,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": config.pad_token_id,
        "torch_dtype": dtype,
    }
    if mt in ("llama", "qwen3"):
        d["attention_bias"] = config.qkv_bias
    sliding = [t == "sliding" for t in config.layer_types]
    if mt == "mistral":
        d["sliding_window"] = config.sliding_window if any(sliding) else None
    if mt in ("qwen2", "qwen3"):
        d["use_sliding_window"] = any(sliding)
        d["sliding_window"] = config.sliding_window
        d["max_window_layers"] = sliding.index(True) if any(sliding) else config.num_layers
    return d


def save_tokenizer(tokenizer, dst: Path, model_max_length: int) -> None:
    """tokenizer.json (the ``tokenizers`` backend, with its BOS/EOS post-processor) and a
    tokenizer_config.json carrying the special tokens and the chat template."""
    tokenizer.backend.save(str(dst / "tokenizer.json"))
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokenizer.bos_token,
          "eos_token": tokenizer.eos_token, "model_max_length": model_max_length,
          "clean_up_tokenization_spaces": False}
    if tokenizer.chat_template:
        tc["chat_template"] = tokenizer.chat_template
    (dst / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False))


def source_generation(src: str) -> dict:
    """SRC's generation_config.json ({} for a GGUF file or an HF directory without one)."""
    from qkv.loading.hf import _read_json, model_file
    from qkv.loading.models import NAMED, resolve

    d = resolve(src) if src in NAMED else Path(src).expanduser()
    if not d.is_dir():
        return {}
    gen = _read_json(model_file(d, "generation_config.json"), required=False)
    return {k: v for k, v in gen.items() if k != "transformers_version"}


def save_hf(dst: str | Path, config: ModelConfig, weights: dict[str, torch.Tensor], tokenizer=None,
            dtype: str = "float32", generation: dict | None = None) -> Path:
    """Write an HF model directory at ``dst`` (created; must be empty or absent). ``generation``:
    the source's generation_config.json, kept (its sampling defaults are the model's, and qkv
    and vLLM serve with them) under bos/eos from ``config``."""
    from safetensors.torch import save_file

    from qkv.engine.dtype import parse_dtype

    torch_dtype = parse_dtype(dtype)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(hf_config(config, dtype_name), indent=2))
    gen = {**(generation or {}), "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_ids or None}
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=2))
    tensors = {k: v.to(torch_dtype).contiguous() for k, v in weights.items()
               if not (config.tie_word_embeddings and k == "lm_head.weight")}  # HF re-ties it
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        save_tokenizer(tokenizer, dst, config.max_position_embeddings)
    return dst


def check_conversion(src: str, dst: str | Path, config: ModelConfig, kv_heads: int, dtype: str,
                     force: bool) -> Path:
    """What can refuse a conversion before SRC's weights are read (``config`` is SRC's), checked
    before anything is removed: ``--force`` empties DST, and a refusal after that would lose it."""
    from qkv.engine.dtype import DTYPES
    from qkv.loading.models import NAMED, resolve

    check_poolable(config, kv_heads)
    hf_config(config.replace(num_kv_heads=kv_heads))  # the bias layouts HF's config cannot say
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: DST's weights are written in one of {', '.join(DTYPES)}")
    source = (resolve(src) if src in NAMED else Path(src).expanduser()).resolve()
    target = Path(dst).expanduser().resolve()
    if target == source or target in source.parents:
        raise ValueError(f"DST {dst} is SRC or holds it: writing it would remove SRC, the model being converted")
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not force:
        raise ValueError(f"{dst} exists and is not empty (use --force to overwrite)")
    return dst


def prepare_dst(dst: str | Path, force: bool) -> Path:
    """Empty DST for writing (``check_conversion`` has refused a non-empty one without ``force``)."""
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        if not force:
            raise ValueError(f"{dst} exists and is not empty (use --force to overwrite)")
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    return dst


def convert(src: str, dst: str | Path, kv_heads: int, dtype: str = "float32", force: bool = False) -> ModelConfig:
    """Load ``src``, pool its KV heads to ``kv_heads``, write ``dst``. Returns the new config."""
    from qkv.loading import load
    from qkv.tools.memory import read_config

    dst = check_conversion(src, dst, read_config(src), kv_heads, dtype, force)
    loaded = load(src)
    config, weights = pool_kv_heads(loaded.config, loaded.weights, kv_heads)
    generation = source_generation(src)
    save_hf(prepare_dst(dst, force), config, weights, loaded.tokenizer, dtype, generation)  # DST goes only now
    return config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="named model, .gguf file or HF directory")
    p.add_argument("dst", help="output HF directory (created)")
    p.add_argument("--kv-heads", type=int, required=True, help="KV heads after pooling (1 = MQA)")
    p.add_argument("--dtype", default="float32", help="weights dtype written: float32 | bfloat16 | float16")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty DST")
    from qkv.tools import convert_uptrain

    convert_uptrain.add_arguments(p)


def run(args) -> int:
    from qkv.tools.memory import footprint, human, read_config

    from qkv.tools import convert_uptrain

    convert_uptrain.check_arguments(args)
    before = read_config(args.src)
    if args.uptrain or args.report:
        after = convert_uptrain.run(args, check_conversion(args.src, args.dst, before, args.kv_heads, args.dtype,
                                                           args.force))
    else:
        after = convert(args.src, args.dst, args.kv_heads, args.dtype, args.force)
    b0 = footprint(before, 1, bits=16).bytes_per_token
    b1 = footprint(after, 1, bits=16).bytes_per_token
    print(f"{args.src}: {before.num_kv_heads} -> {after.num_kv_heads} KV heads "
          f"({before.num_heads} query heads); KV cache {human(b0)} -> {human(b1)} per token in fp16 "
          f"({float(b1 / b0):.3g}x); wrote {args.dst}")
    return 0
