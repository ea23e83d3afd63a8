"""Weight quantization for the CPU decode path.

On a CPU, batch-1 decode is bound by memory bandwidth: each token reads every weight once.
SmolLM2 in fp32 is 540 MB per token; int8 weights read a quarter of that. ``int8`` swaps
every nn.Linear for FBGEMM's dynamically quantized one (int8 weights per output channel,
activations quantized per step), torch's own x86 kernel, so nothing is written by hand.
It changes the numbers slightly: `qkv perplexity --quantization int8` measures by how much.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

METHODS = ("int8",)


def quantize(model: nn.Module, method: str, device: torch.device) -> nn.Module:
    if method not in METHODS:
        raise ValueError(f"unknown quantization {method!r} (have: {', '.join(METHODS)})")
    if device.type != "cpu":
        raise ValueError("quantization='int8' is a CPU path (FBGEMM); on a GPU use bfloat16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice points at torchao
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
