"""The Triton cross attention (paged decode kernel, one query per "sequence") against the
reference cross attention (attention/cross.py). On a CUDA machine it runs on the GPU; without
CUDA, under Triton's interpreter (TRITON_INTERPRET=1) on the CPU."""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported: set it before
try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - depends on the machine
    pytest.skip("triton is not installed", allow_module_level=True)

from qkv.attention.batch import AttentionBatch  # noqa: E402
from qkv.attention.cross import cross_attention as reference  # noqa: E402
from qkv.attention.triton.cross import cross_attention as triton_cross  # noqa: E402

DEV = "cuda" if CUDA else "cpu"


def make_batch(enc: list[int], qlens: list[int], bs: int, blocks: int, gen, graph: bool = False):
    """Requests with encoders of ``enc`` positions over shuffled cross pages (group 1)."""
    perm = torch.randperm(blocks, generator=gen).tolist()
    tables = [[perm.pop() for _ in range(-(-n // bs))] for n in enc]
    width = max(map(len, tables))
    t64 = lambda x: torch.tensor(x, dtype=torch.int64, device=DEV)  # noqa: E731
    qsl = [0]
    for n in qlens:
        qsl.append(qsl[-1] + n)
    B = len(enc)
    return AttentionBatch(query_start_loc=t64(qsl), num_computed=t64([5] * B), query_lens=t64(qlens),
                          max_query_len=max(qlens), max_seq_len=6 + max(qlens), block_size=bs,
                          block_tables=[torch.zeros(B, 1, dtype=torch.long, device=DEV),
                                        t64([t + [0] * (width - len(t)) for t in tables])],
                          slot_mappings=[], ring_blocks=[None, None], encoder_lens=t64(enc),
                          max_encoder_len=0 if graph else max(enc), graph=graph)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not CUDA, reason="bf16 tensor-core dots: GPU only"))])
@pytest.mark.parametrize("enc,qlens", [([13, 40, 7], [1, 3, 5]),  # prefill rows beside a decode row
                                       ([13, 40, 7, 33], [1, 1, 1, 1]),  # a decode step
                                       ([300], [2])])  # several key tiles
@pytest.mark.parametrize("graph", [False, True])
def test_triton_cross_attention_matches_reference(enc, qlens, graph, dtype):
    """Over shuffled pages, GQA 4 query heads per KV head; ``graph``: sized as in a CUDA graph
    (no host-known encoder length: the kernel splits for any length)."""
    g = torch.Generator().manual_seed(len(enc) + sum(qlens))
    bs, kvh, H, D = 8, 2, 8, 32
    blocks = sum(-(-n // bs) for n in enc) + 3
    cache = torch.randn(2, blocks, bs, kvh, D, generator=g).to(DEV, dtype)
    batch = make_batch(enc, qlens, bs, blocks, g, graph)
    q = torch.randn(sum(qlens), H, D, generator=g).to(DEV, dtype)
    want = reference(q, cache, batch, 1, D ** -0.5).float()
    got = triton_cross(q, cache, batch, 1, D ** -0.5).float()
    tol = 2e-2 if dtype == torch.bfloat16 else (3e-3 if CUDA else 1e-5)  # tf32 dots on the GPU
    err = (got - want).norm() / want.norm()
    assert err < tol, f"relative error {err:.2e}"
