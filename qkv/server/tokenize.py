"""``POST /tokenize`` and ``POST /detokenize`` in vLLM's shapes.

    /tokenize    {"prompt": str, "add_special_tokens": true}                  (completion form)
                 {"messages": [...], "add_generation_prompt": true,
                  "add_special_tokens": false, "chat_template_kwargs": {...}, "tools": [...]}  (chat form)
              -> {"tokens": [int], "count": int, "max_model_len": int, "token_strs": [str] | null}
    /detokenize  {"tokens": [int]} -> {"prompt": str}

The chat form renders exactly as ``/v1/chat/completions`` does (same template, same
plain-text content), so ``count`` is the prompt_tokens a chat request would report.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from qkv.server import protocol as P


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[P.ChatMessage] | None = None
    add_special_tokens: P.Bool | None = None  # default: true for a prompt, false for messages (vLLM's)
    add_generation_prompt: P.Bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None  # rendered as a chat request's tools are
    return_token_strs: P.Bool = False

    @model_validator(mode="after")
    def _one_form(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        if self.prompt is not None and (self.chat_template_kwargs or self.tools):
            raise ValueError("chat_template_kwargs and tools need messages, not prompt")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[P.Int]


def tokenize_response(llm, ids: list[int], max_model_len: int, token_strs: bool) -> dict:
    strs = [llm.tokenizer.backend.id_to_token(i) for i in ids] if token_strs else None
    return {"tokens": ids, "count": len(ids), "max_model_len": max_model_len, "token_strs": strs}


def with_special_tokens(tokenizer, ids: list[int]) -> list[int]:
    """``ids`` wrapped in what the tokenizer's post-processor adds around one sequence (BOS,
    EOS, ...): found by encoding a sample text with and without them."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start] + list(ids) + full[start + len(plain):]
    return list(ids)  # a processor that rewrites the text itself: nothing to add around it


def detokenize(llm, engine, tokens: list[int]) -> dict:
    """Special tokens are kept (as vLLM's /detokenize, which calls ``decode(tokens)``)."""
    try:
        ids = engine.check_token_ids(tokens, "tokens") if tokens else []
    except ValueError as e:
        raise P.APIError(400, str(e), code="invalid_value", param="tokens") from None
    return {"prompt": llm.tokenizer.decode(ids, skip_special_tokens=False)}
