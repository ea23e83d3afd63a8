"""CUDA graphs for decode steps: capture once per padded batch size, replay every step.

At batch 1 an eager Llama-8B step launches about a thousand kernels and spends most of its
time on the host; a graph replay launches them all at once. One graph is captured for each
batch size in ``1, 2, 4, 8, ...`` up to ``max_num_seqs``; a decode step of ``n`` sequences
replays the smallest graph of at least ``n`` rows, the extra rows padded (slot -1: they write
nothing; block table of zeros, one key: they read garbage that nobody looks at).

Ownership: this object owns the static input buffers, the graphs and their memory pool. The
runner owns the KV caches the graphs read and write, which therefore must never be
reallocated after capture; nor may the RoPE tables (``ensure`` runs before capture, up to
``max_model_len``). Steps that are not pure decodes, or wider than the largest graph, run
eagerly (the fallback), as does everything when the engine is built with ``enforce_eager``.
"""

from __future__ import annotations

import time

import torch

from qkv.attention.batch import AttentionBatch


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes, n = [], 1
    while n < max_num_seqs:
        sizes.append(n)
        n *= 2
    sizes.append(max_num_seqs)
    return sizes


class DecodeGraphs:
    def __init__(self, runner, max_num_seqs: int, max_model_len: int):
        self.runner = runner
        kv = runner.kv
        dev = runner.device
        self.sizes = graph_batch_sizes(max_num_seqs)
        N = self.sizes[-1]
        self.block_size = kv.block_size
        self.max_blocks = [r if r is not None else -(-max_model_len // kv.block_size) for r in kv.ring]
        # Cross-attention groups (encoder-decoder) hold the encoder's blocks whatever the length.
        for g, group in enumerate(kv.groups):
            if kv.cross[g]:
                self.max_blocks[g] = -(-group.spec.encoder_len // kv.block_size)
        # Every per-step input lives in one flat device buffer, filled from one pinned host
        # buffer of the same layout by a single copy: [ids | positions | gather rows | from
        # previous step | slots per group | block tables per group]. Positions double as
        # num_computed (a decode token's position is the number of tokens cached before it).
        # Async scheduling: a row whose "from previous step" flag is 1 takes its input id from
        # row "gather rows" of the previous step's sampled tokens, on the device.
        G = len(self.max_blocks)
        # Encoder-decoder models append the rows' cross-attention key counts (encoder lengths).
        size = 4 * N + G * N + sum(N * w for w in self.max_blocks) + (N if any(kv.cross) else 0)
        self.host = torch.zeros(size, dtype=torch.int64, pin_memory=True)
        self.buf = torch.zeros(size, dtype=torch.int64, device=dev)
        self.input_ids, self.positions = self.buf[:N], self.buf[N:2 * N]
        self.num_computed = self.positions
        self.gather_rows, self.from_prev = self.buf[2 * N:3 * N], self.buf[3 * N:4 * N]
        self.slot_mappings = [self.buf[(4 + g) * N:(5 + g) * N] for g in range(G)]
        self.block_tables, self._host_tables, off = [], [], (4 + G) * N
        for w in self.max_blocks:
            self.block_tables.append(self.buf[off:off + N * w].view(N, w))
            self._host_tables.append(self.host[off:off + N * w].view(N, w).numpy())
            off += N * w
        self.encoder_lens = self.buf[off:off + N] if any(kv.cross) else None  # padding rows: one key
        self._enc_at = off
        self._host = self.host.numpy()
        self._copied = torch.cuda.Event()
        self._rows = [[None] * N for _ in self.max_blocks]  # per row: (table, length, last block) last staged
        self.query_lens = torch.ones(N, dtype=torch.int64, device=dev)
        self.query_start_loc = torch.arange(N + 1, dtype=torch.int64, device=dev)
        self.logits: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.max_model_len = max_model_len

    def _batch(self, n: int) -> AttentionBatch:
        return AttentionBatch(
            query_start_loc=self.query_start_loc[:n + 1], num_computed=self.num_computed[:n],
            query_lens=self.query_lens[:n], max_query_len=1, max_seq_len=self.max_model_len,
            block_size=self.block_size, block_tables=[t[:n] for t in self.block_tables],
            slot_mappings=[s[:n] for s in self.slot_mappings], ring_blocks=list(self.runner.kv.ring),
            logits_indices=self.query_start_loc[:n], graph=True,
            encoder_lens=None if self.encoder_lens is None else self.encoder_lens[:n])

    def _forward(self, n: int) -> torch.Tensor:
        model = self.runner.model
        hidden = model(self.input_ids[:n], self.positions[:n], self._batch(n))
        return model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every batch size (largest first, so the smaller ones reuse its pool).
        Returns the seconds it took."""
        t0 = time.perf_counter()
        for rope in self.runner.ropes:
            rope.ensure(self.max_model_len)
        for n in reversed(self.sizes):
            for s in self.slot_mappings:
                s.fill_(-1)
            for t in self.block_tables:
                t.zero_()
            if self.encoder_lens is not None:
                self.encoder_lens.fill_(1)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._forward(n)  # warm-up: compiles kernels, sets up cuBLAS workspaces
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.logits[n] = self._forward(n)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[n] = graph
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def can_run(self, sched) -> bool:
        return (bool(self.graphs) and len(sched.requests) <= self.sizes[-1]
                and all(n == 1 for n in sched.num_new_tokens))

    def run(self, sched, prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Fill the static inputs from a pure decode step, replay, return logits [n, vocab]
        (a view of the graph's output buffer, valid until the next replay). A request with a
        pending token (async scheduling) feeds ``prev_tokens[req.pending_row]``."""
        return self.replay(*self.stage(sched, prev_tokens))

    def replay(self, n: int, size: int) -> torch.Tensor:
        """Replay the graph of ``size`` rows over the staged inputs; the first ``n`` rows' logits."""
        self.graphs[size].replay()
        return self.logits[size][:n]

    def stage(self, sched, prev_tokens: torch.Tensor | None = None) -> tuple[int, int]:
        """Fill the static inputs (``run`` without the replay); (rows, graph size)."""
        n = len(sched.requests)
        size = next(s for s in self.sizes if s >= n)
        kv = self.runner.kv
        N, h = self.sizes[-1], self._host
        G = len(self.max_blocks)
        self._copied.synchronize()  # the last step's copy has read the pinned buffer
        h[:(4 + G) * N] = 0
        h[4 * N:(4 + G) * N] = -1  # padding rows write nothing
        rows, rings, bs, cross = self._rows, kv.ring, self.block_size, kv.cross
        # Per-row values gathered in lists and written with one slice each: a numpy scalar
        # store per value costs more than the whole list.
        ids, pos, from_rows, from_prev = [], [], [], []
        slots = [[] for _ in range(G)]
        for i, req in enumerate(sched.requests):
            p = req.num_computed_tokens
            pos.append(p)
            if req.pending_row is None:
                ids.append(req.all_token_ids[p])
                from_rows.append(0)
                from_prev.append(0)
            else:  # the host does not know this token yet: it is gathered on the device below
                ids.append(0)
                from_rows.append(req.pending_row)
                from_prev.append(1)
            for g, t in enumerate(kv.block_tables(req.request_id)):
                if cross[g]:  # read only: the encoder wrote it (engine/encoder.py)
                    slots[g].append(-1)
                else:
                    slots[g].append(t[p // bs] * bs + p % bs if rings[g] is None else kv.slot(g, t, p))
                # Refresh a row only when its table may have changed since it was staged: another
                # table object (another request, or re-admitted after preemption), another length
                # (grown), or another last block (copy-on-write only ever replaces the blocks
                # being written, which in a decode step is the last). Usually none of these holds:
                # a table grows one block per block_size tokens. Entries past a sequence's length
                # are never read, so stale ones are harmless.
                key = (t, len(t), t[-1] if t else None)
                done = rows[g][i]
                if done is None or done[0] is not t or done[1:] != key[1:] or rings[g] is not None:
                    self._host_tables[g][i, :len(t)] = t
                rows[g][i] = key
        h[:n] = ids
        h[N:N + n] = pos
        h[2 * N:2 * N + n] = from_rows
        h[3 * N:3 * N + n] = from_prev
        for g in range(G):
            h[(4 + g) * N:(4 + g) * N + n] = slots[g]
        if self.encoder_lens is not None:
            h[self._enc_at:self._enc_at + N] = 1
            h[self._enc_at:self._enc_at + n] = [r.encoder_len for r in sched.requests]
        gather = any(from_prev)
        # One group: copy only the table rows in use (the rest of the buffer holds nothing new).
        end = (5 * N + size * self.max_blocks[0]) if G == 1 else self.buf.numel()
        self.buf[:end].copy_(self.host[:end], non_blocking=True)
        self._copied.record()
        if gather:  # outside the graph, in stream order after the copy and the previous sampling
            ids = self.input_ids[:n]
            ids.copy_(torch.where(self.from_prev[:n] == 1, prev_tokens[self.gather_rows[:n]], ids))
        return n, size
