"""The concurrent-transcription benchmark's wave (tools/bench_transcribe_gpu.py) on the CPU, on a
tiny random Whisper with Whisper's input shape (80 mels x 3,000 frames, 1,500 encoder positions):
every request decodes exactly ``--tokens`` tokens, requests queue for seats, nothing leaks, and
the cross-attention bytes it reports are ``qkv memory``'s footprint and the engine's pool."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from qkv.config import ModelConfig
from qkv.engine.engine import LLMEngine
from qkv.tools import bench_transcribe_gpu as bench
from qkv.tools.memory import footprint

pytestmark = pytest.mark.usefixtures("one_thread")


def test_wave_and_cross_memory_on_a_tiny_whisper():
    import transformers as tf

    shape = {**bench.WHISPER_BASE, "d_model": 32, "encoder_layers": 1, "decoder_layers": 1,
             "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32}
    cfg = ModelConfig.from_hf(shape)
    torch.manual_seed(0)
    hf = tf.WhisperForConditionalGeneration(tf.WhisperConfig(**{k: v for k, v in shape.items() if k != "model_type"}))
    engine = LLMEngine(cfg, hf.state_dict(), None, device="cpu", max_num_seqs=2, max_num_batched_tokens=4000,
                       kv_cache_memory=8 << 20)
    args = SimpleNamespace(tokens=5, samples=None)
    r = bench.wave(engine, args, 0, 3)
    assert r["peak_running"] == 2 and r["steps"] > 5  # the third request waited for a seat
    s = engine.stats()
    assert s["num_blocks_free"] + s["num_blocks_cached"] == s["num_blocks_total"]
    mem = bench.cross_memory(engine, 2, 9)
    # 1 layer x K,V x 32 values x 4 bytes x 1,504 slots (94 blocks of 16)
    assert mem["cross_bytes_per_request"] == 2 * 32 * 4 * 1504
    (cross,) = [g for g in footprint(cfg, 9, 2, 32, 16).groups if g.spec.kind == "cross"]
    assert mem["cross_bytes_at_peak"] == 2 * cross.bytes_per_sequence
    (group,) = [g for g, c in zip(engine.kv.groups, engine.kv.cross) if c]
    pools = [engine.runner.kv_caches[i] for i in group.layers]
    assert mem["cross_pool_bytes"] == sum(t.numel() * t.element_size() for t in pools)
