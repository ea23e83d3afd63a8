"""DeepSeek mixture-of-experts MLP in plain torch: routed experts + always-on shared experts.

Routing follows HF transformers exactly:
  - DeepSeek-V2: softmax over expert logits; ``greedy`` top-k, or ``group_limited_greedy``
    (keep the ``topk_group`` groups with the highest max score first); weights are the
    softmax scores times ``routed_scaling_factor``.
  - DeepSeek-V3 (``noaux_tc``): sigmoid scores; the choice uses scores + ``e_score_correction_bias``
    with groups ranked by the sum of their top-2; weights are the (bias-free) sigmoid
    scores of the chosen experts, normalized if ``norm_topk_prob``, times the scaling factor.
Experts are separate GatedMLPs so HF's per-expert weight names load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from qkv.config import ModelConfig
from qkv.model.layers import GatedMLP


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig, num_experts: int):
        super().__init__()
        ex = cfg.extra
        self.v3 = cfg.model_type == "deepseek_v3"
        self.weight = nn.Parameter(torch.zeros(num_experts, cfg.hidden_size))
        if self.v3:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts), requires_grad=False)
        self.top_k = ex["num_experts_per_tok"]
        self.method = ex.get("topk_method") or ("noaux_tc" if self.v3 else "greedy")
        self.n_group, self.topk_group = ex.get("n_group") or 1, ex.get("topk_group") or 1
        self.scaling = ex.get("routed_scaling_factor") or 1.0
        self.norm_topk_prob = bool(ex.get("norm_topk_prob")) and self.v3
        if self.method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ValueError(f"unsupported MoE topk_method {self.method!r}")
        if num_experts % self.n_group:
            raise ValueError(f"{num_experts} experts do not split into n_group={self.n_group} groups")

    def _group_mask(self, group_scores: torch.Tensor, n: int) -> torch.Tensor:
        idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores).scatter_(1, idx, 1).bool()
        return mask[:, :, None].expand(-1, self.n_group, n // self.n_group).reshape(-1, n)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (weights [T, k] float32, expert indices [T, k])."""
        logits = x.float() @ self.weight.float().t()
        n = logits.shape[1]
        if self.v3:
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias.float()
            group_scores = choice.view(-1, self.n_group, n // self.n_group).topk(2, dim=-1)[0].sum(-1)
            choice = choice.masked_fill(~self._group_mask(group_scores, n), float("-inf"))
            idx = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
            w = scores.gather(1, idx)
            if self.norm_topk_prob:
                w = w / (w.sum(-1, keepdim=True) + 1e-20)
        else:
            scores = logits.softmax(dim=-1)
            if self.method == "group_limited_greedy":
                group_scores = scores.view(-1, self.n_group, n // self.n_group).max(dim=-1).values
                scores = scores.masked_fill(~self._group_mask(group_scores, n), 0.0)
            w, idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        return w * self.scaling, idx


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ex = cfg.extra
        n, inter = ex.get("n_routed_experts"), ex.get("moe_intermediate_size")
        if not n or not inter or not ex.get("num_experts_per_tok"):
            raise ValueError("MoE layer needs n_routed_experts, moe_intermediate_size and num_experts_per_tok")
        self.gate = Router(cfg, n)
        self.experts = nn.ModuleList(GatedMLP(cfg.hidden_size, inter, cfg.hidden_act) for _ in range(n))
        shared = ex.get("n_shared_experts")
        # As HF: built whenever the field is set, even 0 (a zero-width MLP whose checkpoint still
        # holds its empty weights and, with mlp_bias, a bias that is added); mlp_bias applies
        # because HF builds it as a dense MLP.
        self.shared_experts = (GatedMLP(cfg.hidden_size, inter * shared, cfg.hidden_act, cfg.mlp_bias)
                               if shared is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.gate(x)
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            out = self.dense(x, w, idx)
        else:
            out = torch.zeros_like(x)
            # Loop over the experts that received tokens: plain torch, no grouped GEMM. Which
            # experts those are is read on the host, so this path cannot be graph-captured.
            for e in idx.unique().tolist():
                tok, slot = torch.where(idx == e)
                y = self.experts[e](x[tok]) * w[tok, slot, None].to(x.dtype)
                out.index_add_(0, tok, y)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    def dense(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The routed experts without a host sync, for CUDA-graph capture: every expert runs on
        every token and unchosen ones are weighted 0. It reads every expert's weights each step,
        which a decode batch of a few dozen tokens mostly does anyway; the sums are the sparse
        loop's, in the same expert order, plus exact zeros."""
        weights = torch.zeros(x.shape[0], len(self.experts), dtype=w.dtype, device=x.device).scatter_(1, idx, w)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out += expert(x) * weights[:, e, None].to(x.dtype)
        return out
