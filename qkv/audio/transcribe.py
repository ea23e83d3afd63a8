"""Transcription: audio -> 30-s windows -> log-mel -> Whisper prompt -> greedy tokens -> text.

The decoder itself is not here: ``transcribe`` calls the ``generate`` function of the
``SpeechModel`` it receives, so any Whisper implementation can be plugged in (qkv's own
engine, or in the tests HF transformers' ``WhisperForConditionalGeneration``).

The prompt is Whisper's: ``<|startoftranscript|><|lang|><|task|>`` then ``<|notimestamps|>``
unless timestamps are asked for. With ``language=None`` the language is the model's greedy
first token after ``<|startoftranscript|>`` on the first window (it must be a language token).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .errors import AudioError
from .features import SAMPLE_RATE, log_mel, windows
from .io import AudioInput, load_audio
from .languages import LANGUAGES

RESPONSE_FORMATS = ("json", "text", "verbose_json")
TASKS = ("transcribe", "translate")

# generate(features (B, n_mels, 3000) float32, prompts (B lists of ids), max_new_tokens) ->
# B lists of generated ids (prompt excluded; may end with <|endoftext|>). Greedy, with the
# model's suppress_tokens masked at every step and begin_suppress_tokens at the first step,
# as Whisper's reference decoding (and faster-whisper) do. The callee owns any cache it uses.
GenerateFn = Callable[[torch.Tensor, list[list[int]], int], list[list[int]]]


class TokenizerLike(Protocol):
    def token_to_id(self, token: str) -> int | None: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True)
class SpeechModel:
    """What ``transcribe`` needs from a Whisper model."""

    tokenizer: TokenizerLike
    generate: GenerateFn
    n_mels: int = 80
    max_target_positions: int = 448  # decoder positions: prompt + generated tokens
    name: str = "whisper"


@dataclass
class Segment:
    id: int
    seek: int  # the window's first mel frame
    start: float
    end: float
    text: str
    tokens: list[int] = field(default_factory=list)
    temperature: float = 0.0


def _special(tok: TokenizerLike, token: str) -> int:
    tid = tok.token_to_id(token)
    if tid is None:
        raise AudioError(f"the tokenizer has no {token} token; is it a Whisper tokenizer?")
    return tid


def language_code(language: str) -> str:
    """``"en"``, ``"English"`` or ``"english"`` -> ``"en"``; anything else is refused by name."""
    key = language.strip().lower()
    if key in LANGUAGES:
        return key
    by_name = {name: code for code, name in LANGUAGES.items()}
    if key in by_name:
        return by_name[key]
    raise AudioError(f"language: unknown language {language!r} (use an ISO 639-1 code such as 'en', 'fr', 'de')")


def prompt_tokens(tokenizer: TokenizerLike, language: str = "en", task: str = "transcribe", timestamps: bool = False) -> list[int]:
    """``<|startoftranscript|><|language|><|task|>[<|notimestamps|>]`` as ids."""
    if task not in TASKS:
        raise AudioError(f"task: {task!r} is not one of {', '.join(TASKS)}")
    ids = [_special(tokenizer, "<|startoftranscript|>"), _special(tokenizer, f"<|{language_code(language)}|>"),
           _special(tokenizer, f"<|{task}|>")]
    if not timestamps:
        ids.append(_special(tokenizer, "<|notimestamps|>"))
    return ids


def detect_language(model: SpeechModel, features: torch.Tensor) -> str:
    """The model's greedy first token after ``<|startoftranscript|>``, as a language code."""
    tok = model.tokenizer
    first = model.generate(features[None], [[_special(tok, "<|startoftranscript|>")]], 1)[0]
    codes = {tok.token_to_id(f"<|{code}|>"): code for code in LANGUAGES}
    if not first or first[0] not in codes:
        raise AudioError("language: could not detect the language (the model's first token is not a language); pass language=")
    return codes[first[0]]


def transcribe(model: SpeechModel, audio: AudioInput, language: str | None = None, task: str = "transcribe",
               response_format: str = "json", *, timestamps: bool = False, sample_rate: int | None = None,
               name: str | None = None) -> str | dict[str, Any]:
    """Transcribe (or translate to English) ``audio``: a file path, a file's bytes or 16 kHz samples.

    Returns OpenAI's response shapes: ``text`` -> the text; ``json`` -> ``{"text"}``;
    ``verbose_json`` -> ``{"task", "language", "duration", "text", "segments"}`` with one
    segment per 30-s window (or per timestamped span when ``timestamps``). Bad arguments and
    unreadable audio raise ``AudioError`` naming the field or the file.
    """
    if response_format not in RESPONSE_FORMATS:
        raise AudioError(f"response_format: {response_format!r} is not supported (one of {', '.join(RESPONSE_FORMATS)})")
    if task not in TASKS:
        raise AudioError(f"task: {task!r} is not one of {', '.join(TASKS)}")
    if language is not None:
        language = language_code(language)
    samples = load_audio(audio, sample_rate=sample_rate, name=name)
    pieces = list(windows(samples))
    features = torch.stack([log_mel(w, model.n_mels) for _, w in pieces])
    if language is None:
        language = detect_language(model, features[0])
    prompt = prompt_tokens(model.tokenizer, language, task, timestamps)
    budget = model.max_target_positions - len(prompt)
    outputs = model.generate(features, [list(prompt) for _ in pieces], budget)
    segments = _segments(model.tokenizer, pieces, outputs, timestamps)
    text = "".join(s.text for s in segments).strip()
    if response_format == "text":
        return text
    if response_format == "json":
        return {"text": text}
    return {"task": task, "language": LANGUAGES[language], "duration": round(samples.numel() / SAMPLE_RATE, 3),
            "text": text, "segments": [s.__dict__ for s in segments]}


def _segments(tok: TokenizerLike, pieces: Sequence[tuple[float, torch.Tensor]], outputs: list[list[int]],
              timestamps: bool) -> list[Segment]:
    eot = _special(tok, "<|endoftext|>")
    # Timestamp tokens follow <|notimestamps|> (tokenizer.json files often omit them).
    ts_begin = _special(tok, "<|notimestamps|>") + 1
    out: list[Segment] = []
    for (start, window), ids in zip(pieces, outputs):
        ids = ids[: ids.index(eot)] if eot in ids else list(ids)
        end = start + window.numel() / SAMPLE_RATE
        seek = round(start * SAMPLE_RATE) // 160
        if not timestamps:
            out.append(Segment(len(out), seek, start, round(end, 3), tok.decode(ids), ids))
            continue
        # <|t0|> text <|t1|> pairs; times are 0.02 s steps from the window's start.
        span: list[int] = []
        t0 = start
        for i in ids:
            if i >= ts_begin:
                t = start + (i - ts_begin) * 0.02
                if span:
                    out.append(Segment(len(out), seek, round(t0, 3), round(t, 3), tok.decode(span), span))
                    span = []
                t0 = t
            else:
                span.append(i)
        if span:
            out.append(Segment(len(out), seek, round(t0, 3), round(end, 3), tok.decode(span), span))
    return out


def render(result: str | dict[str, Any]) -> str:
    """A result as the CLI prints it: text as is, JSON indented."""
    return result if isinstance(result, str) else json.dumps(result, indent=2, ensure_ascii=False)
