"""DeepSeek mixture-of-experts MLP in plain torch: routed experts + always-on shared experts.

Routing follows HF transformers exactly:
  - DeepSeek-V2: softmax over expert logits; ``greedy`` top-k, or ``group_limited_greedy``
    (keep the ``topk_group`` groups with the highest max score first); weights are the
    softmax scores times ``routed_scaling_factor``.
  - DeepSeek-V3 (``noaux_tc``): sigmoid scores; the choice uses scores + ``e_score_correction_bias``
    with groups ranked by the sum of their top-2; weights are the (bias-free) sigmoid
    scores of the chosen experts, normalized if ``norm_topk_prob``, times the scaling factor.
Experts are separate GatedMLPs so HF's per-expert weight names load unchanged.

The router is the same everywhere; the routed experts run in one of two ways. On CUDA (with
triton, attention backend not "reference") the fused kernel of ``qkv.attention.triton.moe``
sorts the (token, slot) pairs by expert on the device and runs two grouped GEMMs over the
chosen experts only: no host sync, so decode steps are graph-captured. Elsewhere
``MoE.reference`` loops over the experts that received tokens, read on the host.
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
        # Each version runs one scoring and its own choices: V3 always scores sigmoid with
        # noaux_tc, V2 softmax with greedy or group_limited_greedy (HF's V2 has no noaux_tc), so
        # a config asking for another would otherwise run silently as its version's routing.
        methods, scoring = (("noaux_tc",), "sigmoid") if self.v3 else (("greedy", "group_limited_greedy"), "softmax")
        if self.method not in methods:
            raise ValueError(f"unsupported MoE topk_method {self.method!r} for {cfg.model_type} "
                             f"(supported: {', '.join(methods)})")
        if ex.get("scoring_func") not in (None, scoring):
            raise ValueError(f"unsupported MoE scoring_func {ex['scoring_func']!r} for {cfg.model_type} "
                             f"(supported: {scoring})")
        if ex.get("moe_layer_freq") not in (None, 1):
            raise ValueError(f"unsupported moe_layer_freq {ex['moe_layer_freq']!r} (supported: 1, as HF: "
                             f"every layer from first_k_dense_replace on is MoE)")
        if num_experts % self.n_group:
            raise ValueError(f"{num_experts} experts do not split into n_group={self.n_group} groups")
        if not 1 <= self.top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok={self.top_k} must be between 1 and n_routed_experts={num_experts}")
        # Otherwise the first forward pass fails in torch.topk with "selected index k out of range".
        if self.method != "greedy" and not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be between 1 and n_group={self.n_group}")
        if self.v3 and num_experts // self.n_group < 2:
            raise ValueError(f"noaux_tc ranks each group by its top-2 experts: n_group={self.n_group} leaves "
                             f"{num_experts // self.n_group} expert a group (n_routed_experts={num_experts})")

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
    # The engine's choice (backend.use): "reference" keeps the whole model plain torch.
    attention_backend = "reference"

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
        self._stacked: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.gate(x)
        kernel = self._kernel(x)
        if kernel is not None:
            w13, w2 = self.stacked_weights()
            shared = self.shared_experts(x) if self.shared_experts is not None else None
            return kernel.fused_moe(x, w13, w2, w, idx, shared)
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the MoE reference loop reads expert ids on the host and cannot be "
                               "captured in a CUDA graph; the fused kernel needs triton and silu experts")
        out = self.reference(x, w, idx)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    def reference(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The routed experts in plain torch, a loop over the experts that received tokens
        (read on the host): the CPU path and the oracle of the fused kernel."""
        out = torch.zeros_like(x)
        for e in idx.unique().tolist():
            tok, slot = torch.where(idx == e)
            y = self.experts[e](x[tok]) * w[tok, slot, None].to(x.dtype)
            out.index_add_(0, tok, y)
        return out

    def _kernel(self, x: torch.Tensor):
        """qkv.attention.triton.moe for CUDA tensors with triton installed, silu experts, and
        an attention backend other than "reference" (which keeps the whole model in plain torch,
        the oracle the engine tests compare against); else None."""
        if not x.is_cuda or self.experts[0].act_name != "silu" or self.attention_backend == "reference":
            return None
        try:
            from qkv.attention.triton import moe
        except ImportError:
            return None
        return moe

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [E, 2I, H], w2 [E, H, I]): the experts' weights in two tensors, as the grouped
        GEMM reads them. Built on first use; each expert's parameters then become views into
        them (no second copy), so loading and ``state_dict`` keep HF's per-expert names. A
        later ``.to()`` or weight reload that moves the parameters is noticed and re-stacked."""
        first, last = self.experts[0].gate_up_proj.weight, self.experts[-1].down_proj.weight
        if self._stacked is not None:
            w13, w2 = self._stacked
            if w13[0].data_ptr() == first.data_ptr() and w2[-1].data_ptr() == last.data_ptr() \
                    and w13.dtype == first.dtype and w2.dtype == last.dtype:
                return self._stacked
        if first.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("MoE expert weights must be stacked before CUDA graph capture (run a warm-up step)")
        with torch.inference_mode(False), torch.no_grad():  # normal tensors: loading may copy_ into them later
            w13 = torch.stack([e.gate_up_proj.weight for e in self.experts])
            w2 = torch.stack([e.down_proj.weight for e in self.experts])
            for i, e in enumerate(self.experts):
                e.gate_up_proj.weight.data = w13[i]
                e.down_proj.weight.data = w2[i]
        self._stacked = (w13, w2)
        return self._stacked
