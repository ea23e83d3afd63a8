"""The roofline's rates come from the device in use, measured once and cached on disk."""

from __future__ import annotations

import argparse
import json

import torch

from qkv.tools import bench_gpu
from qkv.tools.bench_rates import device_key, device_rates


def test_measured_once_then_read_from_the_cache(tmp_path):
    calls = []

    def fake(device):
        calls.append(device)
        return {"copy_Bps": 4.2e12, "matmul_flops": 7.0e14}

    path = tmp_path / "rates.json"
    first = device_rates(torch.device("cpu"), path, fake)
    again = device_rates(torch.device("cpu"), path, fake)
    assert len(calls) == 1 and first["measured"] and not again["measured"]
    assert again["copy_Bps"] == 4.2e12 and again["key"] == device_key(torch.device("cpu"))
    assert json.loads(path.read_text())[again["key"]]["matmul_flops"] == 7.0e14


def test_a_bad_cache_is_measured_again(tmp_path):
    path = tmp_path / "rates.json"
    for text in ("not json", "[1, 2]", json.dumps({device_key(torch.device("cpu")): {"copy_Bps": -1}})):
        path.write_text(text)
        r = device_rates(torch.device("cpu"), path, lambda d: {"copy_Bps": 1e11, "matmul_flops": 1e12})
        assert r["measured"] and r["copy_Bps"] == 1e11


def test_cpu_measurement_is_positive(tmp_path, monkeypatch):
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path))
    r = device_rates(torch.device("cpu"))
    assert r["copy_Bps"] > 0 and r["matmul_flops"] > 0
    assert (tmp_path / "device_rates.json").is_file()


def test_flags_win_over_the_measurement(tmp_path, monkeypatch):
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path))
    args = argparse.Namespace(bandwidth=3.0e12, matmul_flops=None)
    path = tmp_path / "device_rates.json"
    path.write_text(json.dumps({device_key(torch.device("cpu")): {"copy_Bps": 5e11, "matmul_flops": 2e12}}))
    rates = bench_gpu.fill_rates(args, "cpu")
    assert (args.bandwidth, args.matmul_flops) == (3.0e12, 2e12) and rates["measured"] is False
    assert bench_gpu.fill_rates(args, "cpu") is None  # both set now: nothing read
