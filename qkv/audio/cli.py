"""``qkv transcribe FILE``: speech to text with a Whisper model (``LLM(model).transcribe``)."""

from __future__ import annotations

import argparse

from .transcribe import RESPONSE_FORMATS, TASKS, language_code, render


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="audio file (WAV, FLAC, OGG, MP3: anything libsndfile reads)")
    p.add_argument("--model", default="whisper-base", help="a Whisper model: a named default or a directory")
    p.add_argument("--language", default=None, help="spoken language, e.g. en (default: detected by the model)")
    p.add_argument("--task", default="transcribe", choices=TASKS, help="translate: into English")
    p.add_argument("--response-format", default="text", choices=RESPONSE_FORMATS,
                   help="text, or OpenAI's json / verbose_json (with 30-s segments)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (on a busy CPU, 1 may be fastest)")


def transcriber(model: str, device: str | None = None, threads: int | None = None):
    """``LLM(model)``, refused (ValueError naming the model) unless it is a Whisper model."""
    from qkv import LLM
    from qkv.audio.speech_engine import check_whisper

    llm = LLM(model, device=device, threads=threads)
    check_whisper(llm.config, llm.tokenizer, llm.source)
    return llm


def run(args) -> int:
    from .io import load_audio

    samples = load_audio(args.file)  # a malformed file fails here, before any model loads
    if args.language is not None:
        language_code(args.language)  # so does an unknown language (it was found after the load)
    llm = transcriber(args.model, args.device, args.threads)
    result = llm.transcribe(samples, language=args.language, task=args.task, response_format=args.response_format)
    print(render(result))
    return 0
