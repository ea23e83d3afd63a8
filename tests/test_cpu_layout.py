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
    down = nn.Linear(64, 32)
    down.keep_row_major = True  # as Whisper's decoder fc2
    model = nn.ModuleDict(dict(emb=emb, head=head, mlp=mlp, bf=bf, down=down))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(3, 32)
    ref_logits, ref_mlp = head(x), mlp(x)
    assert column_major_fp32(model) == 2  # the tied matrix once, the mlp; bf16 untouched
    assert head.weight is emb.weight and head.weight.stride() == (1, 300)
    assert mlp.weight.stride() == (1, 64) and bf.weight.is_contiguous() and down.weight.is_contiguous()
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


def test_fused_projections_are_views_of_one_column_major_matrix():
    """fuse_column_major: q/k/v (k without a bias, as Whisper's) as one addmm that gives each
    projection's output exactly, while each linear keeps its Parameter, now a view."""
    from qkv.model.cpu_layout import fuse_column_major

    torch.manual_seed(0)
    q, k, v = nn.Linear(32, 32), nn.Linear(32, 32, bias=False), nn.Linear(32, 16)
    params = [q.weight, k.weight, v.weight]
    x = torch.randn(3, 32)
    refs = [m(x) for m in (q, k, v)]
    wt, bias = fuse_column_major([q, k, v])
    assert wt.shape == (32, 80) and wt.is_contiguous() and bias.shape == (80,)
    assert [q.weight, k.weight, v.weight] == params and k.weight.data_ptr() == wt.data_ptr() + 32 * 4
    for out, ref, m in zip(torch.addmm(bias, x, wt).split([32, 32, 16], dim=1), refs, (q, k, v)):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    assert fuse_column_major([q, k, v]) is None  # already views: left alone
    assert fuse_column_major([nn.Linear(32, 8), nn.Linear(16, 8)]) is None  # different inputs


def test_cpu_whisper_engine_fuses_self_attention_qkv(tmp_path):
    """The engine fuses on the CPU (test_whisper_model's HF comparisons then run through it),
    and keeps the decoder's fc2 row-major."""
    from test_whisper_model import tiny_whisper

    from qkv import LLM

    tiny_whisper().save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), device="cpu", num_kv_blocks=64)
    attn = llm.engine.model.model.decoder.layers[0].self_attn
    assert attn._qkv is not None and attn._qkv[0].data_ptr() == attn.q_proj.weight.data_ptr()
    layer = llm.engine.model.model.decoder.layers[0]
    assert layer.fc2.weight.is_contiguous() and not layer.fc1.weight.is_contiguous()  # fc2 kept row-major


def test_whisper_decodes_one_sequence_on_one_thread(tmp_path):
    """cpu_decode_threads: a one-sequence decode step runs on one intra-op thread, the prompt
    step (with the encoder) and batched decode steps on all of them; the count is restored."""
    from test_whisper_model import PROMPT, mel, tiny_whisper

    from qkv import LLM
    from qkv.engine.request import SamplingParams

    tiny_whisper().save_pretrained(tmp_path)
    before = torch.get_num_threads()
    llm = LLM(str(tmp_path), device="cpu", num_kv_blocks=64, threads=2)
    model = llm.engine.runner.model
    seen = []
    forward = model.forward

    def spy(ids, pos, batch):
        seen.append((batch.num_seqs, batch.is_decode, torch.get_num_threads()))
        return forward(ids, pos, batch)

    model.forward = spy
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    try:
        llm.generate([{"encoder_features": mel(0), "prompt_token_ids": PROMPT}], params, use_tqdm=False)
        assert seen == [(1, False, 2), (1, True, 1), (1, True, 1)] and torch.get_num_threads() == 2
        seen.clear()
        llm.generate([{"encoder_features": mel(s), "prompt_token_ids": PROMPT} for s in (1, 2)], params,
                     use_tqdm=False)
        assert seen == [(2, False, 2), (2, True, 2), (2, True, 2)]
    finally:
        torch.set_num_threads(before)
