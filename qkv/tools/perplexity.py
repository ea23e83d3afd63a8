"""``qkv perplexity MODEL``: perplexity over consecutive windows of a text.

    qkv perplexity smollm2                          # built-in corpus, 16 windows of 512 tokens
    qkv perplexity ./smollm2-mqa --text book.txt --max-tokens 4096
    qkv perplexity gemma3-270m --bos                # every window starts with BOS
    qkv perplexity gemma3-270m --decode --max-tokens 2048   # one token a step: the decode path

The text is tokenized whole (no special tokens), cut to its first ``--max-tokens`` tokens and
split into consecutive, non-overlapping windows of ``--window`` tokens. Each window is scored
on its own (its cache starts empty) and every next-token prediction inside it counts:
``window - 1`` predictions per window, or ``window`` with ``--bos``, where BOS is put in front
of each window and the window's first token is predicted from it. Perplexity is
``exp(total negative log-likelihood / number of predictions)`` over all windows; logits are
fp32 from ``LLM.logits`` (the paged-cache forward pass the engine serves with). By default a
window is one prefill chunk; ``--decode`` scores it one token a step (a token budget of 1), so
every position after the first goes through the decode step generation runs: on a CPU the
compiled decode step where ``qkv compile`` has built one (engine/cpu_aoti.py), eager with
``--no-aot-decode``. Same predictions, the other code path (and many times slower).

Built-in corpus: CPython's ``pydoc_data.topics`` (English prose about Python that ships with
every Python), ``"\\n\\n".join(topics.values())`` in the dict's order.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch


class Perplexity(NamedTuple):
    perplexity: float
    nll: float  # summed over all scored predictions, in nats
    num_predictions: int
    num_windows: int
    seconds: float


def default_corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics.values())


def windows(ids: list[int], window: int, max_tokens: int | None = None) -> list[list[int]]:
    """Consecutive windows of ``window`` tokens over the first ``max_tokens`` ids; a shorter
    last window is kept if it has at least two tokens (one prediction)."""
    if window < 2:
        raise ValueError(f"--window must be at least 2 tokens, got {window}")
    ids = ids[:max_tokens] if max_tokens else ids
    out = [ids[i:i + window] for i in range(0, len(ids), window)]
    return [w for w in out if len(w) >= 2]


def window_nll(logits: torch.Tensor, ids: list[int], skip: int = 0) -> tuple[float, int]:
    """Summed NLL of ``ids[t+1]`` under ``logits[t]`` for t >= skip (fp64 accumulation)."""
    logp = torch.log_softmax(logits[skip:-1].double(), dim=-1)
    target = torch.tensor(ids[skip + 1:], dtype=torch.long)
    return -logp.gather(1, target[:, None]).sum().item(), len(target)


def perplexity(logits_fn, ids: list[int], window: int = 512, max_tokens: int | None = 8192,
               bos_id: int | None = None, progress=None) -> Perplexity:
    """Score ``ids`` window by window. ``logits_fn(ids) -> float32 [len, vocab]`` (e.g.
    ``LLM.logits``); with ``bos_id`` each window is scored as ``[bos] + window``."""
    start = time.perf_counter()
    total, count = 0.0, 0
    wins = windows(ids, window, max_tokens)
    if not wins:  # a window needs two tokens: one to predict from, one predicted
        scored = f"{max_tokens} of the text's {len(ids)}" if max_tokens and max_tokens < len(ids) else f"{len(ids)}"
        raise ValueError(f"{scored} tokens are too few to score (at least 2)")
    for i, w in enumerate(wins):
        seq = ([bos_id] if bos_id is not None else []) + w
        nll, n = window_nll(logits_fn(seq), seq)
        total, count = total + nll, count + n
        if progress:
            progress(i + 1, len(wins), math.exp(total / count))
    return Perplexity(math.exp(total / count), total, count, len(wins), time.perf_counter() - start)


def read_text(path: str) -> str:
    """The ``--text`` file, or a ValueError naming the flag and the file (before the model loads)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--text {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"--text {path}: cannot read it ({e.strerror or e})") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    from qkv.cli import add_model_arguments

    p.add_argument("model", metavar="MODEL", help="named model, .gguf file or HF directory")
    add_model_arguments(p, model_flag=False)
    p.add_argument("--text", default=None, help="a UTF-8 text file (default: CPython's pydoc_data.topics)")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--max-tokens", type=int, default=8192, help="score the first N tokens (0: all; default 8192)")
    p.add_argument("--bos", action="store_true", help="start every window with the BOS token")
    p.add_argument("--quiet", action="store_true", help="no per-window progress on stderr")
    p.add_argument("--decode", action="store_true",
                   help="score one token a step, through decode steps (the compiled decode step where built)")


def run(args) -> int:
    from qkv import LLM
    from qkv.cli import engine_kwargs

    model = args.model
    if args.max_tokens < 0:  # a negative count sliced ids[:-n]: the text less its last n tokens, unsaid
        raise ValueError(f"--max-tokens must be at least 0 (0: all), got {args.max_tokens}")
    text = read_text(args.text) if args.text else default_corpus()
    kw = engine_kwargs(args)
    # By default a window is one prefill chunk (and must fit in the cache); --decode: one token a step.
    from qkv.engine.budget import resolve

    device = kw["device"] or ("cuda" if torch.cuda.is_available() else "cpu")  # as LLM picks it
    given = kw["max_num_batched_tokens"] != "auto"  # a budget given is honoured (scored in chunks), not replaced
    if args.decode and given:
        raise ValueError("--decode scores one token a step (a token budget of 1): drop --max-num-batched-tokens")
    if args.decode:
        kw["max_num_batched_tokens"] = 1
    elif not given:
        kw["max_num_batched_tokens"] = max(resolve("auto", device)[0], args.window + 1)
    llm = LLM(model, **kw)
    if llm.tokenizer is None:
        raise ValueError(f"{model} has no tokenizer: perplexity needs one to tokenize the text")
    bos = None
    if args.bos:
        bos = llm.tokenizer.bos_token_id if llm.tokenizer.bos_token_id is not None else llm.config.bos_token_id
        if bos is None:
            raise ValueError(f"{model} defines no BOS token; drop --bos")
    ids = llm.tokenizer.encode(text, add_special_tokens=False)

    def progress(i, n, ppl):
        if not args.quiet:
            print(f"window {i}/{n}: running perplexity {ppl:.4f}", file=sys.stderr)

    r = perplexity(llm.logits, ids, args.window, args.max_tokens or None, bos, progress)
    print(f"{model}: perplexity {r.perplexity:.4f} over {r.num_predictions:,} predictions in "
          f"{r.num_windows} windows of {args.window} tokens ({'BOS + ' if bos is not None else ''}"
          f"text: {'pydoc_data.topics' if not args.text else args.text})"
          f"{', one token a step' if args.decode else ''}; {r.seconds:.1f} s")
    return 0
