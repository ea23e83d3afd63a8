"""Tokenizer: text <-> token ids, chat templates and streaming detokenization.

A thin wrapper over a ``tokenizers.Tokenizer``. Whatever the source (an HF
``tokenizer.json`` or a GGUF vocabulary), the backend's post-processor is what
adds BOS/EOS, so ``encode`` behaves like transformers' tokenizer for the same
files.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import tokenizers

# End-of-turn markers that chat templates close a reply with. A generation
# must stop on them even when the config names another eos token.
END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<turn|>")


class ChatTemplateError(ValueError):
    """The model has no chat template, or the template rejected the messages."""


class Tokenizer:
    """Encode, decode and render chats for one model.

    ``eos_token_ids`` holds every id that ends a generation: the configured
    eos ids plus the end-of-turn markers the chat template writes.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        eos_token_ids: list[int] | tuple[int, ...] = (),
        chat_template: str | None = None,
        name: str = "tokenizer",
        template_source: str | None = None,
    ) -> None:
        """``name`` labels errors; ``template_source`` (default ``name``) is where the chat
        template came from. A template with a syntax error raises ChatTemplateError naming
        ``template_source`` and the template's line."""
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.name = name
        ids = list(eos_token_ids)
        for tok in [eos_token, *(t for t in END_OF_TURN if chat_template and t in chat_template)]:
            tid = backend.token_to_id(tok) if tok else None
            if tid is not None:
                ids.append(tid)
        self._eos_ids = list(dict.fromkeys(ids))  # dedupe, keep order
        # Compiled now: a template with a syntax error fails the load once, with its line,
        # rather than every chat request.
        self._template = _compile(chat_template, template_source or name) if chat_template else None

    # ------------------------------------------------------------ ids
    @property
    def bos_token_id(self) -> int | None:
        return self.backend.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos_ids)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the BOS (etc.) the model wants."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        """A fresh incremental detokenizer for one generated sequence."""
        return StreamDecoder(self, skip_special_tokens)

    # ------------------------------------------------------------ chat
    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render ``messages`` with the model's Jinja chat template, as transformers does.

        Raises ChatTemplateError if the model has no template or the template
        calls ``raise_exception``.
        """
        if not self.chat_template:
            raise ChatTemplateError(f"{self.name}: this model has no chat template; use plain text prompts")
        import jinja2

        try:
            return self._template.render(
                messages=json.loads(json.dumps(messages)),  # plain data only into the sandbox
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **json.loads(json.dumps(kwargs)),  # extra variables (chat_template_kwargs): plain data too
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"{self.name}: chat template error: {e}") from e


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


def _compile(template: str, name: str = "tokenizer"):
    """Compile a chat template in a sandbox with transformers' globals, filters and
    ``{% generation %}`` tag. A syntax error raises ChatTemplateError with the template line."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _generation_extension()])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{name}: chat template syntax error at line {e.lineno}: {e.message}") from None


class StreamDecoder:
    """Turns generated token ids into text, one token at a time.

    ``push`` returns only text that is complete: a UTF-8 character split over
    several byte tokens comes out once its last byte arrives, never as U+FFFD.
    Decoding a window of a few previous tokens (rather than the new token
    alone) keeps the spaces that SentencePiece decoders strip at the start.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: context for the decoder
        self._read = 0  # ids before this have been emitted

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        text = self._tok.decode(self._ids[self._prefix :], self._skip)
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""  # an incomplete character, or a token that decodes to nothing yet
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is still held back (e.g. a truncated character) at the end of generation."""
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        text = self._tok.decode(self._ids[self._prefix :], self._skip)
        self._prefix = self._read = len(self._ids)
        return text[len(prefix_text) :]
