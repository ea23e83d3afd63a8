"""The model's compute dtype: a name parsed, or what "auto" picks. The rule lives here only.

"auto" is the default of ``LLM``, ``LLMEngine`` and every command's ``--dtype``:

- **CUDA**: the checkpoint's dtype (``ModelConfig.checkpoint_dtype``: an HF config's
  "dtype"/"torch_dtype", "bfloat16" for GGUF), when it is one qkv computes in (float32,
  bfloat16, float16); bfloat16 when the checkpoint declares none (random-weight shapes) or
  another (an fp8 or integer checkpoint).
- **CPU**: float32, whatever the checkpoint says (exact, and what the reference oracle
  computes in), unless a quantized CPU path is chosen (``quantization="auto"`` picks one for
  a quantized or 16-bit file: model/cpu_format.py): int4, int8 and bf16 weights compute in
  bfloat16, the activations its int8 matmul kernel is fastest with (model/quant.py; README:
  the fast decode path). A CPU path that wants another dtype changes ``_cpu``, nothing else.
  One exception: **Gemma 3 with int8 weights computes in float32** (its residual stream,
  norms, attention and cache), and only the int8 products round their input and output to
  bfloat16 (model/quant.py's ``Int8Linear``). Gemma's activations have large outliers, and its
  perplexity moved with int8 weights and bf16 activations together (-1.94% from float32
  over 2,048 tokens; bf16 weights with bf16 activations +0.10%, int8 weights with float32
  activations -0.92%: docs/benchmarks.md); the step's vectors are 640 wide, so float32
  costs the decode step little next to its weights' bytes.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
AUTO = "auto"


def parse_dtype(dtype, table: dict = DTYPES) -> torch.dtype:
    """A dtype name of ``table`` (or a torch.dtype among its values) -> torch.dtype; ValueError else."""
    if isinstance(dtype, torch.dtype):
        if dtype in table.values():
            return dtype
        raise ValueError(f"unsupported dtype {dtype} (use one of {', '.join(table)})")
    try:
        return table[str(dtype)]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r} (use auto or one of {', '.join(table)})") from None


def _cpu(config, quantization: str | None) -> tuple[torch.dtype, str]:
    if quantization == "bf16":
        return torch.bfloat16, "bfloat16 weights on the CPU, the file's precision"
    if quantization == "int8" and getattr(config, "arch", None) == "gemma3":
        return torch.float32, "float32 activations for Gemma 3's int8 weights on the CPU (bfloat16 products)"
    if quantization is not None:
        return torch.bfloat16, f"bfloat16 activations for {quantization} weights on the CPU"
    return torch.float32, "float32 on the CPU"


def _cuda(config) -> tuple[torch.dtype, str]:
    declared = getattr(config, "checkpoint_dtype", None)
    if declared in DTYPES:
        return DTYPES[declared], "the checkpoint's dtype"
    if declared is None:
        return torch.bfloat16, "no checkpoint dtype, bfloat16 on CUDA"
    return torch.bfloat16, f"the checkpoint's {declared} is not a compute dtype, bfloat16 on CUDA"


def resolve_dtype(dtype, config, device, quantization: str | None = None) -> tuple[torch.dtype, str]:
    """(compute dtype, why) for an engine of ``config`` on ``device``: ``dtype`` "auto" (or
    None) follows the rule above; any other value is parsed (ValueError naming it). ``why``
    is what the start-up line prints after the dtype."""
    if dtype is not None and dtype != AUTO:
        return parse_dtype(dtype), "as given"
    chosen, why = _cuda(config) if torch.device(device).type == "cuda" else _cpu(config, quantization)
    return chosen, f"auto: {why}"


def check_arg(value: str) -> str:
    """argparse ``type`` of ``--dtype``: "auto" or a name of DTYPES; argparse names the flag."""
    import argparse

    if value != AUTO:
        try:
            parse_dtype(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return value
