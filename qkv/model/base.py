"""What every model file shares: the forward contract and weight loading from HF names."""

from __future__ import annotations

import torch
from torch import nn

from qkv.config import ModelConfig


class WeightError(ValueError):
    pass


class CausalLM(nn.Module):
    """A decoder LM over a packed batch.

    ``forward(input_ids [T], positions [T], batch)`` returns hidden states [T, hidden];
    ``compute_logits(hidden)`` maps selected rows to float32 logits. Subclasses list in
    ``stacked`` which HF weights are fused into one of their parameters, and map the rest
    of the HF names in ``hf_name``.
    """

    # HF name fragment -> (our fragment, shard index): shards are concatenated on dim 0.
    stacked: dict[str, tuple[str, int]] = {
        ".q_proj.": (".qkv_proj.", 0), ".k_proj.": (".qkv_proj.", 1), ".v_proj.": (".qkv_proj.", 2),
        ".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1),
    }

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config

    def hf_name(self, name: str) -> str | None:
        """Our parameter name for HF weight ``name``; None to skip it."""
        return name

    def transform(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """Adapt an HF tensor to our layout (e.g. GPT-2's Conv1D transpose)."""
        return w

    def attention_layers(self) -> list[nn.Module]:
        from qkv.model.attention import Attention

        return [m for m in self.modules() if isinstance(m, Attention) or getattr(m, "is_attention", False)]

    def rotary_embeddings(self) -> list[nn.Module]:
        from qkv.model.layers import RotaryEmbedding

        return [m for m in self.modules() if isinstance(m, RotaryEmbedding)]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        from qkv.model.layers import linear

        logits = linear(self.lm_head, hidden, torch.float32)  # the GEMV stores fp32 itself: no cast launch
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @torch.no_grad()
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        pieces: dict[str, dict[int, torch.Tensor]] = {}
        loaded = set()
        for name, w in weights.items():
            ours = self.hf_name(name)
            if ours is None:
                continue
            w = self.transform(name, w)
            for frag, (new, idx) in self.stacked.items():
                if frag in ours:
                    pieces.setdefault(ours.replace(frag, new), {})[idx] = w
                    break
            else:
                self._copy(params, ours, w, name)
                loaded.add(ours)
        for ours, parts in pieces.items():
            self._copy(params, ours, torch.cat([parts[i] for i in sorted(parts)], 0), ours)
            loaded.add(ours)
        if self.config.tie_word_embeddings and "lm_head.weight" not in loaded and "lm_head.weight" in params:
            self.lm_head.weight = self.embedding_weight()
            loaded.add("lm_head.weight")
        missing = sorted(set(params) - loaded - {n for n, _ in self.named_parameters() if n in loaded})
        missing = [n for n in missing if not self._tied(n)]
        if missing:
            raise WeightError(f"weights missing for {len(missing)} parameters, e.g. {missing[:4]}")

    def _tied(self, name: str) -> bool:
        return name == "lm_head.weight" and self.lm_head.weight is self.embedding_weight()

    def embedding_weight(self) -> nn.Parameter:
        raise NotImplementedError

    @staticmethod
    def _copy(params: dict, ours: str, w: torch.Tensor, source: str) -> None:
        if ours not in params:
            raise WeightError(f"unexpected weight {source!r} (no parameter {ours!r})")
        p = params[ours]
        if tuple(p.shape) != tuple(w.shape):
            raise WeightError(f"weight {source!r} has shape {tuple(w.shape)}, expected {tuple(p.shape)}")
        p.copy_(w)
