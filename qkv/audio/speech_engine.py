"""Whisper on qkv's own engine: the ``SpeechModel`` that ``transcribe`` drives.

``speech_model(llm)`` wraps a loaded Whisper ``LLM``; its ``generate`` sends one request per
30-s window through ``LLM.generate`` (so the windows batch in the scheduler, each with its own
cross-attention pages), greedy, with the model's ``suppress_tokens`` masked at every step and
``begin_suppress_tokens`` at the first output token: the rules of Whisper's reference decoding
and of faster-whisper (engine/processors.py applies them). The server builds the same model
over its engine thread instead (server/audio.py) with ``generate=``.
"""

from __future__ import annotations

from qkv.engine.request import SamplingParams

from .errors import AudioError
from .transcribe import GenerateFn, SpeechModel


def check_whisper(config, tokenizer, source: str) -> None:
    """ValueError unless the model can transcribe (a Whisper model with its tokenizer)."""
    if config.model_type != "whisper":
        raise ValueError(f"{source}: a {config.model_type} model cannot transcribe; load a Whisper model "
                         "(e.g. LLM('whisper-base'))")
    if tokenizer is None:
        raise ValueError(f"{source}: this Whisper model has no tokenizer.json, which transcription needs")


def check_timestamps(timestamps: bool) -> None:
    """Timestamped decoding needs Whisper's timestamp rules (timestamps in pairs, increasing, a
    timestamp forced when its probability mass wins); without them the model's tokens differ
    from Whisper's and faster-whisper's, so it is refused rather than answered wrong."""
    if timestamps:
        raise AudioError("timestamps: timestamped decoding is not supported yet (Whisper's timestamp rules are "
                         "not applied); segments are the 30-s windows")


def suppression(config, source: str) -> tuple[list[int], list[int]]:
    """(suppress_tokens, begin_suppress_tokens): from an HF directory's generation_config.json
    when it sets them (transformers reads them there first), else from the model config
    (config.json; a CTranslate2 directory's ``suppress_ids``/``suppress_ids_begin``)."""
    from pathlib import Path

    from qkv.loading.hf import _read_json, model_file

    extra = config.extra or {}
    found = [list(extra.get("suppress_tokens") or []), list(extra.get("begin_suppress_tokens") or [])]
    d = Path(source)
    if d.is_dir():
        f = model_file(d, "generation_config.json")
        gen = _read_json(f, required=False)
        for i, key in enumerate(("suppress_tokens", "begin_suppress_tokens")):
            value = gen.get(key)
            if value is None:
                continue
            if not isinstance(value, list) or not all(type(t) is int and t >= 0 for t in value):
                raise ValueError(f"{f}: {key} must be a list of token ids, got {value!r}")
            found[i] = value
    return found[0], found[1]


def speech_params(suppress: tuple[list[int], list[int]], max_tokens: int) -> SamplingParams:
    """Greedy decoding with the model's ``suppression`` rules, ``max_tokens`` new tokens at most."""
    return SamplingParams(temperature=0.0, max_tokens=max(1, max_tokens), skip_special_tokens=False,
                          suppress_token_ids=list(suppress[0]), begin_suppress_token_ids=list(suppress[1]))


def max_target_positions(config, max_model_len: int) -> int:
    return min(config.max_position_embeddings, max_model_len)


def llm_generate(llm) -> GenerateFn:
    """A ``GenerateFn`` over ``LLM.generate``: all windows' requests are submitted at once."""

    suppress = suppression(llm.config, llm.source)

    def generate(features, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        params = speech_params(suppress, max_new_tokens)
        inputs = [{"encoder_features": f, "prompt_token_ids": p} for f, p in zip(features, prompts)]
        try:
            outs = llm.generate(inputs, params, use_tqdm=False)
        except ValueError as e:  # e.g. features of the wrong shape for this model
            raise AudioError(f"file: {e}") from None
        return [list(o.token_ids) for o in outs]

    return generate


def speech_model(llm, generate: GenerateFn | None = None) -> SpeechModel:
    """The ``SpeechModel`` of a Whisper ``LLM``; ``generate`` replaces ``LLM.generate`` (the
    server passes one that goes through its engine thread)."""
    check_whisper(llm.config, llm.tokenizer, llm.source)
    return SpeechModel(llm.tokenizer, generate or llm_generate(llm), n_mels=llm.config.extra["num_mel_bins"],
                       max_target_positions=max_target_positions(llm.config, llm.engine.max_model_len),
                       name=str(llm.source))
