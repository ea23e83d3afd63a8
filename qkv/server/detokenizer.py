"""SampleText: one sample's text and stop strings, kept by the front end of the process split.

The engine process sends token ids only (``LLMEngine.detokenize = False``). This applies the
rules ``LLMEngine._append`` applies in-process, so both paths give the same text and the same
stop: a token that ends the sample by id (eos unless ``ignore_eos``, ``stop_token_ids``) adds
no text; stop strings count from ``min_tokens`` output tokens on; the text is cut before the
stop string (after it with ``include_stop_str_in_output``).
"""

from __future__ import annotations

from qkv.engine.request import SamplingParams


class SampleText:
    def __init__(self, tokenizer, params: SamplingParams, eos_ids: frozenset[int]):
        self.params = params
        self.stop_ids = (frozenset() if params.ignore_eos else eos_ids) | frozenset(params.stop_token_ids)
        self.stream = tokenizer.stream(params.skip_special_tokens) if tokenizer is not None else None
        self.text = ""
        self.sent = 0  # characters of ``text`` streamed so far
        self.num_tokens = 0

    def push(self, tok: int) -> tuple[str, bool]:
        """Add one output token; returns (text to stream now, whether a stop string ended the
        sample). Text that may be the start of a stop string is held back until it is not
        (or the sample ends: ``flush``), so a stream never shows part of a stop string."""
        self.num_tokens += 1
        if tok in self.stop_ids or self.stream is None:
            return "", False  # the engine ends the sample itself
        delta = self.stream.push(tok)
        if not delta:
            return "", False
        self.text += delta
        p = self.params
        if not p.stop:
            self.sent = len(self.text)
            return delta, False
        text = self.text
        if self.num_tokens >= p.min_tokens:
            for s in p.stop:
                # Only the new text (plus a stop's length of overlap) can complete a stop string.
                cut = text.find(s, max(0, len(text) - len(delta) - len(s)))
                if cut >= 0:
                    self.text = text[:cut + len(s) if p.include_stop_str_in_output else cut]
                    return self.flush(), True
        hold = max((k for s in p.stop for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])), default=0)
        out = text[self.sent:len(text) - hold]
        self.sent += len(out)
        return out, False

    def flush(self) -> str:
        """The text not streamed yet (held back as a possible stop string's start)."""
        out = self.text[self.sent:]
        self.sent = len(self.text)
        return out
