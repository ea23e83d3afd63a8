"""SampleText: one sample's text and stop strings, for the engine and the process split's front end.

``LLMEngine._append`` keeps one per sample; the engine process of ``qkv serve`` sends token ids
only (``LLMEngine.detokenize = False``) and its front end keeps them instead, so both paths give
the same text, the same stop and the same streamed deltas: a token that ends the sample by id (eos unless ``ignore_eos``, ``stop_token_ids``) adds
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
        self.text += delta  # stop strings are checked even when it adds nothing, as the engine does
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
        out = text[self.sent:len(text) - self._held(text)]
        self.sent += len(out)
        return out, False

    def _held(self, text: str) -> int:
        """Characters to hold back: the longest end of the text that begins a stop string (a
        whole one too: before min_tokens it does not stop yet, but the rule still cuts it later).
        It lies in the unsent text (what began a stop string was held back then), and only
        prefixes ending with the text's last character can match: per token this costs about
        one comparison per stop string, not one per prefix (16 stop strings of 64k characters
        took seconds a token, stalling the engine thread or the server's event loop)."""
        unsent = len(text) - self.sent
        best = 0
        if unsent:
            last = text[-1]
            for s in self.params.stop:
                k = min(len(s), unsent)
                while k > best:
                    k = s.rfind(last, 0, k) + 1  # the longest prefix, up to k, that ends with ``last``
                    if k > best and text.endswith(s[:k]):
                        best = k
                        break
                    k -= 1
        return best

    def flush(self) -> str:
        """The text not streamed yet (held back as a possible stop string's start)."""
        out = self.text[self.sent:]
        self.sent = len(self.text)
        return out
