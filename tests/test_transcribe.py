"""``qkv.audio.transcribe`` driven by a tiny random HF ``WhisperForConditionalGeneration`` (a
real model, fast): windows, prompts (equal to HF's WhisperTokenizer prefix), features (equal
to HF's feature extractor per window), response formats, and refusals by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qkv.audio import AudioError
from qkv.audio.features import SAMPLE_RATE
from qkv.audio.transcribe import SpeechModel, prompt_tokens, transcribe

pytest.importorskip("soundfile", reason="needs qkv[audio]")


@pytest.fixture(scope="module")
def tokenizer_file():
    from whisper_ref import whisper_tokenizer_file

    return whisper_tokenizer_file()


@pytest.fixture(scope="module")
def tiny(tokenizer_file):
    """(SpeechModel over a tiny random HF Whisper, the calls its generate function received)."""
    from whisper_ref import tiny_speech_model

    calls: list = []
    return tiny_speech_model(tokenizer_file, calls), calls


@pytest.mark.parametrize("language, task, timestamps", [("en", "transcribe", False), ("French", "translate", True)])
def test_prompt_equals_hf_tokenizer_prefix(tokenizer_file, tiny, language, task, timestamps):
    import transformers as tf

    hf = tf.WhisperTokenizerFast(tokenizer_file=str(tokenizer_file), language=language.lower(), task=task,
                                 predict_timestamps=timestamps)
    assert prompt_tokens(tiny[0].tokenizer, language, task, timestamps) == hf.prefix_tokens


def test_long_audio_is_cut_into_30_second_windows(tiny):
    from transformers import WhisperFeatureExtractor

    model, calls = tiny
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(int(65 * SAMPLE_RATE))).astype(np.float32)
    calls.clear()
    out = transcribe(model, audio, language="en", response_format="verbose_json")
    (features, prompts, budget), = calls
    ref = WhisperFeatureExtractor()([audio[:480_000], audio[480_000:960_000], audio[960_000:]],
                                    sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
    np.testing.assert_allclose(features.numpy(), ref, atol=1e-4, rtol=0)
    assert prompts == [[50258, 50259, 50359, 50363]] * 3 and budget == 12 - 4
    assert [(s["start"], s["end"], s["seek"]) for s in out["segments"]] == [(0.0, 30.0, 0), (30.0, 60.0, 3000), (60.0, 65.0, 6000)]
    assert out["duration"] == 65.0 and out["language"] == "english" and out["task"] == "transcribe"
    assert out["text"] == "".join(s["text"] for s in out["segments"]).strip()


def test_bad_arguments_and_audio_are_refused_by_name(tiny, tmp_path):
    model, _ = tiny
    audio = np.zeros(1600, dtype=np.float32)
    text = transcribe(model, audio, language="en", response_format="text")
    assert isinstance(text, str) and transcribe(model, audio, language="en") == {"text": text}
    with pytest.raises(AudioError, match="response_format: 'srt'"):
        transcribe(model, audio, language="en", response_format="srt")
    with pytest.raises(AudioError, match="language: unknown language 'klingon'"):
        transcribe(model, audio, language="klingon")
    with pytest.raises(AudioError, match="task: 'summarize'"):
        transcribe(model, audio, language="en", task="summarize")
    bad = tmp_path / "talk.wav"
    bad.write_bytes(b"RIFF....WAVEjunk")
    with pytest.raises(AudioError, match="talk.wav: not a readable audio file"):
        transcribe(model, bad, language="en")
