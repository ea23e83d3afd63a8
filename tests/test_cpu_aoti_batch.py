"""The compiled batched CPU decode step (engine/cpu_aoti.py's second package: 2 to MAX_BATCH
sequences, the few-row int4 products as ``qkv::int4_rows`` and, on bf16 pages, the attention as
``qkv::decode_attn``) against the eager model, its oracle: a tiny int4 Llama's greedy tokens and
log-probabilities, every step of several sequences through the package; a package that fails
at run time leaves batched steps to the eager model for good."""

from __future__ import annotations

import os

import pytest

from qkv import LLM
from qkv.engine import cpu_aoti
from test_cpu_compile import _run as run_greedy  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.compiles]

PROMPTS = [[5, 9, 33, 2, 71], [8, 1, 4], [100, 3, 7, 7, 9, 12, 50, 6, 11], [40, 41]]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """dtype -> the model dir, with its batched package built (a tiny Llama, int4 layers whose
    widths the few-row kernel takes; float32 activations: the package's products and
    attention's mask path, within 1e-4 of eager; bf16: the C attention operator too)."""
    why = cpu_aoti.torch_unsupported()
    if why is not None:  # (refused by name: test_an_older_torch_is_refused_by_name)
        pytest.skip(why)
    import torch

    from tests.conftest import tiny_config

    root = tmp_path_factory.mktemp("aoti_batch")
    os.environ["QKV_CACHE_DIR"] = str(root / "cache")
    cfg, cls = tiny_config("llama", hidden_size=128, intermediate_size=256)
    torch.manual_seed(0)
    cls(cfg).eval().save_pretrained(root / "llama")
    out = {}
    for dtype in ("float32", "bfloat16"):
        llm = LLM(str(root / "llama"), device="cpu", quantization="int4", dtype=dtype, num_kv_blocks=32,
                  log_stats=False)
        out[dtype] = (str(root / "llama"), cpu_aoti.build(llm, batched=True))
    yield out
    del os.environ["QKV_CACHE_DIR"]


def _counting(llm):
    """The engine's batched package, its calls counted."""
    step = llm.engine.runner.compiled
    assert isinstance(step, cpu_aoti.AOTDecode) and step.batched is not None

    class Counted:
        calls = 0

        def boxed_run(self, args):
            Counted.calls += 1
            return real.boxed_run(args)

    real, step.batched = step.batched, Counted()
    return Counted


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 2e-2)])
def test_batched_steps_match_the_eager_model(built, dtype, tol):
    path, package = built[dtype]
    assert package.name.endswith(cpu_aoti.BATCH_SUFFIX + ".pt2")
    kw = dict(device="cpu", quantization="int4", dtype=dtype, num_kv_blocks=32)
    eager, aot = LLM(path, aot_decode=False, **kw), LLM(path, **kw)
    counted = _counting(aot)
    (tok_e, lp_e), (tok_a, lp_a) = run_greedy(eager, PROMPTS, max_tokens=12), run_greedy(aot, PROMPTS, max_tokens=12)
    assert counted.calls >= 11  # every decode step ran 4 sequences through the package
    assert tok_a == tok_e
    for a, b in zip(lp_a, lp_e):
        assert a == pytest.approx(b, abs=tol)


def test_a_failing_batched_step_falls_back_to_eager_for_good(built, capsys):
    path, _ = built["float32"]
    kw = dict(device="cpu", quantization="int4", dtype="float32", num_kv_blocks=32)
    want = run_greedy(LLM(path, aot_decode=False, **kw), PROMPTS[:2])

    class Broken:
        def boxed_run(self, args):
            raise RuntimeError("bad input\nmore detail")

    llm = LLM(path, log_stats=False, **kw)
    step = llm.engine.runner.compiled
    step.batched = Broken()
    capsys.readouterr()
    assert run_greedy(llm, PROMPTS[:2]) == want
    assert step.batched is None
    assert capsys.readouterr().err.count("compiled batched decode step failed (bad input)") == 1


def test_qkv_compile_builds_what_is_missing_of_the_two(built, capsys):
    """``qkv compile`` keeps the batched package the fixture built and builds the one-sequence
    one; an LLM then loads both."""
    from qkv.cli import main

    path, package = built["float32"]
    capsys.readouterr()
    assert main(["compile", path, "--quantization", "int4", "--dtype", "float32"]) == 0
    err = capsys.readouterr().err
    assert "compiled decode step built" in err and f"compiled batched decode step already built: {package}" in err
    step = LLM(path, device="cpu", quantization="int4", dtype="float32", num_kv_blocks=32).engine.runner.compiled
    assert step.loader is not None and step.batched is not None
