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
