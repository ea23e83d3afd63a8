"""model/cpu_layout.py: float32 CPU weights relaid column-major keep their values and ties,
and the engine applies it on the CPU (the HF comparisons in test_hf_property run through it)."""

import torch
from torch import nn

from qkv.model.cpu_layout import column_major_fp32


def test_relayout_keeps_values_shapes_and_ties():
    torch.manual_seed(0)
    emb = nn.Embedding(300, 32)
    head = nn.Linear(32, 300, bias=False)
    head.weight = emb.weight  # tied, as Whisper's and SmolLM2's output projections are
    mlp = nn.Linear(32, 64)
    bf = nn.Linear(32, 16).to(torch.bfloat16)
    model = nn.ModuleDict(dict(emb=emb, head=head, mlp=mlp, bf=bf))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(3, 32)
    ref_logits, ref_mlp = head(x), mlp(x)
    assert column_major_fp32(model) == 2  # the tied matrix once, the mlp; bf16 untouched
    assert head.weight is emb.weight and head.weight.stride() == (1, 300)
    assert mlp.weight.stride() == (1, 64) and bf.weight.is_contiguous()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    ids = torch.tensor([0, 17, 299])
    assert torch.equal(emb(ids), before["emb.weight"][ids])  # the embedding reads the strided rows
    torch.testing.assert_close(head(x), ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mlp(x), ref_mlp, rtol=1e-5, atol=1e-5)
    assert column_major_fp32(model) == 0  # idempotent


def test_cpu_engine_runs_column_major(tmp_path):
    from test_server import make_model_dir

    from qkv import LLM

    llm = LLM(make_model_dir(tmp_path), device="cpu", num_kv_blocks=16)
    w = llm.engine.model.lm_head.weight
    assert w.dtype == torch.float32 and w.stride() == (1, w.shape[0])
