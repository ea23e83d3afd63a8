"""The wire's structured-output fields -> one ``StructuredOutputs`` (engine/structured.py).

OpenAI's ``response_format`` ({"type": "text" | "json_object" | "json_schema"}) and vLLM's
extras (``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``, and the newer
``structured_outputs`` object) all map to the same engine constraint. At most one may be set.
The constraint is compiled here, in the request handler and off the event loop, so that a
bad schema, regex or grammar is a 400 naming the field before anything is queued, and the
engine thread then finds the grammar in its cache.
"""

from __future__ import annotations

import asyncio
from typing import Any

from qkv.engine.structured import StructuredOutputError, StructuredOutputs
from qkv.server.protocol import APIError

GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
BACKENDS = (None, "auto", "guidance", "llguidance")  # guided_decoding_backend values qkv honours


def _bad(field: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"{field}: {message}", code=code, param=field)


def _response_format(fmt: Any) -> StructuredOutputs | None:
    if not isinstance(fmt, dict):
        raise _bad("response_format", "must be an object such as {\"type\": \"json_object\"}")
    kind = fmt.get("type")
    allowed = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
    if kind not in allowed:
        raise _bad("response_format.type", f"{kind!r} is not supported; use \"text\", \"json_object\" or "
                   "\"json_schema\"", "unsupported_parameter")
    if extra := sorted(set(fmt) - allowed[kind]):
        raise _bad(f"response_format.{extra[0]}", f"unknown field for type {kind!r}")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputs(json_object=True)
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise _bad("response_format.json_schema", "must be an object with the schema under \"schema\"")
    if extra := sorted(set(spec) - {"name", "schema", "strict", "description"}):
        raise _bad(f"response_format.json_schema.{extra[0]}", "unknown field")
    if not isinstance(spec.get("schema"), dict):
        raise _bad("response_format.json_schema.schema", "a JSON schema (an object) is required")
    # Types are strict here as everywhere: "strict": "no" was taken (and enforced) as a schema.
    for key, kind, what in (("name", str, "a string"), ("description", str, "a string"),
                            ("strict", bool, "true or false")):
        if spec.get(key) is not None and not isinstance(spec[key], kind):
            raise _bad(f"response_format.json_schema.{key}", f"must be {what}, got {type(spec[key]).__name__}")
    # strict: false is honoured as true: the schema is always enforced.
    return StructuredOutputs(json=spec["schema"])


def constraint(req) -> tuple[StructuredOutputs | None, str | None]:
    """The request's constraint and the wire field it came from; APIError (400) naming the
    field for a malformed value, or for more than one set."""
    found: list[tuple[StructuredOutputs, str]] = []
    if req.response_format is not None:
        so = _response_format(req.response_format)
        if so is not None:
            found.append((so, "response_format"))
    for field, kind in GUIDED.items():
        value = getattr(req, field)
        if value is not None:
            try:
                found.append((StructuredOutputs(**{kind: value}), field))
            except ValueError as e:
                raise _bad(field, str(e).replace(f"structured_outputs.{kind} ", "")) from None
    if req.structured_outputs is not None:
        if not isinstance(req.structured_outputs, dict):
            raise _bad("structured_outputs", "must be an object such as {\"json\": {...}}")
        try:
            found.append((StructuredOutputs.from_dict(req.structured_outputs), "structured_outputs"))
        except ValueError as e:  # already names structured_outputs.<field>
            raise APIError(400, str(e), code="invalid_value", param="structured_outputs") from None
    if getattr(req, "tool_choice", None) is not None:  # "required" or a named function: Hermes blocks
        from qkv.server import tool_calls as TC

        try:
            grammar = TC.forced_grammar(TC.check_tools(req.tools, req.tool_choice), req.tool_choice,
                                        parallel=req.parallel_tool_calls is not False)
        except TC.ToolError as e:
            raise _bad(e.field, str(e).split(": ", 1)[1]) from None
        if grammar is not None:
            found.append((StructuredOutputs(grammar=grammar), "tool_choice"))
    if req.guided_decoding_backend not in BACKENDS:
        raise _bad("guided_decoding_backend", f"{req.guided_decoding_backend!r} is not available; qkv uses "
                   "llguidance (\"auto\", \"guidance\")", "unsupported_parameter")
    if req.guided_whitespace_pattern is not None:
        raise _bad("guided_whitespace_pattern", "not supported (JSON is written with \", \" and \": \"; a "
                   "schema's \"x-guidance\" options can change that)", "unsupported_parameter")
    if len(found) > 1:
        raise _bad(found[1][1], f"only one structured output constraint per request; {found[0][1]} is set too")
    return found[0] if found else (None, None)


async def compiled_constraint(engine, req) -> StructuredOutputs | None:
    """``constraint(req)``, compiled into the engine's grammar cache (in a worker thread: a
    new tokenizer index or a large schema takes up to a second). APIError naming the field
    when it does not compile."""
    so, field = constraint(req)
    if so is None:
        return None
    if engine.grammars is None:
        raise _bad(field, "structured outputs need the model's tokenizer; this model has none")
    try:
        await asyncio.to_thread(engine.grammars.compile, so)
    except StructuredOutputError as e:
        raise _bad(field, e.reason) from None
    except ImportError as e:
        raise APIError(501, f"{field}: {e}", "server_error", "not_implemented", field) from None
    return so
