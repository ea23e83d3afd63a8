"""How much int4 keys disturb attention, by grouping: per token along the head dimension (what
qkv stores, with and without the Hadamard rotation) vs per channel over a group of tokens
(KIVI's key grouping, which a paged cache written one token at a time cannot store exactly).

SmolLM2's queries and keys (RoPE applied) are captured from the reference backend over the
first 512 tokens of the perplexity corpus; for every layer and head, the KL divergence of each
causal attention row with quantized keys from the row with exact keys is averaged.

    PYTHONPATH=. python benchmarks/kv_int_key_grouping.py
"""

from __future__ import annotations

import dataclasses

import torch

from qkv import LLM
from qkv.attention import backend, reference
from qkv.kvcache.kv_int import dequantize, hadamard, plane_format, quantize
from qkv.tools.perplexity import default_corpus

CAPTURED: list = []


def capture(q, k, v, kv_cache, batch, group, scale, window=None, softcap=None, dilation=1):
    CAPTURED.append((q.detach().clone(), k.detach().clone(), scale))
    return reference.paged_attention(q, k, v, kv_cache, batch, group, scale, window, softcap, dilation)


def per_token(k, fmt, rotate=False):
    x = hadamard(k) if rotate else k
    return dequantize(*quantize(x, fmt), fmt, torch.float32)


def absmax_g32(k, rotate=False):
    """The earlier int4 format: groups of 32, one fp16 scale absmax / 7, levels -7..7."""
    x = (hadamard(k) if rotate else k).unflatten(-1, (-1, 32))
    s = (x.abs().amax(-1, keepdim=True) / 7).to(torch.float16).float()
    return (torch.where(s > 0, x / s, torch.zeros_like(x)).round().clamp(-7, 7) * s).flatten(-2)


def per_channel(k, bits, tokens):
    """[T, KVH, D] with one fp16 scale per (channel, group of ``tokens`` tokens), symmetric."""
    T = k.shape[0] - k.shape[0] % tokens
    x = k[:T].unflatten(0, (T // tokens, tokens))  # [G, n, KVH, D]
    qmax = (1 << (bits - 1)) - 1
    s = (x.abs().amax(1, keepdim=True) / qmax).to(torch.float16).float()
    q = torch.where(s > 0, x / s, torch.zeros_like(x)).round().clamp(-qmax, qmax)
    return torch.cat([(q * s).flatten(0, 1), k[T:]])


def kl(q, k_true, k_q, scale, rotated=False):
    T, H, D = q.shape
    g = H // k_true.shape[1]
    qq = hadamard(q) if rotated else q
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    tot = 0.0
    for h in range(H):
        s_t = (q[:, h] @ k_true[:, h // g].T) * scale
        s_q = (qq[:, h] @ k_q[:, h // g].T) * scale
        lp_t = s_t.masked_fill(~mask, float("-inf")).log_softmax(-1)
        lp_q = s_q.masked_fill(~mask, float("-inf")).log_softmax(-1)
        tot += (lp_t.exp() * (lp_t - lp_q)).masked_fill(~mask, 0).sum(-1).mean().item()
    return tot / H


def main():
    backend.register("capture", capture)
    llm = LLM("smollm2", device="cpu", attention_backend="capture")
    ids = llm.tokenizer.encode(default_corpus(), add_special_tokens=False)[:512]
    llm.logits(ids)
    i4, i8 = plane_format("int4"), plane_format("int8")
    schemes = {
        "int4 per token, groups of 32, fp16 absmax scales (0.5625 B/value)": lambda k: (absmax_g32(k), False),
        "int4 per token, groups of 32, fp16 absmax scales, rotated (0.5625 B/value)":
            lambda k: (absmax_g32(k, True), True),
        "int4 per token, groups of 16, e5m3 least-squares scales (0.5625 B/value)": lambda k: (per_token(k, i4), False),
        "int4 per token, groups of 16, e5m3 least-squares scales, rotated: stored (0.5625 B/value)":
            lambda k: (per_token(k, i4, True), True),
        # One scale a token and head folds out of the widening (scores scaled once per key, after
        # the dot): what a kernel with one instruction a value pair would need (issue 16, session 18).
        "int4 per token, groups of 32, e5m3 least-squares scales, rotated (0.53 B/value)":
            lambda k: (per_token(k, dataclasses.replace(i4, group=32), True), True),
        "int4 per token, one e5m3 scale a head (64 values), rotated (0.516 B/value)":
            lambda k: (per_token(k, dataclasses.replace(i4, group=k.shape[-1]), True), True),
        "int4 per channel, 32-token groups (0.5625 B/value)": lambda k: (per_channel(k, 4, 32), False),
        "int4 per channel, 16-token groups (0.625 B/value)": lambda k: (per_channel(k, 4, 16), False),
        "int8 per token, groups of 64 (1.03 B/value)": lambda k: (per_token(k, i8), False),
    }
    for name, fn in schemes.items():
        vals = []
        for q, k, scale in CAPTURED:
            kq, rot = fn(k.float())
            vals.append(kl(q.float(), k.float(), kq, scale, rot))
        print(f"{name}: mean KL {sum(vals) / len(vals):.5f} nats/row, worst layer {max(vals):.5f}")


if __name__ == "__main__":
    main()
