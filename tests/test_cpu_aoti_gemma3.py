"""Gemma 3's decode step compiled ahead of time (qkv/engine/cpu_aoti.py) against the eager model,
its oracle: a tiny random Gemma 3 (HF's Gemma3TextConfig: QK norms, (1 + w) sandwich norms, the
embedding scale, GeGLU, a local and a global RoPE table) with one sliding layer of window 8 and one
global layer, prompts and outputs longer than the window, so the package reads the window's keys
from a ring that wraps (prefix caching off) and from a window table (on, the default)."""

from __future__ import annotations

import os

import pytest
import torch

from qkv import LLM
from qkv.engine import cpu_aoti
from test_cpu_compile import _run as run_greedy  # noqa: E402
from test_gemma3 import WINDOW, tiny_gemma3  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.compiles]

# int8 layers as the real 270M's (its Q5_0 tensors), float32 activations; blocks of 4 tokens, so
# the window's ring is 3 blocks and wraps every 12 tokens.
ENGINE = dict(device="cpu", quantization="int8", dtype="float32", block_size=4, num_kv_blocks=64, log_stats=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(model dir, package path), built once for the module (the compile is the test's cost)."""
    why = cpu_aoti.torch_unsupported()
    if why is not None:  # (refused by name: test_an_older_torch_is_refused_by_name)
        pytest.skip(why)
    root = tmp_path_factory.mktemp("aoti-gemma3")
    os.environ["QKV_CACHE_DIR"] = str(root / "cache")
    path, _ = tiny_gemma3(root, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    llm = LLM(path, **ENGINE)
    assert llm.engine.runner.compiled is None  # nothing built yet: eager
    yield path, cpu_aoti.build(llm)
    del os.environ["QKV_CACHE_DIR"]


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["ring", "window-table"])
def test_gemma3_aot_step_matches_the_eager_model(built, prefix_caching):
    path, _ = built
    eager = LLM(path, aot_decode=False, enable_prefix_caching=prefix_caching, **ENGINE)
    aot = LLM(path, enable_prefix_caching=prefix_caching, **ENGINE)
    step = aot.engine.runner.compiled
    assert isinstance(step, cpu_aoti.AOTDecode)
    step.loader = counted = Counted(step.loader)
    g = torch.Generator().manual_seed(1)
    # Shorter than the window, then past it (the window's first gathered key hidden), then with a
    # batch of three (eager: the package is one sequence's).
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (3, 3 * WINDOW, WINDOW + 1)]
    for batch in (prompts[:1], prompts[1:2], prompts):
        (tok_e, lp_e), (tok_a, lp_a) = run_greedy(eager, batch, 2 * WINDOW), run_greedy(aot, batch, 2 * WINDOW)
        assert tok_a == tok_e
        for a, b in zip(lp_a, lp_e):
            assert a == pytest.approx(b, abs=1e-4)
    # Every one-sequence step but the first of each request ran the package (a first step from a
    # one-token prompt would have one key, below the package's two): none failed over to eager.
    assert step.loader is counted and counted.calls == 2 * (2 * WINDOW - 1)


class Counted:
    """The package's loader, counting its runs."""

    def __init__(self, loader):
        self.loader, self.calls = loader, 0

    def boxed_run(self, args):
        self.calls += 1
        return self.loader.boxed_run(args)
