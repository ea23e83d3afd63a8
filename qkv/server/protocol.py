"""OpenAI wire format: request models (validated with pydantic), response builders, errors.

Requests are parsed by hand from the raw body (see app.py) so that every failure, from
malformed JSON to a wrong type, comes back in OpenAI's error shape with status 400, never
FastAPI's default 422 body. Unknown fields are ignored, as OpenAI clients send many.
Numbers and booleans are strict, as OpenAI's own API is: ``"max_tokens": "5"`` or
``"n": true`` is a 400, never silently coerced (an int is still a valid float).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator

MAX_STOP = 16  # stop strings per request
MAX_SALT = 1024  # characters of cache_salt

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # strict float still takes an int: temperature=1 is fine
Bool = Annotated[bool, Strict()]


class APIError(Exception):
    """A failure to report to the client as ``{"error": {"message", "type", "code", "param"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers  # e.g. Retry-After on a 429

    def body(self) -> dict:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "code": code, "param": param}}


def validation_message(e: ValidationError) -> str:
    """One line per problem, naming the field: what a client needs to fix its request."""
    parts = []
    for err in e.errors(include_url=False):
        loc = ".".join(str(x) for x in err.get("loc", ())) or "body"
        parts.append(f"{loc}: {err.get('msg')}")
    return "; ".join(parts)


class _Sampling(BaseModel):
    """Fields both endpoints share. ``top_k``, ``ignore_eos`` and ``stop_token_ids`` are
    extras beyond OpenAI's schema (pass them in the openai client's ``extra_body``)."""

    model_config = ConfigDict(extra="ignore", strict=False)

    model: str | None = None
    n: Int = Field(1, ge=1)
    max_tokens: Int | None = Field(None, ge=1)
    temperature: Float = Field(1.0, ge=0.0, le=2.0)
    top_p: Float = Field(1.0, gt=0.0, le=1.0)
    top_k: Int = Field(0, ge=-1, le=2**31 - 1)
    # Sample i seeds with seed + i: the whole range must stay within torch's 64-bit seeds.
    seed: Int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stop_token_ids: list[Int] = Field(default_factory=list)
    ignore_eos: Bool = False
    stream: Bool = False
    stream_options: dict[str, Any] | None = None
    frequency_penalty: Float = 0.0
    presence_penalty: Float = 0.0
    logprobs: Any = None
    user: str | None = None
    # vLLM's field: requests share prefix-cache blocks only when their salts are equal.
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_SALT)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.get("include_usage"))

    def unsupported(self) -> str | None:
        """The first option set that qkv does not implement (rejected, not silently ignored)."""
        if self.frequency_penalty or self.presence_penalty:
            return "frequency_penalty/presence_penalty are not supported"
        if self.logprobs not in (None, False, 0):
            return "logprobs are not supported"
        return None


class CompletionRequest(_Sampling):
    prompt: str | list[Int] | list[str] | list[list[Int]]
    echo: Bool = False
    suffix: str | None = None
    best_of: Int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: a string or a token-id list is one prompt."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo is not supported"
        if self.suffix:
            return "suffix is not supported"
        if self.best_of not in (None, self.n):
            return "best_of is not supported"
        return super().unsupported()


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: Int | None = Field(None, ge=1)
    # A template from the request would run attacker-chosen Jinja: refused, never rendered.
    chat_template: Any = None
    chat_template_kwargs: Any = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, v):
        if not v:
            raise ValueError("messages must not be empty")
        return v

    def plain_messages(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def unsupported(self) -> str | None:
        if self.chat_template is not None or self.chat_template_kwargs is not None:
            return "a request cannot supply a chat template; the model's own template is used"
        return super().unsupported()


def bad_string(data: Any) -> str | None:
    """The path (``messages.0.content``) of the first string in parsed JSON that is not valid
    Unicode text (a lone surrogate such as ``"\\ud800"``), or None. Iterative: the depth of
    ``data`` is bounded only by the JSON parser's recursion limit."""
    todo: list[tuple[Any, str]] = [(data, "")]
    while todo:
        x, path = todo.pop()
        if isinstance(x, str) and not _is_text(x):
            return path or "body"
        if isinstance(x, dict):
            for k, v in x.items():
                if not _is_text(k):
                    return f"{path or 'body'} (a key)"
                todo.append((v, f"{path}.{k}" if path else k))
        elif isinstance(x, list):
            todo.extend((v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(x))
    return None


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ---------------------------------------------------------------- responses
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_response(rid: str, model: str, choices: list[dict], use: dict | None, chat: bool,
                        chunk: bool = False) -> dict:
    obj = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    body = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices}
    if use is not None or not chunk:
        body["usage"] = use
    return body


def choice(index: int, text: str | None, finish_reason: str | None, chat: bool, chunk: bool,
           first: bool = False) -> dict:
    """One choice. Chat chunks carry a ``delta`` (the role only in the first), chat answers a
    ``message``, completions the ``text``."""
    c: dict[str, Any] = {"index": index}
    if not chat:
        c["text"] = text or ""
    elif chunk:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        c["delta"] = delta
    else:
        c["message"] = {"role": "assistant", "content": text or ""}
    c["logprobs"] = None
    c["finish_reason"] = finish_reason
    return c
