"""The Triton cross attention (paged decode kernel, one query per "sequence") against the
reference cross attention. Needs a CUDA GPU: the decode kernel does not run under Triton 3.6's
CPU interpreter (``tests/test_triton.py::test_decode_split_merge`` fails there the same way,
``only 0-dimensional arrays can be converted to Python scalars``)."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (the decode kernel does not run under Triton's interpreter)",
                allow_module_level=True)
try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - depends on the machine
    pytest.skip("triton is not installed", allow_module_level=True)

from qkv.attention.batch import AttentionBatch  # noqa: E402
from qkv.attention.cross import cross_attention as reference  # noqa: E402
from qkv.attention.triton.cross import cross_attention as triton_cross  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_triton_cross_attention_matches_reference():
    """Three requests with encoders of 13, 40 and 7 positions over shuffled pages, one decoding
    (1 query), two prefilling (3 and 5 queries), GQA 4 query heads per KV head."""
    g = torch.Generator().manual_seed(0)
    bs, kvh, H, D, blocks = 8, 2, 8, 32, 24
    enc, qlens = [13, 40, 7], [1, 3, 5]
    cache = torch.randn(2, blocks, bs, kvh, D, generator=g).to(DEV)
    perm = torch.randperm(blocks, generator=g).tolist()
    tables = [[perm.pop() for _ in range(-(-n // bs))] for n in enc]
    width = max(map(len, tables))
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=DEV)
    qsl = torch.tensor([0, 1, 4, 9], device=DEV)
    batch = AttentionBatch(query_start_loc=qsl, num_computed=torch.tensor([5, 0, 0], device=DEV),
                           query_lens=torch.tensor(qlens, device=DEV), max_query_len=5, max_seq_len=6, block_size=bs,
                           block_tables=[torch.zeros(3, 1, dtype=torch.long, device=DEV), table],
                           slot_mappings=[], ring_blocks=[None, None],
                           encoder_lens=torch.tensor(enc, device=DEV))
    q = torch.randn(sum(qlens), H, D, generator=g).to(DEV)
    want = reference(q, cache, batch, 1, D ** -0.5)
    got = triton_cross(q, cache, batch, 1, D ** -0.5)
    assert torch.allclose(got.float(), want.float(), atol=2e-3, rtol=2e-3), (got - want).abs().max()
