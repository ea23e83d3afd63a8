"""``max_num_batched_tokens`` defaults to "auto": 8192 tokens a step on a CUDA device of at
least 70 GiB, 2048 on a smaller one and on the CPU (qkv/engine/budget.py). The device's memory
is faked here, so the rule is checked without a GPU."""

from __future__ import annotations

import argparse

import pytest
import torch

from qkv.engine import budget

pytestmark = pytest.mark.usefixtures("one_thread")
GiB = 1 << 30


@pytest.mark.parametrize("memory, tokens", [(143 * GiB, 8192), (80 * GiB, 8192), (70 * GiB, 8192),
                                            (70 * GiB - 1, 2048), (40 * GiB, 2048), (24 * GiB, 2048)])
@pytest.mark.parametrize("value", ["auto", None])
def test_auto_follows_the_cuda_device_memory(monkeypatch, memory, tokens, value):
    seen = []
    monkeypatch.setattr(budget, "device_memory", lambda dev: seen.append(dev) or memory)
    got, why = budget.resolve(value, torch.device("cuda:0"))
    assert got == tokens and seen == [torch.device("cuda:0")]
    assert why.startswith("auto") and f"{memory / GiB:.1f} GiB" in why


def test_auto_on_the_cpu_is_2048_and_asks_no_gpu(monkeypatch):
    monkeypatch.setattr(budget, "device_memory", lambda dev: pytest.fail("the CPU has no device memory to read"))
    assert budget.resolve("auto", "cpu") == (2048, "auto: 2048 on the cpu")
    assert budget.resolve(None, torch.device("cpu"))[0] == 2048


@pytest.mark.parametrize("value, tokens", [(1, 1), (512, 512), (8192, 8192), (100000, 100000), ("4096", 4096)])
def test_explicit_values_are_kept_on_any_device(monkeypatch, value, tokens):
    monkeypatch.setattr(budget, "device_memory", lambda dev: 143 * GiB)
    assert budget.resolve(value, "cuda") == (tokens, "as given")
    assert budget.resolve(value, "cpu") == (tokens, "as given")


@pytest.mark.parametrize("value", [0, -8, 2.5, True, "lots", "8k", "", [2048]])
def test_invalid_values_are_refused_by_name(value):
    with pytest.raises(ValueError, match="max_num_batched_tokens must be a positive whole number"):
        budget.resolve(value, "cpu")


def test_the_cli_defaults_to_auto_and_refuses_by_flag(capsys):
    from qkv.cli import add_model_arguments, engine_kwargs

    p = argparse.ArgumentParser()
    add_model_arguments(p)
    assert p.parse_args([]).max_num_batched_tokens == "auto"
    assert engine_kwargs(p.parse_args([]))["max_num_batched_tokens"] == "auto"
    assert p.parse_args(["--max-num-batched-tokens", "8192"]).max_num_batched_tokens == 8192
    assert p.parse_args(["--max-num-batched-tokens", "auto"]).max_num_batched_tokens == "auto"
    for bad in ("0", "lots", "-5"):
        with pytest.raises(SystemExit):
            p.parse_args(["--max-num-batched-tokens", bad])
        assert (f"argument --max-num-batched-tokens: not a positive whole number of tokens or 'auto': '{bad}'"
                in capsys.readouterr().err)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import tiny_config

    cfg, cls = tiny_config("llama")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("budget") / "llama"
    cls(cfg).eval().save_pretrained(path)
    return str(path)


def test_an_engine_picks_prints_and_keeps_its_budget(tiny, capfd):
    """LLM(max_num_batched_tokens=None) means auto (2048 on the CPU) and start-up says so; an
    explicit value reaches the scheduler as given; an invalid one is refused by name."""
    from qkv import LLM

    for value, tokens, why in ((None, 2048, "auto: 2048 on the cpu"), ("auto", 2048, "auto: 2048 on the cpu"),
                               (24, 24, "as given")):
        llm = LLM(tiny, dtype="float32", device="cpu", num_kv_blocks=64, max_num_batched_tokens=value)
        assert llm.engine.scheduler.max_num_batched_tokens == tokens
        assert f"[qkv] max_num_batched_tokens {tokens} ({why})" in capfd.readouterr().err
    for bad in (0, "lots", 2.5):
        with pytest.raises(ValueError, match="max_num_batched_tokens"):
            LLM(tiny, dtype="float32", device="cpu", num_kv_blocks=64, max_num_batched_tokens=bad)


@pytest.mark.parametrize("argv, tokens", [([], 2048), (["--window", "4000"], 4001),
                                          (["--max-num-batched-tokens", "100"], 100),
                                          (["--max-num-batched-tokens", "9000"], 9000)])
def test_perplexity_budget_holds_a_window_under_auto(monkeypatch, argv, tokens):
    """``qkv perplexity`` scores one window per step under ``auto``: its budget is the resolved
    one (2048 on the CPU) or the window plus one, whichever is larger; a given budget is honoured
    (a window is then scored in chunks, tests/test_api_audit.py)."""
    import qkv
    from qkv.tools import perplexity

    p = argparse.ArgumentParser()
    perplexity.add_arguments(p)
    seen = {}

    class Built(Exception):
        pass

    def fake_llm(model, **kw):
        seen.update(kw)
        raise Built

    monkeypatch.setattr(qkv, "LLM", fake_llm)
    with pytest.raises(Built):
        perplexity.run(p.parse_args(["smollm2", "--device", "cpu", *argv]))
    assert seen["max_num_batched_tokens"] == tokens
