"""OpenAI wire format: request models (validated with pydantic), response builders, errors.

Requests are parsed by hand from the raw body (see app.py) so that every failure, from
malformed JSON to a wrong type, comes back in OpenAI's error shape with status 400, never
FastAPI's default 422 body. Unknown fields are a 400 that names them: nothing a client sends
is silently ignored (docs/serving.md has the table of every field).
Numbers and booleans are strict, as OpenAI's own API is: ``"max_tokens": "5"`` or
``"n": true`` is a 400, never silently coerced (an int is still a valid float).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator

MAX_STOP = 16  # stop strings per request
# Per-token work grows with these lists (bad_words: one encoding each at admission and one
# check each per step, on the engine's thread): a 1 MiB body of them stalled every request.
MAX_BAD_WORDS = 1024
MAX_STOP_TOKEN_IDS = 1024
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
        if err.get("type") == "extra_forbidden":
            parts.append(f"{loc}: unknown field; qkv does not implement it (see docs/serving.md)")
        else:
            parts.append(f"{loc}: {err.get('msg')}")
    return "; ".join(parts)


_BRANCHES = {"str", "int", "float", "bool", "dict", "list", "none"}  # pydantic's union-branch names in a loc


def validation_param(e: ValidationError) -> str | None:
    """The first problem's field, for the error's ``param`` (``messages.0.role``): its
    location without pydantic's union-branch names (``str``, ``list[int]``)."""
    errors = e.errors(include_url=False)
    loc = errors[0].get("loc", ()) if errors else ()
    parts = [str(x) for x in loc if isinstance(x, int) or (x.isidentifier() and x not in _BRANCHES)]
    return ".".join(parts) or None


class Unsupported(Exception):
    """A known option set to something qkv does not implement: a 400 naming ``field``."""

    def __init__(self, field: str, why: str):
        super().__init__(f"{field}: {why}")
        self.field = field


def _refuse_set(req: BaseModel, fields: tuple[str, ...], why: str) -> None:
    for f in fields:
        if getattr(req, f) is not None:
            raise Unsupported(f, why)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: Bool | None = None
    include_obfuscation: Bool | None = None  # padding against side channels: not implemented
    continuous_usage_stats: Bool | None = None  # vLLM's usage in every chunk: not implemented


class _Sampling(BaseModel):
    """Fields both endpoints share. Beyond OpenAI's schema, vLLM's sampling extras (pass
    them in the openai client's ``extra_body``). Unknown fields are a 400 naming them
    (``extra="forbid"``): a misspelt or unimplemented option is never silently ignored.
    Sampling fields left out (None) take the model's defaults (generation_config.json)."""

    model_config = ConfigDict(extra="forbid", strict=False)

    model: str | None = None
    n: Int = Field(1, ge=1)
    max_tokens: Int | None = Field(None, ge=1)
    temperature: Float | None = Field(None, ge=0.0, le=2.0)
    top_p: Float | None = Field(None, gt=0.0, le=1.0)
    top_k: Int | None = Field(None, ge=-1, le=2**31 - 1)
    min_p: Float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: Float | None = Field(None, gt=0.0, le=10.0)
    frequency_penalty: Float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: Float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, Float] | None = None
    min_tokens: Int = Field(0, ge=0)
    bad_words: list[str] | None = Field(None, max_length=MAX_BAD_WORDS)
    allowed_token_ids: list[Int] | None = None
    # Sample i seeds with seed + i: the whole range must stay within torch's 64-bit seeds.
    seed: Int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stop_token_ids: list[Int] = Field(default_factory=list, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: Bool = False
    include_stop_str_in_output: Bool = False
    skip_special_tokens: Bool = True
    prompt_logprobs: Int | None = Field(None, ge=0, le=20)
    stream: Bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # informational, as at OpenAI
    # vLLM's field: requests share prefix-cache blocks only when their salts are equal.
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_SALT)
    # Structured output: OpenAI's and vLLM's names, mapped to one constraint (server/structured.py).
    response_format: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None
    structured_outputs: Any = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        for k, b in (v or {}).items():
            if not (k.isascii() and k.isdigit()):  # "²".isdigit(), but int("²") fails
                raise ValueError(f"keys must be token ids (digits 0-9), got {k!r}")
            if not -100 <= b <= 100:
                raise ValueError(f"biases must be in [-100, 100], got {b} for token {k}")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def check_supported(self) -> None:
        """Raise Unsupported for the first option set that qkv does not implement."""
        if self.stream_options is not None:
            if self.stream_options.include_obfuscation:
                raise Unsupported("stream_options.include_obfuscation", "obfuscation padding is not supported")
            if self.stream_options.continuous_usage_stats:
                raise Unsupported("stream_options.continuous_usage_stats", "usage comes in the last chunk only")
            if not self.stream:
                raise Unsupported("stream_options", "only allowed with stream: true")
        if self.stream and self.prompt_logprobs is not None:  # as vLLM: chunks have no place for them
            raise Unsupported("prompt_logprobs", "not available with stream: true")

    def logprobs_k(self) -> int | None:
        """Top log-probabilities per output token, or None when not asked."""
        raise NotImplementedError


class CompletionRequest(_Sampling):
    prompt: str | list[Int] | list[str] | list[list[Int]]
    echo: Bool = False
    logprobs: Int | None = Field(None, ge=0, le=20)
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

    def logprobs_k(self) -> int | None:
        return self.logprobs

    def check_supported(self) -> None:
        if self.suffix:
            raise Unsupported("suffix", "insertion (suffix) is not supported")
        if self.best_of not in (None, self.n):
            raise Unsupported("best_of", "best_of other than n is not supported")
        super().check_supported()


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A message; ``name``, ``tool_calls`` and ``tool_call_id`` reach the template as given."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    # What an OpenAI response's message carries when a client sends it back: fine when empty.
    refusal: Any = None
    annotations: Any = None
    audio: Any = None
    function_call: Any = None

    @field_validator("refusal", "annotations", "audio", "function_call")
    @classmethod
    def _empty_only(cls, v):
        if v:
            raise ValueError("not supported by qkv (only null or empty)")
        return v

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def plain(self) -> dict:
        m: dict[str, Any] = {"role": self.role, "content": self.text()}
        for k in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, k) is not None:
                m[k] = getattr(self, k)
        return m


# Variables the server itself gives the chat template: chat_template_kwargs cannot replace them.
TEMPLATE_RESERVED = ("messages", "add_generation_prompt", "bos_token", "eos_token", "raise_exception",
                     "special_tokens_in_content", "tools")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: Bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    add_generation_prompt: Bool = True  # vLLM's
    # A template from the request would run attacker-chosen Jinja: refused, never rendered.
    chat_template: Any = None
    chat_template_kwargs: dict[str, Any] | None = None
    # Tools reach the model's template and Hermes <tool_call> blocks come back (tool_calls.py).
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: Bool | None = None  # false: at most one call is parsed out
    # OpenAI fields qkv accepts as no-ops (documented) or refuses when set (check_supported).
    functions: Any = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    metadata: Any = None
    store: Bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None  # OpenAI's routing hint; qkv's prefix cache needs none
    prompt_cache_retention: str | None = None
    prompt_cache_options: Any = None
    moderation: Any = None
    safety_identifier: str | None = None  # informational, like user

    @field_validator("messages")
    @classmethod
    def _messages(cls, v):
        if not v:
            raise ValueError("messages must not be empty")
        return v

    def plain_messages(self) -> list[dict]:
        return [m.plain() for m in self.messages]

    def template_tools(self) -> list[dict] | None:
        """The tools the template renders (None: no tools, or tool_choice "none")."""
        from qkv.server.tool_calls import check_tools

        return check_tools(self.tools, self.tool_choice)

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def check_supported(self) -> None:
        if self.chat_template is not None:
            raise Unsupported("chat_template", "a request cannot supply a chat template; the model's own is used")
        if bad := [k for k in (self.chat_template_kwargs or {}) if k in TEMPLATE_RESERVED]:
            raise Unsupported("chat_template_kwargs", f"{bad[0]!r} is set by the server, not by the request")
        from qkv.server.tool_calls import ToolError, check_tools

        try:
            check_tools(self.tools, self.tool_choice)
        except ToolError as e:
            raise Unsupported(e.field, str(e).split(": ", 1)[1]) from None
        if self.function_call not in (None, "none"):
            raise Unsupported("function_call", "function calling is not supported")
        if self.functions:
            raise Unsupported("functions", "function calling is not supported")
        if self.modalities not in (None, ["text"]):
            raise Unsupported("modalities", "only [\"text\"] is supported")
        _refuse_set(self, ("audio", "prediction", "web_search_options", "reasoning_effort", "verbosity",
                           "metadata", "prompt_cache_options", "moderation"),
                    "not supported by qkv")
        if self.store:
            raise Unsupported("store", "stored completions are not supported")
        if self.service_tier not in (None, "auto", "default"):
            raise Unsupported("service_tier", "only \"auto\" or \"default\"")
        if self.prompt_cache_retention not in (None, "in_memory"):
            raise Unsupported("prompt_cache_retention", "the prefix cache lives in memory only (\"in_memory\")")
        if self.top_logprobs is not None and not self.logprobs:
            raise Unsupported("top_logprobs", "needs logprobs: true")
        super().check_supported()


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


def chat_logprobs(tokens: list[int], entries: list[dict], k: int, token_bytes=None) -> dict:
    """OpenAI's chat ``logprobs``: per token its text, logprob, bytes and the top ``k``.
    ``token_bytes(id)``: a token's raw bytes (``Tokenizer.token_bytes``: part of a character
    where the text alone is U+FFFD); without it, the text's UTF-8."""
    def item(tid: int, lp) -> dict:
        text = lp.decoded_token or ""
        # Only a text with U+FFFD can differ from its bytes: the other tokens skip the lookup.
        raw = token_bytes(tid) if token_bytes is not None and "\ufffd" in text else text.encode("utf-8")
        return {"token": text, "logprob": lp.logprob, "bytes": list(raw)}

    content = []
    for t, e in zip(tokens, entries):
        top = sorted(e.items(), key=lambda kv: kv[1].rank)[:k]
        content.append({**item(t, e[t]), "top_logprobs": [item(tid, lp) for tid, lp in top]})
    return {"content": content, "refusal": None}


def completion_logprobs(tokens: list[int], entries: list[dict | None], offset: int = 0, first_text: str = "") -> dict:
    """OpenAI's legacy completions ``logprobs``: tokens, their logprobs (None for a prompt's
    first token, whose text is ``first_text``), the top ones as {text: logprob}, and each
    token's character offset."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for i, (t, e) in enumerate(zip(tokens, entries)):
        text = e[t].decoded_token if e else first_text if i == 0 else None
        out["tokens"].append(text or "")
        out["token_logprobs"].append(e[t].logprob if e else None)
        top = None
        if e:  # tokens with equal text (partial UTF-8) share a key: the likeliest keeps it
            top = {}
            for lp in sorted(e.values(), key=lambda lp: lp.rank):
                top.setdefault(lp.decoded_token or "", lp.logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text or "")
    return out


def vllm_prompt_logprobs(entries: list[dict | None]) -> list:
    """vLLM's ``prompt_logprobs``: per prompt token None (the first) or {id: {logprob, rank, decoded_token}}."""
    return [None if e is None else {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
                                    for t, lp in e.items()} for e in entries]


def choice(index: int, text: str | None, finish_reason: str | None, chat: bool, chunk: bool,
           first: bool = False, logprobs: dict | None = None) -> dict:
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
    c["logprobs"] = logprobs
    c["finish_reason"] = finish_reason
    return c
