"""qkv: an LLM inference engine built around the KV cache."""

from qkv.engine.request import RequestOutput, SamplingParams
from qkv.engine.structured import StructuredOutputs

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "StructuredOutputs"]


def __getattr__(name):
    # LLM pulls in torch and the loaders; import it only when asked for.
    if name == "LLM":
        from qkv.engine.llm import LLM

        return LLM
    raise AttributeError(name)
