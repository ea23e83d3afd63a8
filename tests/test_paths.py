"""Every file a model directory names must resolve inside it (issue 13): index shards,
tokenizer files, and symlinks are followed before the check."""

from __future__ import annotations

import json
import os

import pytest
import torch

from qkv.loading import LoadError, load


def _tiny_dir(tmp_path, name="model"):
    from safetensors.torch import save_file

    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 16, "hidden_size": 8, "num_attention_heads": 2,
        "num_hidden_layers": 1, "intermediate_size": 8}))
    save_file({"model.embed_tokens.weight": torch.randn(16, 8)}, str(d / "model.safetensors"))
    return d


def _index(d, shard):
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.embed_tokens.weight": shard}}))


@pytest.fixture
def outside(tmp_path):
    """A valid safetensors file outside the model directory: opening it would succeed."""
    from safetensors.torch import save_file

    f = tmp_path / "secret.safetensors"
    save_file({"model.embed_tokens.weight": torch.randn(16, 8)}, str(f))
    return f


def test_index_shard_with_dotdot_is_refused(tmp_path, outside):
    d = _tiny_dir(tmp_path)
    _index(d, "../secret.safetensors")
    with pytest.raises(LoadError, match="secret.safetensors: resolves to .*outside the model directory"):
        load(d)


def test_index_shard_with_absolute_path_is_refused(tmp_path, outside):
    d = _tiny_dir(tmp_path)
    _index(d, str(outside))
    with pytest.raises(LoadError, match="outside the model directory"):
        load(d)


def test_index_shard_not_a_string(tmp_path):
    d = _tiny_dir(tmp_path)
    _index(d, ["model.safetensors"])
    with pytest.raises(LoadError, match="index.json: weight_map must map tensor names to shard file names"):
        load(d)


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"])
def test_symlink_pointing_out_is_refused(tmp_path, outside, name):
    import tokenizers

    d = _tiny_dir(tmp_path)
    tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0}, unk_token="a")).save(str(d / "tokenizer.json"))
    if (d / name).exists():
        (d / name).unlink()
    os.symlink(outside if name.endswith(".safetensors") else tmp_path / "x.json", d / name)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(LoadError, match=f"{name}: resolves to .*outside the model directory"):
        load(d)


def test_symlinks_inside_and_the_hub_cache_layout_load(tmp_path):
    d = _tiny_dir(tmp_path)
    (d / "weights").mkdir()
    (d / "model.safetensors").rename(d / "weights" / "w.safetensors")
    os.symlink("weights/w.safetensors", d / "model.safetensors")  # inside: fine
    assert set(load(d).weights) == {"model.embed_tokens.weight"}
    # HF hub cache: models--x/snapshots/<rev>/file -> ../../blobs/<hash>
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in ("config.json", "weights/w.safetensors"):
        blob = repo / "blobs" / f.replace("/", "_")
        blob.write_bytes((d / f).read_bytes())
        os.symlink(os.path.relpath(blob, snap), snap / os.path.basename(f).replace("w.", "model."))
    assert set(load(snap).weights) == {"model.embed_tokens.weight"}


def test_split_gguf_part_is_refused(tmp_path):
    gguf = pytest.importorskip("gguf")
    f = tmp_path / "m-00001-of-00002.gguf"
    w = gguf.GGUFWriter(str(f), "llama")
    w.add_uint16("split.count", 2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LoadError, match="m-00001-of-00002.gguf: part of a split GGUF \\(2 parts\\)"):
        load(f)
