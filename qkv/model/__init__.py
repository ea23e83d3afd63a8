"""Model files: one per architecture family, thin wiring over layers.py and attention.py."""

from __future__ import annotations

import importlib

from qkv.config import ModelConfig
from qkv.model.base import CausalLM

# arch -> (module, class). Imported lazily so one family's extras never block another.
_MODELS = {
    "gpt2": ("qkv.model.gpt2", "GPT2LMHeadModel"),
    "llama": ("qkv.model.llama", "LlamaForCausalLM"),
    "gemma3": ("qkv.model.gemma3", "Gemma3ForCausalLM"),
    "deepseek": ("qkv.model.deepseek", "DeepseekForCausalLM"),
    "whisper": ("qkv.model.whisper", "WhisperForConditionalGeneration"),
    "bart": ("qkv.model.bart", "BartForConditionalGeneration"),
}


def build_model(config: ModelConfig, groups: list[int]) -> CausalLM:
    """An uninitialized model for ``config``; ``groups[i]`` is layer i's cache group."""
    module, cls = _MODELS[config.arch]
    return getattr(importlib.import_module(module), cls)(config, groups)
