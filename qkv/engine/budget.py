"""The token budget of an engine step (``max_num_batched_tokens``), and its ``auto`` default.

``auto`` (or ``None``) is 8192 tokens a step on a CUDA device of at least 70 GiB, 2048 on a
smaller one and on the CPU. vLLM's OpenAI server takes 8192 on GPUs of that size: at 8192 the
128 prompts that arrive together at the start of a closed loop are admitted in 10 steps
instead of 40 (H200, docs/benchmarks.md, issue 23: 118.8 of 128 sequences running against
113.1, and the offline engine 59% faster). On a small card the larger step's activations
would take memory from the KV cache, and on the CPU a step of 8192 tokens is seconds long.
"""

from __future__ import annotations

import numbers

AUTO_LARGE = 8192  # tokens a step on a CUDA device of at least LARGE_DEVICE bytes
AUTO_SMALL = 2048  # elsewhere (smaller cards, the CPU)
LARGE_DEVICE = 70 << 30


def device_memory(device) -> int:
    """Total memory of a CUDA device in bytes (a function of its own, so tests can fake it)."""
    import torch

    return torch.cuda.get_device_properties(device).total_memory


def check(value, name: str = "max_num_batched_tokens"):
    """``value`` as given: "auto"/None -> "auto"; a positive whole number (an int, or its
    digits as text) -> that int. Anything else is refused by ``name``."""
    if value is None or value == "auto":
        return "auto"
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive whole number of tokens or 'auto', got {value!r}")
    return int(value)


def resolve(value, device) -> tuple[int, str]:
    """(tokens a step, why) for ``value`` on ``device``: an explicit count is kept; "auto"/None
    follows the rule above."""
    import torch  # here, not at the top: the CLI's argument check must not load torch

    value = check(value)
    if value != "auto":
        return value, "as given"
    device = torch.device(device)
    if device.type != "cuda":
        return AUTO_SMALL, f"auto: {AUTO_SMALL} on the {device.type}"
    total = device_memory(device)
    big = total >= LARGE_DEVICE
    return (AUTO_LARGE if big else AUTO_SMALL), (f"auto: {total / 2**30:.1f} GiB CUDA device, "
                                                 f"{'>=' if big else '<'} {LARGE_DEVICE >> 30} GiB")
