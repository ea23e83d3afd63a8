"""Chat templates: compiled in a jinja2 sandbox that bounds what one rendering may cost.

Templates come with model files, so a hostile or broken one must not tie up a worker: a
rendering is refused (ChatTemplateLimitError) once it runs past ``time_limit_s`` or would
build a string, list or number past ``max_chars``. jinja2 has no instruction counter, so the
deadline is checked cooperatively, wherever the template touches Python: every call, filter,
attribute or item access, arithmetic operator, ``range`` item and output chunk. Known
amplifiers are checked *before* they run (``'x' * n``, ``**``, ``range(n)``, ``center(n)``,
``replace``, ``%``/``format`` widths), since a single C-level operation cannot be
interrupted. What is left: a loop nested inside a macro that iterates a long string without
touching anything per step runs until its input is exhausted.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import time
from datetime import datetime
from typing import Any, Iterator

MAX_CHARS = 1 << 23  # 8 Mi characters: far past any context, far below a worker's memory
MAX_RANGE = 100_000  # items in one range(); jinja2's own sandbox bound
MAX_STEPS = 1 << 20  # range() items in one rendering, all loops together
TIME_LIMIT_S = 1.0


class ChatTemplateError(ValueError):
    """The model has no chat template, or the template rejected the messages."""


class ChatTemplateLimitError(ChatTemplateError):
    """The template's rendering ran past the time or size bound: the model's fault, not the request's."""


class ChatTemplateRenderError(ChatTemplateError):
    """An operation inside the template failed (a TypeError: content None joined to a string,
    a string plus an int). Offline it is the caller's to see; a server cannot tell a template
    bug from odd messages, so it answers 500, naming the template."""


class _Budget:
    def __init__(self, time_limit_s: float | None, max_chars: int) -> None:
        self.deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
        self.time_limit_s = time_limit_s
        self.max_chars = max_chars
        self.steps = MAX_STEPS

    def tick(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise ChatTemplateLimitError(f"chat template rendering took longer than {self.time_limit_s:g} s")

    def size(self, n: int, what: str) -> None:
        if n > self.max_chars:
            raise ChatTemplateLimitError(f"chat template builds {what} of {n:,} items, over the limit of "
                                         f"{self.max_chars:,}")

    def check(self, value: Any, what: str = "a value") -> Any:
        """``value`` itself, if it is within bounds."""
        self.tick()
        if isinstance(value, (str, bytes, list, tuple, dict)):
            self.size(len(value), what)
        elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64 * 1024:
            self.size(value.bit_length(), "a number with bits")
        return value


# Compile time (jinja2 folds constants) has no deadline but the same size bounds.
_current: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("qkv_template_budget", default=None)


def _budget() -> _Budget:
    return _current.get() or _Budget(None, MAX_CHARS)


_WIDTH = re.compile(r"%[-+ #0]*(\d{8,}|\*)|%[-+ #0]*\d*\.\d{8,}|\{[^{}]*:[^{}]*\d{8,}[^{}]*\}")


def _precheck_args(b: _Budget, args: tuple, kwargs: dict, name: str) -> None:
    """Refuse arguments that make a C-level function build a huge value: widths, counts."""
    for a in (*args, *kwargs.values()):
        b.check(a, f"an argument of {name}")
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > b.max_chars:
            raise ChatTemplateLimitError(f"chat template passes {a:,} to {name}, over the limit of {b.max_chars:,}")
        if isinstance(a, str) and _WIDTH.search(a) and name == "format":  # the format filter's pattern
            raise ChatTemplateLimitError("chat template formats with a width over 7 digits")


def _replace_size(s: Any, old: Any, new: Any, count: Any = -1) -> int:
    if not (isinstance(s, str) and isinstance(old, str) and isinstance(new, str)):
        return 0
    hits = len(s) + 1 if old == "" else s.count(old)
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(0, len(new) - len(old))


def _guarded(fn, name: str):
    """``fn`` (a filter) with its arguments checked before and its result after."""

    @functools.wraps(fn)  # keeps jinja_pass_arg (pass_context etc.)
    def guarded(*args, **kwargs):
        b = _budget()
        b.tick()
        _precheck_args(b, args, kwargs, name)
        plain = args[1:] if getattr(fn, "jinja_pass_arg", None) else args  # past any context argument
        if name == "replace" and len(plain) >= 3:
            b.size(_replace_size(*plain[:4]), "a string")
        return b.check(fn(*args, **kwargs), f"a value in filter {name}")

    return guarded


class _Range:
    """``range`` for templates: at most MAX_RANGE items, each one a step against the budget."""

    def __init__(self, *args: int) -> None:
        self._r = range(*args)
        if len(self._r) > MAX_RANGE:
            raise ChatTemplateLimitError(f"chat template asks for range of {len(self._r):,} items "
                                         f"(at most {MAX_RANGE:,})")

    def __len__(self) -> int:
        return len(self._r)

    def __getitem__(self, i):
        return self._r[i]

    def __iter__(self) -> Iterator[int]:
        return self._steps(self._r)

    def __reversed__(self) -> Iterator[int]:
        return self._steps(reversed(self._r))

    @staticmethod
    def _steps(items) -> Iterator[int]:
        b = _budget()
        for i in items:
            b.steps -= 1
            if b.steps < 0:
                raise ChatTemplateLimitError(f"chat template loops more than {MAX_STEPS:,} times")
            b.tick()
            yield i


def _bounded_environment():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Bounded(ImmutableSandboxedEnvironment):
        # Intercepted operators are also never folded at compile time.
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call_binop(self, context, op: str, left, right):
            b = _budget()
            b.tick()
            if op == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                        b.size(len(seq) * max(n, 0), "a repeated sequence")
            elif op == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
                b.size(max(left.bit_length(), 1) * right // 8, "a number with digits")
            elif op == "+" and isinstance(left, (str, list, tuple)) and hasattr(right, "__len__"):
                b.size(len(left) + len(right), "a concatenation")
            elif op == "%" and isinstance(left, str):
                if _WIDTH.search(left):
                    raise ChatTemplateLimitError("chat template formats with a width over 7 digits")
                _precheck_args(b, right if isinstance(right, tuple) else (right,), {}, "%")
            return b.check(super().call_binop(context, op, left, right), f"the result of {op}")

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
            b = _budget()
            b.tick()
            name = getattr(__obj, "__name__", type(__obj).__name__)
            _precheck_args(b, args, kwargs, name)
            if name == "replace":
                b.size(_replace_size(getattr(__obj, "__self__", None), *args[:3]), "a string")
            return b.check(super().call(__context, __obj, *args, **kwargs), f"the result of {name}()")

        def getattr(self, obj, attribute):
            # str.format is wrapped by the sandbox at access, so its pattern is checked here.
            if attribute in ("format", "format_map") and isinstance(obj, str) and _WIDTH.search(obj):
                raise ChatTemplateLimitError("chat template formats with a width over 7 digits")
            return _budget().check(super().getattr(obj, attribute), f"attribute {attribute}")

        def getitem(self, obj, argument):
            return _budget().check(super().getitem(obj, argument), "an item")

    return Bounded


def _generation_extension():
    """``{% generation %}...{% endgeneration %}``: transformers' marker around assistant text
    (it returns assistant-token masks from it). We render the body unchanged and drop the
    marker, which is what transformers renders when no mask is asked for."""
    import jinja2.ext
    import jinja2.nodes

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return Generation


def compile_template(template: str, name: str = "tokenizer"):
    """Compile a chat template in the bounded sandbox with transformers' globals, filters and
    ``{% generation %}`` tag. A syntax error raises ChatTemplateError with the template line."""
    import jinja2
    import jinja2.ext

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = _bounded_environment()(trim_blocks=True, lstrip_blocks=True,
                                 extensions=[jinja2.ext.loopcontrols, _generation_extension()])
    env.filters["tojson"] = tojson
    env.filters = {k: _guarded(f, k) for k, f in env.filters.items()}
    env.globals.pop("lipsum", None)  # lipsum(n) builds n paragraphs in one C-speed call
    env.globals["range"] = _Range
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{name}: chat template syntax error at line {e.lineno}: {e.message}") from None
    except ChatTemplateLimitError as e:  # a constant the compiler folded
        raise ChatTemplateLimitError(f"{name}: {e}") from None


MAX_TEMPLATE_BYTES = 1 << 20  # a chat template file: real ones are a few KiB


def read_chat_template(value) -> tuple[str, str]:
    """``--chat-template`` / ``LLM(chat_template=...)``: a file's text (as vLLM, a value that
    is no file but holds Jinja markup is the template itself). Returns (template, source for
    error messages). ChatTemplateError names the value when it is neither, or unreadable."""
    from pathlib import Path

    path = Path(value).expanduser()
    try:
        is_file = path.is_file()
    except (OSError, ValueError):  # template text is no usable path (too long, a NUL)
        is_file = False
    if is_file:
        if path.stat().st_size > MAX_TEMPLATE_BYTES:
            raise ChatTemplateError(f"chat template {path}: larger than {MAX_TEMPLATE_BYTES:,} bytes")
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as e:
            raise ChatTemplateError(f"chat template {path}: cannot read it as UTF-8 text ({e})") from None
    if isinstance(value, str) and ("{{" in value or "{%" in value):
        return value, "the chat_template string"
    try:
        is_dir = path.is_dir()
    except (OSError, ValueError):
        is_dir = False
    raise ChatTemplateError(f"chat template {str(value)!r}: " + ("a directory, not a file" if is_dir else "no such file"))


def render(template, variables: dict, *, time_limit_s: float | None = TIME_LIMIT_S,
           max_chars: int = MAX_CHARS) -> str:
    """Render a compiled template within the bounds; ChatTemplateLimitError past them."""
    b = _Budget(time_limit_s, max_chars)
    token = _current.set(b)
    try:
        out, n = [], 0
        for chunk in template.generate(**variables):  # chunk by chunk: a loop's output is checked as it grows
            n += len(chunk)
            b.size(n, "output text")
            b.tick()
            out.append(chunk)
        return "".join(out)
    finally:
        _current.reset(token)
