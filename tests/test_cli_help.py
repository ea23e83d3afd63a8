"""``qkv --help`` and every subcommand's help: a description for each command and benchmark,
the default of every option, and no internal docstrings."""

from __future__ import annotations

import argparse

import pytest

from qkv import cli


def _parser_help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


COMMANDS = list(cli.COMMANDS)
BENCHMARKS = ["latency", "throughput", "prefix", "serve", "transcribe"]


def test_top_level_help_describes_every_command(capsys):
    out = _parser_help([], capsys)
    assert "registered in COMMANDS" not in out and "``" not in out
    for name, (_, help_) in cli.COMMANDS.items():
        assert name in out and help_.split(";")[0] in " ".join(out.split())


def test_bench_help_describes_every_benchmark(capsys):
    out = " ".join(_parser_help(["bench"], capsys).split())
    from qkv.tools.bench import SUBCOMMANDS

    assert list(SUBCOMMANDS) == BENCHMARKS
    for name, help_ in SUBCOMMANDS.items():
        assert f"{name} {help_}" in out


@pytest.mark.parametrize("argv", [[c] for c in COMMANDS if c != "bench"] + [["bench", b] for b in BENCHMARKS],
                         ids=" ".join)
def test_every_option_shows_its_default(argv, capsys):
    out = " ".join(_parser_help(argv, capsys).split())
    parser = argparse.ArgumentParser(prog="qkv")
    # Rebuild the same parser to list its actions (main() exits on --help).
    sub = parser.add_subparsers(dest="command")
    module, _ = cli.COMMANDS[argv[0]]
    p = sub.add_parser(argv[0])
    if module == "qkv.cli":
        cli.add_arguments(p, argv[0])
    else:
        __import__(module, fromlist=["add_arguments"]).add_arguments(p)
    if len(argv) == 2:
        p = _subparsers(p)[argv[1]]
    missing = []
    for a in p._actions:
        if not a.option_strings or a.default in (None, False, argparse.SUPPRESS) or a.help == argparse.SUPPRESS:
            continue
        said = a.help and "default" in a.help  # the help text states it in words
        if not said and f"default: {a.default}" not in out:
            missing.append((a.option_strings[0], a.default))
    assert not missing, f"qkv {' '.join(argv)} --help does not show these defaults: {missing}"


@pytest.mark.slow
def test_generate_says_when_it_used_plain_text_and_why_it_stopped(capsys):
    """The gemma3-270m GGUF has no chat template: generate says it sent plain text (it used
    to drop the template silently), and that the answer stopped at --max-tokens."""
    assert cli.main(["generate", "The capital of France is", "--model", "gemma3-270m", "--device", "cpu",
                     "--max-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert "gemma3-270m has no chat template: the prompt is sent as plain text" in err
    assert "[qkv] stopped after 3 tokens at --max-tokens 3, not at the end of the answer" in err


def test_bench_checks_its_peer_before_measuring(capsys, monkeypatch, tmp_path):
    """The peer is checked before qkv's half runs (it used to fail after 17 s of measuring)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    missing = str(tmp_path / "missing.gguf")  # would be a load error if the model were loaded first
    assert cli.main(["bench", "latency", "--model", missing, "--device", "cpu", "--peer", "llamacpp"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("qkv: error: --peer llamacpp needs llama_cpp, which is not installed: "
                           "pip install llama-cpp-python")
    assert cli.main(["bench", "throughput", "--model", missing, "--device", "cpu", "--peer", "hf"]) == 2
    assert "missing.gguf" in capsys.readouterr().err  # hf is installed: on to the load, which fails
