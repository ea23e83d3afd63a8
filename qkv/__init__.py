"""qkv: an LLM inference engine built around the KV cache."""

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "StructuredOutputs"]

# name -> module. Imported on first use: they pull in torch, which ``qkv --help`` must not.
_LAZY = {"LLM": "qkv.engine.llm", "SamplingParams": "qkv.engine.request",
         "RequestOutput": "qkv.engine.request", "StructuredOutputs": "qkv.engine.structured"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'qkv' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
