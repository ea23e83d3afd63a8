"""Per-rank checkpoint reading (qkv/distributed/checkpoint.py): each rank's shard, read from
the safetensors files, is bit-identical to rank 0 loading everything and slicing it
(``shard_weights``, the path GGUF still takes). No processes: this is the reader alone."""

from __future__ import annotations

import pytest
import torch

from qkv.distributed.checkpoint import CheckpointFiles
from qkv.distributed.shard import Layout, shard_weights
from qkv.loading import load
from qkv.loading.lazy import LazyWeights

from conftest import tiny_config
from test_tensor_parallel import _save


def _tied_llama_in_shards(path) -> str:
    """Tied embeddings (no lm_head in the file: the vocab-parallel lm_head is the embedding's
    slice) in a sharded checkpoint (model.safetensors.index.json, several files), bfloat16,
    with nonzero biases (HF initializes them to zero; rank 1's row-parallel ones must be)."""
    cfg, cls = tiny_config("llama", tie_word_embeddings=True, vocab_size=250, num_key_value_heads=1,
                           attention_bias=True, mlp_bias=True)
    torch.manual_seed(1)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    out = str(path / "tied")
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size="40KB")
    return out


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "deepseek", "tied"])
def test_each_rank_reads_what_rank_0_would_slice(family, tmp_path):
    path = _tied_llama_in_shards(tmp_path) if family == "tied" else _save(family, tmp_path)
    loaded = load(path)
    files = CheckpointFiles.of(loaded.weights)
    assert files is not None and (family != "tied" or len(files.files) > 1)
    for size in (2, 4) if family in ("qwen3", "tied") else (2,):  # 4: one KV head on 4 ranks, padded vocab
        layout = Layout.of(loaded.config, size)
        for rank in range(size):
            want = shard_weights(loaded.weights, layout, rank)
            got = files.read_shard(layout, rank)
            assert got.keys() == want.keys()
            for name, w in want.items():
                g = got[name]
                assert g.dtype == w.dtype and g.shape == w.shape, name
                assert torch.equal(g.view(torch.int32), w.view(torch.int32)), (family, size, rank, name)


def test_other_sources_keep_rank_0_slicing():
    """A plain dict (or a GGUF's LazyWeights, whose names the loader renames) has no files."""
    assert CheckpointFiles.of({"model.embed_tokens.weight": torch.zeros(4, 2)}) is None
    assert CheckpointFiles.of(None) is None
    assert CheckpointFiles.of(LazyWeights({"x": lambda dtype: torch.zeros(1)})) is None  # as load_gguf builds it
