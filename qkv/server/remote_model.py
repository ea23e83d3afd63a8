"""RemoteModel: what the HTTP app needs to know about a model whose engine runs in another process.

``describe(llm)`` (in the engine process) gathers it: the tokenizer with its chat template,
the config, the generation defaults, the context and the KV pool's fixed sizes. The front end
builds a RemoteModel from it, which answers the app as an ``LLM`` would (``tokenizer``,
``encode``, ``chat_prompt``, ``engine.max_model_len``, ``engine.kv.can_ever_fit`` ...), so the
handlers refuse what can never run without asking the engine process.
"""

from __future__ import annotations

from types import SimpleNamespace

from qkv.engine.engine import LLMEngine
from qkv.engine.llm import LLM
from qkv.kvcache.manager import KVCacheManager


def describe(llm) -> dict:
    e = llm.engine
    kv = e.kv
    return {
        "tokenizer": llm.tokenizer, "config": llm.config, "source": llm.source,
        "generation_defaults": dict(getattr(llm, "generation_defaults", None) or {}),
        "max_model_len": e.max_model_len, "max_num_seqs": e.scheduler.max_num_seqs,
        "eos_ids": sorted(e.eos_ids), "block_size": kv.block_size, "window": list(kv.window),
        "cross": list(kv.cross),
        "groups": [(g.spec, g.pool.num_blocks) for g in kv.groups], "stats": e.stats(),
        "device": str(e.device), "dtype": str(getattr(e, "dtype", "")),
    }


class RemoteKV:
    """The pool's fixed sizes, with KVCacheManager's own arithmetic over them."""

    blocks_needed = KVCacheManager.blocks_needed
    can_ever_fit = KVCacheManager.can_ever_fit
    max_tokens = KVCacheManager.max_tokens

    def __init__(self, info: dict):
        self.block_size, self.window, self.cross = info["block_size"], info["window"], info["cross"]
        self.groups = [SimpleNamespace(spec=spec, pool=SimpleNamespace(num_blocks=n)) for spec, n in info["groups"]]


class RemoteEngine:
    check_token_ids = LLMEngine.check_token_ids  # reads only config.vocab_size

    def __init__(self, info: dict):
        self.config, self.tokenizer = info["config"], info["tokenizer"]
        self.max_model_len = info["max_model_len"]
        self.scheduler = SimpleNamespace(max_num_seqs=info["max_num_seqs"])
        self.kv = RemoteKV(info)
        self.eos_ids = frozenset(info["eos_ids"])
        self.tp = None  # tensor-parallel ranks belong to the engine process
        self.device = info["device"]
        self._stats = info["stats"]
        self._grammars = None

    def stats(self) -> dict:
        return self._stats  # as at start-up; the client's ``stats`` is the live one

    @property
    def grammars(self):
        """A grammar cache of the front end's own: compiling here refuses a bad schema with a
        400 at once; the engine process compiles it again for its masks."""
        if self._grammars is None and self.tokenizer is not None:
            from qkv.engine.structured import GrammarCache

            self._grammars = GrammarCache(self.tokenizer, self.config.vocab_size, sorted(self.eos_ids))
        return self._grammars


class RemoteModel:
    """An ``LLM`` look-alike for ``create_app``; ``engine_loop`` makes the EngineClient."""

    encode = LLM.encode
    chat_prompt = LLM.chat_prompt

    def __init__(self, info: dict, process, on_death=None):
        self.tokenizer, self.config, self.source = info["tokenizer"], info["config"], info["source"]
        self.generation_defaults = info["generation_defaults"]
        self.engine = RemoteEngine(info)
        self.process = process
        self.on_death = on_death  # called (no arguments) once the engine process has died

    def engine_loop(self, metrics, max_waiting: int | None):
        from qkv.server.engine_client import EngineClient

        return EngineClient(self.process, self.engine, metrics, max_waiting, on_death=self.on_death)

    def stats(self) -> dict:
        return self.engine.stats()
