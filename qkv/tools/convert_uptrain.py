"""``qkv convert ... --uptrain / --report``: pool, uptrain, measure, write (the glue between
``convert``, ``uptrain``, ``perplexity`` and ``uptrain_report``).

Perplexity in the report is ``qkv perplexity``'s measure on its built-in held-out corpus (or
``--ppl-text``): the text tokenized whole without special tokens, its first
``--ppl-max-tokens`` tokens in windows of ``--ppl-window``, every prediction counted, computed
here in fp32 with the training model's full-sequence forward (transformers' class, which
``tests/test_convert.py`` shows equal to qkv's logits within 1e-4).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from qkv.config import ModelConfig


def parse_count(s: str) -> int:
    """``2000000``, ``2_000_000``, ``2M``, ``500k``, ``1.5G`` -> int."""
    t = s.strip().replace("_", "").replace(",", "")
    mult = {"k": 10**3, "m": 10**6, "g": 10**9}.get(t[-1:].lower(), 1)
    try:
        n = float(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count: {s!r} (e.g. 2000000, 2M, 500k)") from None
    if n != int(n) or n < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole token count: {s!r}")
    return int(n)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("uptraining (distillation from the original model) and the report")
    g.add_argument("--uptrain", action="store_true",
                   help="after pooling, train the converted model towards the original's outputs")
    g.add_argument("--uptrain-tokens", type=parse_count, default=None,
                   help="training positions to process (e.g. 20M); required with --uptrain")
    g.add_argument("--uptrain-lr", type=float, default=3e-4, help="peak AdamW learning rate")
    g.add_argument("--uptrain-schedule", default="cosine", choices=["cosine", "linear"],
                   help="decay after a 5%% linear warm-up, to 10%% of the peak")
    g.add_argument("--uptrain-batch", type=int, default=32, help="sequences per step")
    g.add_argument("--uptrain-seq-len", type=int, default=512, help="tokens per training sequence")
    g.add_argument("--uptrain-text", default=None,
                   help="a UTF-8 training text file (default: the Python sources on this machine, the stdlib "
                        "first; see docs/memory.md)")
    g.add_argument("--checkpoints", type=int, default=8, help="perplexity measured every N/k tokens")
    g.add_argument("--uptrain-params", default="all", choices=["all", "attention"],
                   help="train every parameter, or only the attention projections (q/k/v/o)")
    g.add_argument("--uptrain-compile", action="store_true",
                   help="torch.compile the teacher and the student (faster steps after a compile)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations (less memory)")
    g.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    g.add_argument("--seed", type=int, default=0, help="training windows and initialisation seed")
    g.add_argument("--report", default=None, metavar="OUT.md",
                   help="write a Markdown report (and OUT.png with the curve when uptraining)")
    g.add_argument("--ppl-text", default=None, help="held-out text for the report (default: pydoc_data.topics)")
    g.add_argument("--ppl-window", type=int, default=512, help="perplexity window (as qkv perplexity)")
    g.add_argument("--ppl-max-tokens", type=int, default=8192, help="perplexity over the first N tokens")


REPORT_OPTIONS = ("--report", "--device", "--ppl-text", "--ppl-window", "--ppl-max-tokens")


def _changed_options(args) -> list[str]:
    """This module's options whose value is not the default, by flag."""
    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    return [a.option_strings[0] for a in defaults._actions
            if a.option_strings and a.dest != "help" and getattr(args, a.dest, a.default) != a.default]


def check_arguments(args) -> None:
    """Refuse combinations that would be silently ignored, before anything is loaded."""
    if args.uptrain and args.uptrain_tokens is None:
        raise ValueError("--uptrain needs --uptrain-tokens N (the training budget, e.g. 20M)")
    changed = _changed_options(args)
    if not args.uptrain:
        given = [f for f in changed if f not in REPORT_OPTIONS]
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --uptrain")
    if not args.uptrain and not args.report:
        given = [f for f in changed if f in REPORT_OPTIONS and f != "--report"]
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --uptrain or --report")
    if args.uptrain_text is not None and not Path(args.uptrain_text).is_file():
        raise FileNotFoundError(f"--uptrain-text {args.uptrain_text}: no such file")
    if args.ppl_text is not None and not Path(args.ppl_text).is_file():
        raise FileNotFoundError(f"--ppl-text {args.ppl_text}: no such file")
    if args.ppl_window < 2:
        raise ValueError(f"--ppl-window must be at least 2 tokens, got {args.ppl_window}")
    if args.report and not args.report.endswith(".md"):
        raise ValueError(f"--report {args.report}: give a .md path (the PNG is written beside it)")
    if args.uptrain:
        uptrain_config(args)  # validates the numbers (UptrainConfig.__post_init__)


def uptrain_config(args):
    from qkv.tools.uptrain import UptrainConfig

    return UptrainConfig(tokens=args.uptrain_tokens, checkpoints=args.checkpoints, lr=args.uptrain_lr,
                         schedule=args.uptrain_schedule, batch=args.uptrain_batch, seq_len=args.uptrain_seq_len,
                         grad_checkpointing=args.grad_checkpointing, params=args.uptrain_params,
                         compile=args.uptrain_compile, seed=args.seed, device=args.device)


def run(args, dst: Path) -> ModelConfig:
    """Load SRC, pool, optionally uptrain and report, write DST (checked by the caller; emptied
    here only once the model is ready to be written, so a refusal or a failed run keeps it)."""
    from qkv.loading import load
    from qkv.tools import uptrain as up
    from qkv.tools.convert import pool_kv_heads, prepare_dst, save_hf, source_generation
    from qkv.tools.perplexity import default_corpus, perplexity

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    src = load(args.src)
    config, weights = pool_kv_heads(src.config, src.weights, args.kv_heads)
    tok = src.tokenizer
    if tok is None:
        raise ValueError(f"{args.src} has no tokenizer: --uptrain and --report need one to tokenize text")
    corpus = Path(args.ppl_text).read_text(encoding="utf-8") if args.ppl_text else default_corpus()
    ppl_ids = tok.encode(corpus, add_special_tokens=False)
    device = up.pick_device(args.device)

    def evaluate(fn) -> float:
        return perplexity(fn, ppl_ids, args.ppl_window, args.ppl_max_tokens or None).perplexity

    teacher = up.hf_model(src.config, src.weights, device)
    ppl_before = evaluate(up.logits_fn(teacher, device))
    del teacher
    log(f"perplexity before conversion: {ppl_before:.4f}")
    curve, tps, train_text = [], 0.0, ""
    if args.uptrain:
        cfg = uptrain_config(args)
        def encode_batch(texts: list[str]) -> list[list[int]]:  # the tokenizers backend runs them in parallel
            return [e.ids for e in tok.backend.encode_batch(texts, add_special_tokens=False)]

        if args.uptrain_text:
            texts = iter([Path(args.uptrain_text).read_text(encoding="utf-8")])
            train_text = args.uptrain_text
        else:
            texts = up.training_texts(up.heldout_lines(corpus))
            train_text = ("Python sources (the stdlib, then site-packages), pydoc_data and lines of the "
                          "perplexity text removed")
        train_ids = up.training_ids(encode_batch, cfg.tokens, texts)
        train_text += f"; {len(train_ids):,} tokens read"
        result = up.uptrain(src.config, src.weights, config, weights, train_ids, cfg, evaluate, log)
        weights, curve, tps = result.weights, result.curve, result.tokens_per_second
        ppl_pooled = curve[0].perplexity
    else:
        ppl_pooled = evaluate(up.logits_fn(up.hf_model(config, weights, device), device))
    generation = source_generation(args.src)
    save_hf(prepare_dst(dst, args.force), config, weights, tok, args.dtype, generation)
    if args.report:
        from qkv.tools import uptrain_report as rep

        what = (f"{args.ppl_text or 'pydoc_data.topics'}, first {args.ppl_max_tokens:,} tokens in windows of "
                f"{args.ppl_window}, fp32")
        r = rep.ConversionReport(args.src, str(dst), src.config, config, ppl_before, ppl_pooled, what, curve,
                                 command=command_line(args),
                                 device=str(device) + (f" ({_device_name(device)})" if device.type == "cuda" else ""),
                                 tokens_per_second=tps, train_text=train_text)
        md, png = rep.write(r, args.report)
        log(f"wrote {md}" + (f" and {png}" if png else ""))
    return config


def command_line(args) -> str:
    """The command, rebuilt from the parsed arguments (non-default options only)."""
    argv = ["qkv", "convert", args.src, args.dst, "--kv-heads", str(args.kv_heads)]
    argv += ["--dtype", args.dtype] if args.dtype != "float32" else []
    argv += ["--force"] if args.force else []
    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    for action in defaults._actions:
        v = getattr(args, action.dest, None)
        if not action.option_strings or action.dest == "help" or v == action.default:
            continue
        argv += [action.option_strings[0]] + ([] if v is True else [str(v)])
    return shlex.join(argv)


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device)
