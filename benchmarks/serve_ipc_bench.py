"""What the process split costs per engine step, on this machine's CPU (docs/architecture.md).

    python3 benchmarks/serve_ipc_bench.py [--batch 128] [--steps 2000]

1. IPC: one step's outputs (``--batch`` entries, wire.py's shape) packed with msgpack, sent
   over a ZeroMQ ipc:// PUSH/PULL pair to another process and unpacked there; the time per
   step is measured at the receiver (throughput, the pipeline kept full) and as a ping-pong
   round trip (latency).
2. Detokenization and stop strings: SampleText.push per token with SmolLM2's tokenizer, the
   work that moved from the engine's loop to the front end.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import time


def entries(batch: int) -> list:
    return [[f"chatcmpl-{i:032x}", 0, random.randrange(49152), None, 0, None, None] for i in range(batch)]


def _sink(addr: str, back: str, steps: int) -> None:
    import zmq

    from qkv.server import wire

    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.connect(addr)
    push.connect(back)
    for _ in range(steps):
        wire.unpack(pull.recv())
    push.send(b"done")
    for _ in range(steps):  # ping-pong
        push.send(wire.packer()(wire.unpack(pull.recv())))


def ipc(batch: int, steps: int) -> tuple[float, float]:
    import tempfile

    import zmq

    from qkv.server import wire

    d = tempfile.mkdtemp()
    addr, back = f"ipc://{d}/a", f"ipc://{d}/b"
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    push.bind(addr)
    pull.bind(back)
    p = multiprocessing.get_context("spawn").Process(target=_sink, args=(addr, back, steps))
    p.start()
    pack, msg = wire.packer(), ["out", entries(batch), 0, None]
    push.send(pack(msg))  # the receiver is up
    t0 = time.perf_counter()
    for _ in range(steps - 1):
        push.send(pack(msg))
    pull.recv()
    through = (time.perf_counter() - t0) / (steps - 1)
    t0 = time.perf_counter()
    for _ in range(steps):
        push.send(pack(msg))
        wire.unpack(pull.recv())
    rtt = (time.perf_counter() - t0) / steps
    p.join()
    return through, rtt


def detok(tokens: int) -> float:
    from qkv.engine.request import SamplingParams
    from qkv.loading import load
    from qkv.engine.detokenizer import SampleText

    tok = load("smollm2").tokenizer
    text = " ".join(random.Random(0).choice(["the", "cache", "blocks", "kv", "of", "a", "model", "token"])
                    for _ in range(tokens))
    ids = tok.encode(text, add_special_tokens=False)[:tokens]
    s = SampleText(tok, SamplingParams(max_tokens=len(ids), stop=["</answer>", "\n\n\n"]), frozenset())
    t0 = time.perf_counter()
    for t in ids:
        s.push(t)
    return (time.perf_counter() - t0) / len(ids)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=2000)
    a = p.parse_args()
    through, rtt = ipc(a.batch, a.steps)
    print(f"IPC, {a.batch} outputs per step: {through * 1e6:.0f} us/step pipelined, {rtt * 1e6:.0f} us round trip")
    per = detok(4000)
    print(f"detokenize + 2 stop strings: {per * 1e6:.1f} us/token = {per * a.batch * 1e6:.0f} us per step of "
          f"{a.batch} sequences")


if __name__ == "__main__":
    main()
