"""The CLI turns user errors into one line, ``qkv: error: ...`` with exit code 2 and the fix,
checked before the (slow) model load; no traceback."""

from __future__ import annotations

import sys

import pytest
import torch

from qkv.cli import main


def _run(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()  # drop what fixtures printed
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def test_invalid_device_name_is_refused_before_loading(capsys, tmp_path):
    missing = str(tmp_path / "missing.gguf")  # the device is checked first, so no load error
    code, err = _run(capsys, "generate", "hi", "--model", missing, "--device", "gpu")
    assert code == 2 and err.strip() == ("qkv: error: --device 'gpu' is not a device name; "
                                         "use cpu or cuda (cuda:N for one GPU)")
    code, err = _run(capsys, "generate", "hi", "--model", missing, "--device", "mps")
    assert code == 2 and "--device 'mps' is not supported" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused_before_loading(capsys, tmp_path):
    code, err = _run(capsys, "chat", "--model", str(tmp_path / "missing.gguf"), "--device", "cuda")
    assert code == 2 and err.startswith("qkv: error: --device cuda: ") and "use --device cpu" in err


def test_load_error_is_one_line(capsys, tmp_path):
    code, err = _run(capsys, "generate", "hi", "--model", str(tmp_path / "missing.gguf"), "--device", "cpu")
    assert code == 2 and err.startswith("qkv: error: ") and "no such file" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_bad_sampling_value_is_one_line(capsys, tiny_model):
    path, _ = tiny_model("llama")
    code, err = _run(capsys, "generate", "hi", "--model", path, "--device", "cpu", "--temperature", "nan")
    # The engine's start-up line ([qkv] KV cache: ...) comes first; the error is one line, no traceback.
    assert code == 2 and err.strip().splitlines()[-1] == "qkv: error: temperature must be finite, got nan"
    assert "Traceback" not in err


def test_missing_serve_extra_names_the_fix(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed: import raises
    code, err = _run(capsys, "serve", "--model", str(tmp_path / "missing.gguf"))
    assert code == 2
    assert err.strip() == "qkv: error: qkv serve needs uvicorn, which is not installed: pip install 'qkv[serve]'"


def test_missing_plot_extra_names_the_fix(capsys, monkeypatch, tiny_model, tmp_path):
    path, _ = tiny_model("llama")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, err = _run(capsys, "memory", path, "--plot", str(tmp_path / "kv.png"))
    assert code == 2 and "pip install 'qkv[plot]'" in err


def test_bench_passes_must_be_positive(capsys, tmp_path):
    code, err = _run(capsys, "bench", "throughput", "--model", str(tmp_path / "m.gguf"), "--passes", "0")
    assert code == 2 and err.strip() == "qkv: error: --passes must be >= 1, got 0"
