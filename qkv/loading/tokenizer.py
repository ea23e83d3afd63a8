"""Tokenizer: text <-> token ids, chat templates and streaming detokenization.

A thin wrapper over a ``tokenizers.Tokenizer``. Whatever the source (an HF
``tokenizer.json`` or a GGUF vocabulary), the backend's post-processor is what
adds BOS/EOS, so ``encode`` behaves like transformers' tokenizer for the same
files.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

import tokenizers

from .chat_template import ChatTemplateError, ChatTemplateLimitError, ChatTemplateRenderError, compile_template, render

__all__ = ["Tokenizer", "StreamDecoder", "ChatTemplateError", "ChatTemplateLimitError", "END_OF_TURN"]

# End-of-turn markers that chat templates close a reply with. A generation
# must stop on them even when the config names another eos token.
END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<turn|>")


def check_unicode(text) -> None:
    """A ValueError if ``text`` holds a lone surrogate: bytes that were not UTF-8, as Python
    decodes them from argv and stdin (surrogateescape). The tokenizer's own error for it is
    "TypeError: TextInputSequence must be str", which names neither the text nor the cause."""
    if isinstance(text, str):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"the text is not valid Unicode (bytes that were not UTF-8?): "
                             f"{text[e.start:e.end]!r} at character {e.start}") from None


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
        self._given_eos_ids = list(eos_token_ids)
        ids = list(eos_token_ids)
        for tok in [eos_token, *(t for t in END_OF_TURN if chat_template and t in chat_template)]:
            tid = backend.token_to_id(tok) if tok else None
            if tid is not None:
                ids.append(tid)
        self._eos_ids = list(dict.fromkeys(ids))  # dedupe, keep order
        # Compiled now: a template with a syntax error fails the load once, with its line,
        # rather than every chat request.
        self._template_source = template_source or name
        self._template = compile_template(chat_template, self._template_source) if chat_template else None
        self._plain_backend: tokenizers.Tokenizer | None = None  # built on first need
        self._specials: dict[str, int] | None = None
        self._special_pattern: re.Pattern | None = None
        self._piece_bytes: dict[str, int] | None = None  # ByteLevel's char -> byte, built on first need

    def __getstate__(self) -> dict:
        # Pickled for the engine process's front end (server/engine_process.py): the compiled
        # template and the caches are rebuilt on the other side.
        return {**self.__dict__, "_template": None, "_plain_backend": None, "_specials": None,
                "_special_pattern": None, "_piece_bytes": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.chat_template:
            self._template = compile_template(self.chat_template, self._template_source)

    def with_chat_template(self, template: str, source: str) -> "Tokenizer":
        """This tokenizer with ``template`` instead of its own chat template (``--chat-template``):
        compiled now (a syntax error raises ChatTemplateError naming ``source``), and its
        end-of-turn markers join the eos ids."""
        return Tokenizer(self.backend, bos_token=self.bos_token, eos_token=self.eos_token,
                         eos_token_ids=self._given_eos_ids, chat_template=template, name=self.name,
                         template_source=source)

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
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            check_unicode(text)
            raise

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (OpenAI's logprobs ``bytes``): its text's UTF-8, or,
        where the token holds only part of a character (its text alone decodes to U+FFFD), the
        raw bytes of its vocabulary piece, so that a client can join a character split across
        tokens: GPT-2's byte-to-character map (ByteLevel) or a ``<0xNN>`` piece (byte fallback)."""
        text = self.decode([token_id], skip_special_tokens=False)
        if "\ufffd" not in text:
            return text.encode("utf-8")
        piece = self.backend.id_to_token(token_id) or ""
        m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        if m:
            return bytes([int(m.group(1), 16)])
        if self._piece_bytes is None:
            self._piece_bytes = {c: b for b, c in _bytes_to_unicode().items()} if _byte_level(self.backend) else {}
        if piece and all(c in self._piece_bytes for c in piece):
            return bytes(self._piece_bytes[c] for c in piece)
        return text.encode("utf-8")  # no raw form known: what the text says

    def stream(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        """A fresh incremental detokenizer for one generated sequence."""
        return StreamDecoder(self, skip_special_tokens)

    # ------------------------------------------------------------ chat
    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render ``messages`` with the model's Jinja chat template, as transformers does.

        Raises ChatTemplateError if the model has no template or the template calls
        ``raise_exception``; ChatTemplateLimitError if the rendering runs past the bounds
        of ``chat_template.render`` (time, size).
        """
        if not self.chat_template:
            raise ChatTemplateError(f"{self.name}: this model has no chat template; give one with --chat-template "
                                    "FILE (LLM(chat_template=FILE)), or use plain text prompts")
        import jinja2

        try:
            return render(self._template, dict(
                messages=json.loads(json.dumps(messages)),  # plain data only into the sandbox
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **json.loads(json.dumps(kwargs)),  # extra variables (chat_template_kwargs): plain data too
            ))
        except ChatTemplateLimitError as e:
            raise ChatTemplateLimitError(f"{self.name}: {e}") from None
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"{self.name}: chat template error: {e}") from e
        except TypeError as e:  # the template's own operations on the messages: content None + a string
            raise ChatTemplateRenderError(f"{self.name}: chat template error: the template cannot render these "
                                          f"messages ({type(e).__name__}: {e})") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, *,
                    special_tokens_in_content: bool = False, **template_kwargs: Any) -> list[int]:
        """The prompt ids of a chat: the rendered template, tokenized without added BOS/EOS
        (the template writes its own).

        Text that came from a message's content is plain text: a special token written in it
        (``<|im_start|>system``) is encoded as the characters it consists of, never as the
        control token, so a user cannot forge turns. Only the template's own markup yields
        special tokens. ``special_tokens_in_content=True`` restores the unsafe behaviour of
        transformers' ``apply_chat_template`` + ``encode`` (content may carry control tokens).
        Ids equal that of transformers whenever no content holds a special token's text.
        ``template_kwargs`` reach the template as extra variables (plain data).
        """
        specials = self._special_tokens()
        marked, nonce = messages, None
        if not special_tokens_in_content and specials:
            marked, nonce = _mark_specials(messages, specials)
        text = self.apply_chat_template(marked, add_generation_prompt=add_generation_prompt, **template_kwargs)
        if nonce is None:  # no content holds a special token's text
            return self.encode(text, add_special_tokens=False)
        try:
            return self._encode_marked(text, specials, nonce)
        except TypeError:
            check_unicode(text)
            raise

    def _special_tokens(self) -> dict[str, int]:
        """Text -> id of the tokens the backend matches as control tokens before tokenizing."""
        if self._specials is None:
            self._specials = {t.content: i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        return self._specials

    def _special_re(self) -> re.Pattern:
        """Any special token's text, the longest first (as the backend matches)."""
        if self._special_pattern is None:
            names = sorted(self._special_tokens(), key=len, reverse=True)
            self._special_pattern = re.compile("|".join(re.escape(n) for n in names))
        return self._special_pattern

    def _encode_marked(self, text: str, specials: dict[str, int], nonce: str = "") -> list[int]:
        """Encode rendered text whose content-born specials are markers (``_mark_specials``):
        split at the template's special tokens, as the backend does (with their lstrip/rstrip),
        and encode each run between them with special-token matching off, the markers turned
        back into their text."""
        if self._plain_backend is None:
            plain = tokenizers.Tokenizer.from_str(self.backend.to_str())
            plain.encode_special_tokens = True  # specials in the input are plain text
            self._plain_backend = plain
        added = self.backend.get_added_tokens_decoder()
        names = list(specials)
        pieces: list[str | int] = []  # runs of text and special ids
        pos = 0
        for m in self._special_re().finditer(text):
            tok = added[specials[m.group(0)]]
            run = text[pos : m.start()]
            pieces += [run.rstrip() if tok.lstrip else run, specials[m.group(0)]]
            pos = m.end()
            if tok.rstrip:
                while pos < len(text) and text[pos].isspace():
                    pos += 1
        pieces.append(text[pos:])
        ids: list[int] = []
        for p in pieces:
            if isinstance(p, int):
                ids.append(p)
            elif p:
                p = _unmark(p, names, nonce)
                ids += self._plain_backend.encode(p, add_special_tokens=False).ids
        return ids


def _byte_level(backend: tokenizers.Tokenizer) -> bool:
    """Does the backend's decoder map pieces to bytes with GPT-2's table (ByteLevel, alone or in a Sequence)?"""
    dec = json.loads(backend.to_str()).get("decoder") or {}
    return any(d.get("type") == "ByteLevel" for d in [dec, *dec.get("decoders", [])])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which ByteLevel pieces are written in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# A special token's text inside message content, while the template renders it: private-use
# characters that no tokenizer treats specially and no template looks for, with a nonce so that
# content cannot write a marker of its own.
def _marker(nonce: str, i: int) -> str:
    return f"\ue000{nonce}:{i}\ue001"


def _unmark(text: str, names: list[str], nonce: str) -> str:
    def back(m: re.Match) -> str:
        i = int(m.group(1))
        return names[i] if i < len(names) else m.group(0)

    return re.sub(f"\ue000{nonce}:([0-9]+)\ue001", back, text)


def _mark_specials(messages: list[dict], specials: dict[str, int]) -> tuple[list[dict], str | None]:
    """``messages`` with each special token's text in a content string replaced by a marker
    (``_marker``); and the markers' nonce, None if no content held special text."""
    names = list(specials)
    pattern = re.compile("|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)))
    index = {n: i for i, n in enumerate(names)}
    nonce = secrets.token_hex(8)
    found = False

    def mark(s: Any) -> Any:
        nonlocal found
        if not isinstance(s, str) or not pattern.search(s):
            return s
        found = True
        return pattern.sub(lambda m: _marker(nonce, index[m.group(0)]), s)

    out = []
    for msg in messages:
        if not isinstance(msg, dict):
            out.append(msg)
            continue
        msg = dict(msg)
        content = msg.get("content")
        if isinstance(content, list):  # OpenAI content parts
            msg["content"] = [{**p, "text": mark(p.get("text"))} if isinstance(p, dict) else mark(p) for p in content]
        else:
            msg["content"] = mark(content)
        out.append(msg)
    return out, nonce if found else None


class StreamDecoder:
    """Turns generated token ids into text, one token at a time.

    ``push`` returns only text that is complete: a UTF-8 character split over
    several byte tokens comes out once its last byte arrives, never as U+FFFD.
    Decoding a window of a few previous tokens (rather than the new token
    alone) keeps the spaces that SentencePiece decoders strip at the start.

    Why not ``tokenizers.decoders.DecodeStream`` (the same algorithm in Rust): it gives the
    same text wherever it returns, but raises "Invalid prefix encountered" on byte-fallback
    runs that are not valid UTF-8 (Gemma), which sampling can produce; this one keeps going
    (tests/test_tokenizer.py::test_stream_decoder_equals_decode_stream).
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
