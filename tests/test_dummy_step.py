"""``gpu.dummy_step`` (start-up warm-up and memory profiling) hands the kernels a batch they may
walk whole: every position of every sequence maps to a block inside its table. The packed
int8/int4 prefill kernel reads a step's own K/V back from the pages, so a one-column table
under a 250-token step sent it 15 columns past the table's end (an illegal address on the
H200, 2026-12-03)."""

from __future__ import annotations

import types

import pytest
import torch

from qkv.engine import gpu


class Recorder(torch.nn.Module):
    """Stands in for a model: keeps the batch it is called with."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(max_position_embeddings=4096)
        self.batches = []

    def forward(self, ids, positions, batch):
        self.batches.append((positions, batch))
        return torch.zeros(len(ids), 4)

    def compute_logits(self, hidden):
        return hidden


@pytest.mark.parametrize("lens,rings,bs", [([250], [None], 16), ([250, 1], [None, 3], 16), ([5], [None], 16),
                                           ([33, 7, 64], [None, 8], 8)])
def test_every_position_of_a_dummy_step_maps_into_its_table(lens, rings, bs):
    model = Recorder()
    gpu.dummy_step(model, lens, rings, bs, torch.device("cpu"))
    (positions, batch), = model.batches
    assert positions.tolist() == [p for n in lens for p in range(n)]
    assert batch.slot_mappings[0].eq(-1).all()  # writes nothing
    for table, ring in zip(batch.block_tables, rings):
        assert table.shape[0] == len(lens) and table.eq(0).all()
        for n in lens:  # the block of the last position, as a kernel walking the table computes it
            last = (n - 1) // bs
            assert (last % ring if ring else last) < table.shape[1]
