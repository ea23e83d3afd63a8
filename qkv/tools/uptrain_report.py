"""``qkv convert ... --report out.md``: the conversion's memory gain against its quality cost.

The report (Markdown) holds the KV cache per token and the tokens one GiB holds, before and
after conversion (fp16/bf16 cache, all layers), and perplexity on the held-out corpus before
conversion, after pooling and at every uptraining checkpoint; ``out.png`` beside it (when
matplotlib is installed; ``pip install qkv[plot]``) draws that curve.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qkv.config import ModelConfig


@dataclass
class ConversionReport:
    src: str
    dst: str
    before: ModelConfig
    after: ModelConfig
    ppl_before: float
    ppl_pooled: float
    ppl_text: str  # how perplexity was measured, one line
    curve: list  # uptrain.Checkpoint, the first one (0 tokens) is the pooled model
    command: str = ""
    device: str = ""
    tokens_per_second: float = 0.0
    train_text: str = ""


def kv_bytes_per_token(config: ModelConfig) -> int:
    from qkv.tools.memory import footprint

    return int(footprint(config, 1, bits=16).bytes_per_token)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:,.2f}" if x < 1000 else f"{x:,.0f}"


def render(r: ConversionReport, png_name: str | None) -> str:
    b0, b1 = kv_bytes_per_token(r.before), kv_bytes_per_token(r.after)
    gib = 1 << 30
    lines = [f"# Conversion report: {r.src} -> {r.dst}", ""]
    if r.command:
        lines += [f"Command: `{r.command}`" + (f" (device: {r.device})" if r.device else ""), ""]
    lines += ["| | KV heads | KV bytes per token (16-bit) | tokens per GiB | perplexity |",
              "|---|---|---|---|---|",
              f"| before conversion | {r.before.num_kv_heads} | {b0:,} | {gib // b0:,} | {_fmt(r.ppl_before)} |",
              f"| after pooling | {r.after.num_kv_heads} | {b1:,} | {gib // b1:,} | {_fmt(r.ppl_pooled)} |"]
    if len(r.curve) > 1:
        lines.append(f"| after uptraining | {r.after.num_kv_heads} | {b1:,} | {gib // b1:,} "
                     f"| {_fmt(r.curve[-1].perplexity)} |")
    lines += ["", f"Perplexity: {r.ppl_text}.", ""]
    if len(r.curve) > 1:
        lines += [f"Uptraining (distillation from the original model; text: {r.train_text}), "
                  f"{r.tokens_per_second:,.0f} training tokens/s:", "",
                  "| uptraining tokens | step | train KL (nats/token) | perplexity | vs original | training seconds |",
                  "|---|---|---|---|---|---|"]
        for c in r.curve:
            rel = "-" if c.perplexity is None else f"{c.perplexity / r.ppl_before - 1:+.1%}"
            kl = "-" if c.train_kl is None else f"{c.train_kl:.4f}"
            lines.append(f"| {c.tokens:,} | {c.step} | {kl} | {_fmt(c.perplexity)} | {rel} | {c.seconds:.1f} |")
        lines.append("")
    if png_name:
        lines += [f"![perplexity against uptraining tokens]({png_name})", ""]
    return "\n".join(lines)


def plot(r: ConversionReport, path: Path) -> None:
    """Perplexity against uptraining tokens (log y), the original's as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    pts = [(c.tokens, c.perplexity) for c in r.curve if c.perplexity is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot([t / 1e6 for t, _ in pts], [p for _, p in pts], "o-",
            label=f"{r.after.num_kv_heads} KV heads (pooled, then uptrained)")
    ax.axhline(r.ppl_before, ls="--", color="gray", label=f"original, {r.before.num_kv_heads} KV heads")
    ax.axhline(r.ppl_before * 1.15, ls=":", color="gray", label="original + 15%")
    ax.set_yscale("log")
    ax.set_xlabel("uptraining tokens (millions)")
    ax.set_ylabel("perplexity (held-out)")
    ax.set_title(f"{r.src}: {r.before.num_kv_heads} -> {r.after.num_kv_heads} KV heads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(r: ConversionReport, path: str | Path) -> tuple[Path, Path | None]:
    """Write the Markdown report at ``path`` and, if there is a curve, the PNG beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    png = path.with_suffix(".png") if len(r.curve) > 1 else None
    if png is not None:
        plot(r, png)
    path.write_text(render(r, png.name if png else None), encoding="utf-8")
    return path, png
