"""ModelRunner: owns the KV cache tensors and turns a ScheduledBatch into one forward pass.

It packs the scheduled tokens of all requests into one flat batch (input ids, positions,
slot mapping, block tables), performs the copy-on-write block copies the cache manager
asked for, runs the model and returns float32 logits for the rows that are sampled.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from qkv.attention import cross
from qkv.attention.batch import AttentionBatch
from qkv.engine.scheduler import ScheduledBatch
from qkv.kvcache.kv_pages import new_cache
from qkv.kvcache.manager import KVCacheManager
from qkv.model.base import CausalLM


class ModelRunner:
    def __init__(self, model: CausalLM, kv: KVCacheManager, device: torch.device, kv_dtype: torch.dtype):
        self.model, self.kv, self.device = model, kv, device
        self.block_size = kv.block_size
        # One cache tensor per layer, shaped by its group's spec and sized by its group's pool.
        # (Encoder-decoder models have a cross-attention cache layer per decoder layer too.)
        self.kv_caches: list[torch.Tensor] = [None] * sum(len(g.layers) for g in kv.groups)
        for g, group in enumerate(kv.groups):
            for layer in group.layers:
                if kv.cross[g] and device.type == "cpu" and getattr(group.spec, "packed", None) is None:
                    self.kv_caches[layer] = cross.new_cache(group.spec, kv.num_pages(g), self.block_size, kv_dtype)
                else:
                    self.kv_caches[layer] = new_cache(group.spec, kv.num_pages(g), self.block_size, kv_dtype, device)
        for module in model.attention_layers():
            module.kv_cache = self.kv_caches[module.layer]
        self.ropes = model.rotary_embeddings()  # found once: a module walk per step would cost
        # Intra-op threads for a one-sequence decode step on the CPU, where the model asks for
        # fewer than the process has (WhisperForConditionalGeneration.cpu_decode_threads says why).
        self.decode_threads = getattr(model, "cpu_decode_threads", None) if device.type == "cpu" else None
        self.graphs = None  # DecodeGraphs (qkv.engine.cuda_graph), set by the engine on CUDA
        self.compiled = None  # CompiledDecode (qkv.engine.cpu_compile), set by the engine on request
        self.encoder = None
        if kv.has_cross:
            from qkv.engine.encoder import EncoderRunner

            self.encoder = EncoderRunner(model, kv, device)

    @property
    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv_caches)

    def _copy_blocks(self, copies: list[tuple[int, int, int]]) -> None:
        for g, src, dst in copies:
            for layer in self.kv.groups[g].layers:
                cache = self.kv_caches[layer]
                if cache.dim() == 5:  # [2, blocks, ...]: K and V planes
                    cache[:, dst] = cache[:, src]
                else:
                    cache[dst] = cache[src]

    def prepare(self, sched: ScheduledBatch, prev_tokens: torch.Tensor | None = None):
        """Pack ``sched`` into (input ids, positions, AttentionBatch) on the device. A request's
        pending token (async scheduling, ``Request.pending_row``) is always the last token it
        feeds: its id is gathered from ``prev_tokens`` on the device, never read on the host."""
        bs = self.block_size
        gather_at, gather_rows = [], []
        ids, pos, qsl = [], [], [0]
        computed, qlens = [], []
        logits_rows = []
        groups = range(len(self.kv.groups))
        slots = [[] for _ in groups]
        tables = [[] for _ in groups]
        rings, total = self.kv.ring, 0
        cross, enc_lens = self.kv.cross, []
        for req, n in zip(sched.requests, sched.num_new_tokens):
            start = req.num_computed_tokens
            end = start + n
            ids += req.all_token_ids[start:end]
            if req.pending_row is not None:
                ids.append(0)  # placeholder, replaced on the device below
                gather_at.append(total + n - 1)
                gather_rows.append(req.pending_row)
            pos += range(start, end)
            computed.append(start)
            qlens.append(n)
            total += n
            qsl.append(total)
            if end == req.num_tokens:
                logits_rows.append(total - 1)
            enc_lens.append(req.encoder_len)
            for g, table in enumerate(self.kv.block_tables(req.request_id)):
                tables[g].append(table)
                if cross[g]:
                    continue  # read only; the encoder wrote it (engine/encoder.py)
                ring = rings[g]
                if ring is None:  # KVCacheManager.slot, inlined: this loop runs per token
                    slots[g] += [table[p // bs] * bs + p % bs for p in range(start, end)]
                else:
                    # In a ring, a token whose slot a later token of this chunk reuses is never stored.
                    first_kept = end - ring * bs
                    slots[g] += [self.kv.slot(g, table, p) if p >= first_kept else -1 for p in range(start, end)]
        dev = self.device

        # Through numpy: torch.tensor on a Python list costs ~5x more per element.
        def tensor(x):
            return torch.from_numpy(np.array(x, dtype=np.int64)).to(dev, non_blocking=True)

        block_tables = []
        for g in groups:
            rows = tables[g]
            padded = np.zeros((len(rows), max(1, max(map(len, rows)))), dtype=np.int64)
            for i, t in enumerate(rows):
                padded[i, :len(t)] = t
            block_tables.append(torch.from_numpy(padded).to(dev, non_blocking=True))
        batch = AttentionBatch(
            query_start_loc=tensor(qsl),
            num_computed=tensor(computed),
            query_lens=tensor(qlens),
            max_query_len=max(qlens),
            max_seq_len=max(c + q for c, q in zip(computed, qlens)),
            block_size=bs,
            block_tables=block_tables,
            slot_mappings=[tensor(s) for s in slots],
            ring_blocks=list(self.kv.ring),
            logits_indices=tensor(logits_rows),
            encoder_lens=tensor(enc_lens) if self.encoder is not None else None,
            max_encoder_len=max(enc_lens),
        )
        batch.scratch["host_lens"] = (qlens, computed)  # the lengths on the host: no device read per layer
        input_ids = tensor(ids)
        if gather_at:
            input_ids[tensor(gather_at)] = prev_tokens[tensor(gather_rows)]
        return input_ids, tensor(pos), batch

    @torch.inference_mode()
    def execute(self, sched: ScheduledBatch, all_logits: bool = False,
                prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Run one step. Returns logits [rows, vocab]: every token's with ``all_logits``,
        else one row per request whose last token (a pending one included) was computed this
        step. ``prev_tokens``: the in-flight step's sampled tokens, which pending input ids
        index (PendingTokens.tokens); only launched here, so the host never waits for them."""
        self._copy_blocks(sched.copies)
        if self.encoder is not None:
            self.encoder.run(sched)  # newly admitted requests: encode, write their cross pages
        if self.graphs is not None and not all_logits and self.graphs.can_run(sched):
            return self.graphs.run(sched, prev_tokens)
        input_ids, positions, batch = self.prepare(sched, prev_tokens)
        for rope in self.ropes:
            rope.ensure(batch.max_seq_len)
        return self._forward(input_ids, positions, batch, all_logits)

    @contextlib.contextmanager
    def step_threads(self, sched: ScheduledBatch | None):
        """torch's intra-op threads for one engine step (its forward and its sampling): the model's
        ``cpu_decode_threads`` for a one-sequence decode step whose encoder has run, else as they are.
        The sampling is inside too: torch ops on two threads there kept an OpenMP worker spinning
        on the second core into the next step's GEMVs, which numpy's BLAS runs there
        (model/cpu_gemv.py; a transcription 3.2 -> 4.0 s, 2026-12-03)."""
        if not self.decode_threads:  # every GPU step and most models: nothing to ask torch
            yield
            return
        threads = torch.get_num_threads()
        one = (sched and len(sched.requests) == 1 and sched.num_new_tokens[0] == 1 and self.decode_threads < threads
               and not (self.encoder is not None and self.kv.needs_encoder(sched.requests[0].request_id)))
        if not one:
            yield
            return
        torch.set_num_threads(self.decode_threads)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def _forward(self, input_ids, positions, batch: AttentionBatch, all_logits: bool) -> torch.Tensor:
        if self.compiled is not None and batch.is_decode:
            hidden = self.compiled.run(input_ids, positions, batch)
        else:
            hidden = self.model(input_ids, positions, batch)
        if not all_logits:
            hidden = hidden[batch.logits_indices]
        return self.model.compute_logits(hidden)
