"""Tool calling: what a chat request's ``tools`` and tool-call history give the model's own
chat template, and Hermes-style ``<tool_call>{json}</tool_call>`` blocks parsed back out of
its output into OpenAI ``tool_calls`` (whole answers and streams).

Contract:
- ``check_tools`` refuses what qkv does not honour: a malformed tool, a ``tool_choice``
  naming no given tool; ``check_template`` refuses tools or history tool calls for a
  template that never renders them (they would be silently dropped).
- ``forced_grammar`` turns ``tool_choice`` "required" or a named function into a Lark grammar
  (llguidance's, with ``%json`` for the arguments) whose every output is one or more Hermes
  blocks calling a given tool with arguments valid for its schema, so the same parser reads
  forced and free calls.
- ``template_messages`` gives the template OpenAI's messages with each tool call's
  ``arguments`` JSON string parsed into an object, as vLLM does (Qwen's and Hermes'
  templates write ``arguments | tojson``).
- ``parse`` (a whole answer) and ``StreamParser`` (deltas) agree: for any split of the same
  text, the stream's content deltas join to ``parse``'s content and its calls are ``parse``'s
  calls. A block whose JSON is not ``{"name": str, "arguments": object}``, or that never
  closes, stays content.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

START, END = "<tool_call>", "</tool_call>"


class ToolError(ValueError):
    """A request's tools or tool-call history that qkv cannot honour: ``field`` names it."""

    def __init__(self, field: str, why: str):
        super().__init__(f"{field}: {why}")
        self.field = field


def check_tools(tools: list | None, tool_choice: Any) -> list[dict] | None:
    """The tool definitions to render (None: none), after checking their shape and
    ``tool_choice``. "none" renders no tools, as the model must not call one."""
    forced = _forced_name(tool_choice)
    if forced is not None and not tools:
        raise ToolError("tool_choice", "forcing a tool call needs `tools`")
    if not tools or tool_choice == "none":
        return None
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise ToolError(f"tools.{i}", "must be {\"type\": \"function\", \"function\": {\"name\": ...}}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ToolError(f"tools.{i}.function.name", "a non-empty string is needed")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise ToolError(f"tools.{i}.function.parameters", "must be a JSON Schema object")
        out.append(t)
    if forced and forced is not True and forced not in [t["function"]["name"] for t in out]:
        raise ToolError("tool_choice.function.name", f"{forced!r} is not one of the request's tools")
    return out


def _forced_name(tool_choice: Any) -> str | bool | None:
    """None: the model chooses ("auto", "none", unset); True: "required"; else the named function."""
    if tool_choice in (None, "auto", "none"):
        return None
    if tool_choice == "required":
        return True
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(fn, dict) \
            or not isinstance(fn.get("name"), str):
        raise ToolError("tool_choice", 'must be "auto", "none", "required" or '
                                       '{"type": "function", "function": {"name": ...}}')
    return fn["name"]


def forced_grammar(tools: list[dict] | None, tool_choice: Any, parallel: bool = True) -> str | None:
    """A Lark grammar (llguidance's dialect) for ``tool_choice`` "required" or a named function:
    Hermes blocks ``<tool_call>\\n{"name": N, "arguments": {...}}\\n</tool_call>``, N a given
    tool (the named one) and the arguments valid for its ``parameters``. One block for a named
    function or ``parallel`` false, else one or more. None when the model chooses."""
    forced = _forced_name(tool_choice)
    if forced is None or not tools:
        return None
    chosen = [t["function"] for t in tools if forced is True or t["function"]["name"] == forced]
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": f["name"]},
                             "arguments": f.get("parameters") or {"type": "object"}}} for f in chosen]
    # Separators as the structured JSON outputs write them: no free whitespace to loop on.
    schema = {**(calls[0] if len(calls) == 1 else {"anyOf": calls}),
              "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}
    repeat = ' ("\\n" block)*' if forced is True and parallel else ""
    return (f"start: block{repeat}\n"
            f'block: "{START}\\n" call "\\n{END}"\n'
            f"call: %json {json.dumps(schema)}\n")


def check_template(template: str, tools: list | None, messages: list[dict]) -> None:
    """Refuse tools, or history tool calls, that ``template`` never reads (a crude but safe
    test: the template's text must name them)."""
    if tools and "tools" not in template:
        raise ToolError("tools", "this model's chat template does not render tools; serve it with "
                                 "--chat-template FILE whose template does")
    for i, m in enumerate(messages):
        if m.get("tool_calls") and "tool_calls" not in template:
            raise ToolError(f"messages.{i}.tool_calls", "this model's chat template does not render tool calls; "
                                                        "serve it with --chat-template FILE whose template does")


def template_messages(messages: list[dict]) -> list[dict]:
    """``messages`` with each tool call's ``function.arguments`` as an object (vLLM's)."""
    out = []
    for i, m in enumerate(messages):
        calls = m.get("tool_calls")
        if calls:
            m = {**m, "tool_calls": [_call_for_template(c, f"messages.{i}.tool_calls.{j}")
                                     for j, c in enumerate(calls)]}
        out.append(m)
    return out


def _call_for_template(call: dict, where: str) -> dict:
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ToolError(f"{where}.function", "must be {\"name\": str, \"arguments\": JSON string}")
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError as e:
            raise ToolError(f"{where}.function.arguments", f"not valid JSON ({e})") from None
    return {**call, "function": {**fn, "arguments": args}}


# ---------------------------------------------------------------- output
@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = ""

    def __post_init__(self):
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def openai(self, index: int | None = None) -> dict:
        d = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return d if index is None else {"index": index, **d}


def _call(block: str) -> ToolCall | None:
    """The call a block's JSON describes, or None if it is not one."""
    try:
        obj = json.loads(block)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", {})
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def parse(text: str, max_calls: int | None = None) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole answer."""
    p = StreamParser(max_calls)
    content = [c for c in p.feed(text) if isinstance(c, str)]
    content += [c for c in p.finish() if isinstance(c, str)]
    return "".join(content), p.calls


class StreamParser:
    """Feed text deltas; get back content strings and completed ToolCalls, in order. Text
    that may be the start of ``<tool_call>`` is held back until it is known not to be;
    ``max_calls`` (``parallel_tool_calls: false``: 1) leaves later blocks as content."""

    def __init__(self, max_calls: int | None = None):
        self.max_calls = max_calls
        self.calls: list[ToolCall] = []
        self._buf = ""
        self._inside = False

    def feed(self, text: str) -> list[str | ToolCall]:
        self._buf += text
        out: list[str | ToolCall] = []
        while True:
            if not self._inside:
                i = self._buf.find(START)
                if i < 0 or (self.max_calls is not None and len(self.calls) >= self.max_calls):
                    keep = 0 if i >= 0 else _partial_suffix(self._buf, START)
                    if len(self._buf) > keep:
                        out.append(self._buf[:len(self._buf) - keep])
                        self._buf = self._buf[len(self._buf) - keep:]
                    return out
                if i:
                    out.append(self._buf[:i])
                self._buf, self._inside = self._buf[i:], True
            j = self._buf.find(END)
            if j < 0:
                return out  # the block is still open: hold it
            block, self._buf, self._inside = self._buf[:j + len(END)], self._buf[j + len(END):], False
            call = _call(block[len(START):-len(END)])
            if call is None:
                out.append(block)  # not a call: it was content
            else:
                self.calls.append(call)
                out.append(call)

    def finish(self) -> list[str]:
        """What is still held (an unclosed block, a partial tag) is content."""
        rest, self._buf, self._inside = self._buf, "", False
        return [rest] if rest else []


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that begins ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


# ---------------------------------------------------------------- OpenAI choices
@dataclass
class Parsing:
    """A chat request's tool-call parsing: ``max_calls`` 1 for ``parallel_tool_calls: false``."""

    max_calls: int | None = None


class ChoiceStream:
    """One chat choice's OpenAI deltas with tool calls parsed out. Whitespace before a call,
    or ending an answer that has calls, is dropped (the newlines between blocks); an answer
    without calls comes out exactly as generated. A call is sent as two deltas: id, type and
    name, then its arguments, as vLLM does. ``answer_choice`` runs the same code over a whole
    answer."""

    def __init__(self, parsing: Parsing):
        self.parser = StreamParser(parsing.max_calls)
        self._pending = ""  # whitespace-only content, held until it is known not to border a call

    def deltas(self, text: str, final: bool) -> list[dict]:
        items = self.parser.feed(text)
        if final:
            items += self.parser.finish()
        out: list[dict] = []
        for item in items:
            if isinstance(item, str):
                # Trailing whitespace waits until what follows is known: sent at once, the answer
                # depended on the split ("hello " + call kept the space, "hello" | " " + call not).
                self._pending += item
                if body := self._pending.rstrip():
                    out.append({"content": body})
                    self._pending = self._pending[len(body):]
            else:
                self._pending = ""
                k = self.parser.calls.index(item)
                out.append({"tool_calls": [{"index": k, "id": item.id, "type": "function",
                                            "function": {"name": item.name, "arguments": ""}}]})
                out.append({"tool_calls": [{"index": k, "function": {"arguments": item.arguments}}]})
        if final and self._pending and not self.parser.calls:
            out.append({"content": self._pending})
        if final:
            self._pending = ""
        return out

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.parser.calls else reason

    def chunks(self, index: int, text: str, reason: str | None, logprobs: dict | None) -> list[dict]:
        """Chunk choices for one engine output: its deltas, the first with the output's
        logprobs, the last with the finish reason; at least one if either is set."""
        deltas = self.deltas(text, reason is not None)
        if not deltas and (logprobs is not None or reason is not None):
            deltas = [{}]
        out = [{"index": index, "delta": d, "logprobs": None, "finish_reason": None} for d in deltas]
        if out:
            out[0]["logprobs"] = logprobs
            out[-1]["finish_reason"] = self.finish_reason(reason)
        return out


def answer_choice(choice: dict, parsing: Parsing) -> None:
    """Rewrite a whole chat choice: ``message.tool_calls`` from the content's blocks, the
    rest as content (None when nothing is left), finish_reason "tool_calls" after a stop."""
    s = ChoiceStream(parsing)
    deltas = s.deltas(choice["message"]["content"] or "", True)
    content = "".join(d.get("content", "") for d in deltas)
    if s.parser.calls:
        choice["message"]["content"] = content or None
        choice["message"]["tool_calls"] = [c.openai() for c in s.parser.calls]
    choice["finish_reason"] = s.finish_reason(choice["finish_reason"])
