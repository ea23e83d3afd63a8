"""The ahead-of-time compiled CPU decode step (qkv/engine/cpu_aoti.py) against the eager model,
its oracle: a package built for a tiny int4 Llama (float32 activations) is loaded by a new LLM and gives the same
greedy tokens and log-probabilities; a damaged package or a changed model file is not used
(one line on stderr for the first, silence for the second) and the engine runs eagerly."""

from __future__ import annotations

import os

import pytest

from qkv import LLM
from qkv.engine import cpu_aoti
from test_cpu_compile import _run as run_greedy  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.compiles]


def _run(llm, prompts):
    return run_greedy(llm, prompts, max_tokens=12)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(model dir, package path): a tiny Llama (int4 layers, float32 activations: bf16 ones round
    differently where inductor fuses, ~4e-3 in log-probability) and its package,
    built once for the module (the compile is the test's cost: ~20 s on 2 cores)."""
    why = cpu_aoti.torch_unsupported()
    if why is not None:  # (refused by name: test_an_older_torch_is_refused_by_name)
        pytest.skip(why)
    import torch

    from tests.conftest import tiny_config

    root = tmp_path_factory.mktemp("aoti")
    os.environ["QKV_CACHE_DIR"] = str(root / "cache")
    cfg, cls = tiny_config("llama", hidden_size=128, intermediate_size=256)
    torch.manual_seed(0)
    cls(cfg).eval().save_pretrained(root / "llama")
    llm = LLM(str(root / "llama"), device="cpu", quantization="int4", dtype="float32", num_kv_blocks=32, log_stats=False)
    assert llm.engine.runner.compiled is None  # nothing built yet: eager
    path = cpu_aoti.build(llm)
    yield str(root / "llama"), path
    del os.environ["QKV_CACHE_DIR"]


def test_aot_step_matches_the_eager_model(built):
    path, package = built
    eager = LLM(path, device="cpu", quantization="int4", dtype="float32", num_kv_blocks=32, aot_decode=False)
    aot = LLM(path, device="cpu", quantization="int4", dtype="float32", num_kv_blocks=32)
    assert isinstance(aot.engine.runner.compiled, cpu_aoti.AOTDecode)
    prompts = [[5, 9, 33, 2, 71], [8, 1, 4], [100, 3, 7, 7, 9, 12, 50, 6, 11]]
    for batch in (prompts[:1], prompts[2:], prompts):  # one sequence each (the package), then 3 (eager)
        (tok_e, lp_e), (tok_a, lp_a) = _run(eager, batch), _run(aot, batch)
        assert tok_a == tok_e
        for a, b in zip(lp_a, lp_e):
            assert a == pytest.approx(b, abs=1e-4)


def test_a_damaged_package_is_refused_in_one_line(built, tmp_path, capsys):
    path, package = built
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(package.read_bytes()[:1000])
    llm = LLM(path, device="cpu", quantization="int4", dtype="float32", num_kv_blocks=32, log_stats=False)
    capsys.readouterr()
    assert cpu_aoti.load(llm, bad) is None
    err = capsys.readouterr().err
    assert "not used" in err and "running eagerly" in err and err.count("\n") == 1


def test_a_changed_model_file_or_setting_has_another_key(built):
    path, package = built
    llm = LLM(path, device="cpu", quantization="int4", dtype="float32", num_kv_blocks=32, log_stats=False)
    assert cpu_aoti.package_path(llm) == package
    assert cpu_aoti.package_path(LLM(path, device="cpu", quantization="none", log_stats=False)) != package
    weights = os.path.join(path, "model.safetensors")
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    try:
        llm = LLM(path, device="cpu", quantization="int4", dtype="float32", num_kv_blocks=32, log_stats=False)
        assert cpu_aoti.package_path(llm) != package and llm.engine.runner.compiled is None
    finally:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_step_that_fails_falls_back_to_eager_for_good(built, capsys):
    path, _ = built
    eager = LLM(path, device="cpu", quantization="int4", dtype="float32", num_kv_blocks=32, aot_decode=False)
    want = _run(eager, [[5, 9, 33, 2, 71]])

    class Broken:
        def boxed_run(self, args):
            raise RuntimeError("shape mismatch\nmore detail")

    llm = LLM(path, device="cpu", quantization="int4", dtype="float32", num_kv_blocks=32, aot_decode=False,
              log_stats=False)
    llm.engine.runner.compiled = step = cpu_aoti.AOTDecode(Broken(), llm.engine.model, cpu_aoti._caches(llm.engine.model))
    capsys.readouterr()
    assert _run(llm, [[5, 9, 33, 2, 71]]) == want
    assert step.loader is None
    assert capsys.readouterr().err.count("compiled decode step failed (shape mismatch)") == 1


def test_a_rebuild_deletes_the_stale_packages_of_the_same_settings_only(tmp_path):
    for stem, text in [("old", '{"settings": "m|int4", "constants": {}}'), ("new", '{"settings": "m|int4"}'),
                       ("other", '{"settings": "m|int8", "constants": {}}'), ("foreign", "not json")]:
        (tmp_path / f"{stem}.json").write_text(text)
        (tmp_path / f"{stem}.pt2").write_bytes(b"x")
    cpu_aoti._prune(tmp_path, "new", "m|int4")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["foreign.json", "foreign.pt2", "new.json", "new.pt2",
                                                          "other.json", "other.pt2"]


def test_an_older_torch_is_refused_by_name(tiny_model, monkeypatch, capsys):
    """torch below ``MIN_TORCH`` (2.11's package loader segfaulted, H200 machine): no package is
    built or opened, the reason is one line, and the engine decodes eagerly."""
    assert cpu_aoti.torch_unsupported("2.13.0+cpu") is None and cpu_aoti.torch_unsupported("2.14.1") is None
    why = cpu_aoti.torch_unsupported("2.11.0+cu130")
    assert why is not None and "torch >= 2.13" in why and "2.11.0+cu130" in why
    assert cpu_aoti.torch_unsupported("nightly") is not None  # unreadable: unverified
    monkeypatch.setattr(cpu_aoti.torch, "__version__", "2.11.0+cu130")
    path, _ = tiny_model("llama")
    llm = LLM(path, device="cpu", quantization="int4", dtype="float32", num_kv_blocks=32)
    assert llm.engine.runner.compiled is None
    assert "decode steps run eagerly: the compiled CPU decode step needs torch >= 2.13" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"needs torch >= 2\.13 \(this is torch 2\.11\.0\+cu130\)"):
        cpu_aoti.build(llm)
    assert len(_run(llm, [[5, 6, 7]])[0][0]) == 12  # and it answers
