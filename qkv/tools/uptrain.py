"""Uptraining after K/V-head pooling: the converted model learns the original model's outputs.

``qkv convert SRC DST --kv-heads G --uptrain --uptrain-tokens N`` runs :func:`uptrain` on the
pooled weights. The training signal is distillation: on each training window the student (the
pooled model) is pulled towards the teacher's (the unconverted model's) next-token
distribution, ``KL(teacher || student)`` averaged over positions. Why distillation and not
plain next-token loss: the goal is to get back the model we started from, not a model of the
training text, and the teacher's full distribution carries far more signal per token than
the one observed token (Ainslie et al. continue pre-training on the original data, which we
do not have).

Training text (:func:`training_ids`): the Python sources on the machine, CPython's own standard
library first (``*.py`` under ``sysconfig``'s stdlib path, sorted), then the installed packages'
(``site-packages``), which works offline on any machine: every Python ships its stdlib, and a
machine that runs qkv has torch, tokenizers and their kin installed. The stdlib alone is small
(2.9M tokens for SmolLM2 where Debian ships it without ``test/``), and a budget of tens of
millions of tokens would go over it again and again. The perplexity corpus
(``pydoc_data.topics``, see ``qkv.tools.perplexity``) is held out: its directory is skipped,
and any training line that also occurs in it (40+ characters, stripped) is dropped.

The model trained is transformers' own class for the family (``hf_model``), built from the
``config.json`` that ``convert`` writes and the HF-named weights; plain torch around it:
AdamW, bf16 autocast on CUDA (fp32 master weights), fp32 on the CPU, linear warm-up then
cosine or linear decay, gradient checkpointing on request.
"""

from __future__ import annotations

import math
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from qkv.config import ModelConfig


# Which parameters train. "attention" leaves embeddings, norms and MLPs as the teacher's: the
# pooling changed only K/V, and the training text (code) is narrower than what the model saw.
TRAINABLE = ("all", "attention")
ATTENTION_PARAMS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class UptrainConfig:
    """What to train for. ``tokens`` is the budget of training positions (steps x batch x
    seq_len, rounded up to whole steps); perplexity is measured every ``tokens / checkpoints``."""
    tokens: int
    checkpoints: int = 8
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    warmup: float = 0.05  # fraction of steps with a linear warm-up
    schedule: str = "cosine"  # cosine | linear
    batch: int = 32  # sequences per step
    seq_len: int = 512
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    grad_checkpointing: bool = False
    params: str = "all"  # all | attention (the q/k/v/o projections only; the rest stays the teacher's)
    compile: bool = False  # torch.compile the teacher's and the student's forward (CUDA)
    seed: int = 0
    device: str | None = None  # None: cuda when available

    def __post_init__(self) -> None:
        if self.params not in TRAINABLE:
            raise ValueError(f"--uptrain-params must be one of {', '.join(TRAINABLE)}, not {self.params!r}")
        if self.schedule not in ("cosine", "linear"):
            raise ValueError(f"--uptrain-schedule must be cosine or linear, not {self.schedule!r}")
        for name, flag in (("batch", "--uptrain-batch"), ("checkpoints", "--checkpoints")):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"--uptrain-seq-len must be at least 2, got {self.seq_len}")
        if self.tokens < self.batch * self.seq_len:
            raise ValueError(f"--uptrain-tokens {self.tokens:,} is less than one step "
                             f"(--uptrain-batch {self.batch} x --uptrain-seq-len {self.seq_len})")
        if not 0 < self.lr < math.inf:  # inf passed "> 0" and trained the student into NaNs
            raise ValueError(f"--uptrain-lr must be positive and finite, got {self.lr}")

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / (self.batch * self.seq_len))


@dataclass
class Checkpoint:
    tokens: int  # training positions seen so far
    step: int
    perplexity: float | None  # on the held-out corpus; None when no eval function was given
    train_kl: float | None  # mean KL over the steps since the last checkpoint
    seconds: float  # training time so far (evaluation excluded)


@dataclass
class UptrainResult:
    weights: dict[str, torch.Tensor]  # HF names, fp32, on the CPU
    curve: list[Checkpoint] = field(default_factory=list)
    tokens_per_second: float = 0.0
    device: str = "cpu"


def pick_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def hf_model(config: ModelConfig, weights: dict[str, torch.Tensor], device: torch.device | str = "cpu"):
    """transformers' model for ``config`` (fp32) holding ``weights`` (HF names). Every parameter
    must be given, except a tied ``lm_head``."""
    import transformers as tf

    from qkv.tools.convert import hf_config

    cfg = tf.AutoConfig.for_model(**hf_config(config))
    cfg.use_cache = False
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"weights do not fit the {config.model_type} model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def state_weights(model, names) -> dict[str, torch.Tensor]:
    """The model's tensors named in ``names``, detached fp32 copies on the CPU."""
    sd = model.state_dict()
    return {k: sd[k].detach().float().cpu().clone() for k in names if k in sd}


def logits_fn(model, device: torch.device) -> Callable[[list[int]], torch.Tensor]:
    """``ids -> fp32 [len, vocab]`` from a full-sequence forward in fp32 (no autocast), for
    ``qkv.tools.perplexity.perplexity``."""

    @torch.no_grad()
    def fn(ids: list[int]) -> torch.Tensor:
        was = model.training
        model.eval()
        out = model(torch.tensor([ids], device=device)).logits[0].float().cpu()
        model.train(was)
        return out

    return fn


def stdlib_files() -> list[Path]:
    """CPython's stdlib sources, the perplexity corpus's package excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "pydoc_data"}
    return sorted(f for f in root.rglob("*.py") if not skip & set(f.relative_to(root).parts))


def package_files(max_bytes: int = 1 << 20) -> list[Path]:
    """The installed packages' ``*.py`` (every ``site-packages``/``dist-packages`` on the path),
    sorted, each file once; files over ``max_bytes`` (generated tables, vendored blobs) and any
    ``pydoc_data`` skipped."""
    dirs = {Path(p) for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path)
            if p and Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()}
    seen, files = set(), []
    for root in sorted(dirs):
        for f in sorted(root.rglob("*.py")):
            try:
                real, size = f.resolve(), f.stat().st_size
            except OSError:
                continue
            if real in seen or size > max_bytes or "pydoc_data" in f.relative_to(root).parts:
                continue
            seen.add(real)
            files.append(f)
    return files


def python_files() -> Iterator[Path]:
    """The training text's files, in reading order: the stdlib, then the installed packages."""
    yield from stdlib_files()
    yield from package_files()


def heldout_lines(corpus: str, min_chars: int = 40) -> set[str]:
    return {s for s in (line.strip() for line in corpus.splitlines()) if len(s) >= min_chars}


def training_texts(exclude: set[str], files: Iterable[Path] | None = None) -> Iterator[str]:
    """Each training file's text with the lines found in ``exclude`` removed, file by file
    (default files: :func:`python_files`, read lazily so a small budget reads little)."""
    for f in files if files is not None else python_files():
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        yield "\n".join(line for line in text.splitlines() if line.strip() not in exclude)


def training_ids(encode_batch: Callable[[list[str]], list[list[int]]], n: int, texts: Iterator[str],
                 max_chunk: int = 64) -> list[int]:
    """At least ``min(n, all)`` token ids: the texts tokenized a chunk at a time (a batch
    encoder runs a chunk in parallel; chunks grow 1, 2, 4, ... up to ``max_chunk`` texts, so
    a small ``n`` reads little) and concatenated; stops reading once ``n`` are there."""
    ids: list[int] = []
    batch: list[str] = []
    chunk = 1
    for text in texts:
        batch.append(text)
        if len(batch) == chunk:
            ids += [i for seq in encode_batch(batch) for i in seq]
            batch, chunk = [], min(2 * chunk, max_chunk)
            if len(ids) >= n:
                return ids
    return ids + [i for seq in encode_batch(batch) for i in seq] if batch else ids


def lr_factor(step: int, steps: int, cfg: UptrainConfig) -> float:
    """Linear warm-up over ``warmup * steps`` steps, then cosine or linear decay to ``min_lr_ratio``."""
    warm = max(1, round(cfg.warmup * steps))
    if step < warm:
        return (step + 1) / warm
    p = (step - warm) / max(1, steps - warm)
    decay = 0.5 * (1 + math.cos(math.pi * p)) if cfg.schedule == "cosine" else 1 - p
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def trainable(model, which: str) -> list[torch.nn.Parameter]:
    """The parameters to train (``which``: see ``TRAINABLE``); the others are frozen."""
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(which == "all" or name.rsplit(".", 2)[-2] in ATTENTION_PARAMS)
        if p.requires_grad:
            params.append(p)
    if not params:
        raise ValueError(f"--uptrain-params {which}: the model has no such parameters")
    return params


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student), in fp32."""
    s = F.log_softmax(student_logits.float().flatten(0, -2), dim=-1)
    t = F.log_softmax(teacher_logits.float().flatten(0, -2), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def uptrain(teacher_config: ModelConfig, teacher_weights: dict[str, torch.Tensor],
            student_config: ModelConfig, student_weights: dict[str, torch.Tensor],
            train_ids: list[int], cfg: UptrainConfig,
            evaluate: Callable[[Callable[[list[int]], torch.Tensor]], float] | None = None,
            log: Callable[[str], None] | None = None) -> UptrainResult:
    """Train the student towards the teacher on random ``cfg.seq_len`` windows of ``train_ids``.

    ``evaluate(logits_fn) -> perplexity`` is called before the first step and after every
    ``cfg.steps / cfg.checkpoints`` steps; the returned weights are those after the last step.
    The caller's weight dicts are not modified."""
    if len(train_ids) < cfg.seq_len:
        raise ValueError(f"the training text has {len(train_ids):,} tokens, fewer than one "
                         f"--uptrain-seq-len window ({cfg.seq_len})")
    device = pick_device(cfg.device)
    cuda = device.type == "cuda"
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    teacher = hf_model(teacher_config, teacher_weights, device).eval().requires_grad_(False)
    if cuda:  # autocast would cast the frozen weights to bf16 again at every step
        teacher.to(torch.bfloat16)
    student = hf_model(student_config, student_weights, device).train()
    if cfg.grad_checkpointing:
        student.gradient_checkpointing_enable()
    params = trainable(student, cfg.params)
    t_forward, s_forward = teacher, student
    if cfg.compile:
        t_forward, s_forward = torch.compile(teacher), torch.compile(student)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay,
                            fused=cuda or None)
    data = torch.tensor(train_ids, dtype=torch.long)
    steps = cfg.steps
    every = [round(steps * (i + 1) / cfg.checkpoints) for i in range(cfg.checkpoints)]
    fn = logits_fn(student, device)
    curve = [Checkpoint(0, 0, evaluate(fn) if evaluate else None, None, 0.0)]
    if log:
        n_train = sum(p.numel() for p in params)
        log(f"uptrain: {steps} steps of {cfg.batch} x {cfg.seq_len} tokens on {device}, training "
            f"{cfg.params} ({n_train / 1e6:.1f}M parameters){', compiled' if cfg.compile else ''} "
            f"({len(train_ids):,} training tokens); step 0 perplexity {curve[0].perplexity or float('nan'):.4f}")
    trained, kl_sum, kl_n = 0.0, 0.0, 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    for step in range(steps):
        t0 = time.perf_counter()
        starts = torch.randint(0, len(data) - cfg.seq_len + 1, (cfg.batch,), generator=gen)
        batch = torch.stack([data[s:s + cfg.seq_len] for s in starts.tolist()]).to(device, non_blocking=True)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, steps, cfg)
        with autocast:
            with torch.no_grad():
                t_logits = t_forward(batch).logits
            loss = distill_kl(s_forward(batch).logits, t_logits)
        del t_logits
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        kl_sum, kl_n = kl_sum + loss.detach(), kl_n + 1
        if step + 1 in every:
            kl = (kl_sum / kl_n).item()  # one host sync per checkpoint, not per step
            if cuda:
                torch.cuda.synchronize()
            trained += time.perf_counter() - t0
            ppl = evaluate(fn) if evaluate else None
            curve.append(Checkpoint((step + 1) * cfg.batch * cfg.seq_len, step + 1, ppl, kl, trained))
            kl_sum, kl_n = 0.0, 0
            if log:
                log(f"uptrain: step {step + 1}/{steps}, {curve[-1].tokens:,} tokens, train KL {kl:.4f}, "
                    f"perplexity {ppl or float('nan'):.4f}, {trained:.1f} s training")
        else:
            trained += time.perf_counter() - t0
    names = list(student_weights)
    tps = curve[-1].tokens / trained if trained else 0.0
    return UptrainResult(state_weights(student, names), curve, tps, str(device))
