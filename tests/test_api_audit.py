"""Inputs the offline API and the CLI used to take badly: refused by name (a ValueError, or
``qkv: error: ...`` with exit code 2), before the model loads where they can be, and never
left to fail later as a traceback, to be skipped unsaid, or to break the engine for others."""

from __future__ import annotations

import json

import pytest

from qkv import LLM, SamplingParams
from qkv.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    import torch

    from conftest import tiny_config

    cfg, cls = tiny_config("llama")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("audit") / "llama"
    cls(cfg).eval().save_pretrained(path)
    return str(path)


def _cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_no_leak(llm) -> None:
    s = llm.stats()
    assert s["num_blocks_in_use"] == 0 and s["num_running"] == 0 and s["num_waiting"] == 0, s
    assert s["num_blocks_free"] + s["num_blocks_cached"] == s["num_blocks_total"], s


# ------------------------------------------------------------------ engine arguments
@pytest.mark.parametrize("kw,name", [
    (dict(block_size=0), "block_size"),  # was a TypeError from the pool planning
    (dict(block_size=-1), "block_size"),  # was "the KV cache budget holds no block"
    (dict(block_size=16.0), "block_size"),
    (dict(max_model_len=0), "max_model_len"),  # was the model's context, unsaid
    (dict(max_model_len=-5), "max_model_len"),  # was accepted, and every request refused
    (dict(kv_cache_memory=0), "kv_cache_memory"),  # was 1 GiB, unsaid
    (dict(num_kv_blocks=2.5), "num_kv_blocks"),
    (dict(max_num_seqs=2.5), "max_num_seqs"),
    (dict(threads=0), "threads"),  # was skipped unsaid
    (dict(threads=-1), "threads"),  # was torch's RuntimeError (a traceback from the CLI)
])
def test_engine_sizes_are_refused_by_name(tiny_llama, kw, name):
    with pytest.raises(ValueError, match=name):
        LLM(tiny_llama, dtype="float32", device="cpu", log_stats=False, **kw)


def test_threads_are_checked_before_the_load(tmp_path):
    with pytest.raises(ValueError, match="threads must be a positive whole number, got -1"):
        LLM(str(tmp_path / "missing.gguf"), threads=-1)


def test_cli_threads_is_one_line(capsys, tiny_llama):
    code, err = _cli(capsys, "generate", "hi", "--model", tiny_llama, "--raw", "--threads", "-1")
    assert code == 2 and err.strip() == "qkv: error: threads must be a positive whole number, got -1"


# ------------------------------------------------------------------ logprobs past the vocabulary
def test_logprobs_past_the_vocabulary_are_refused_and_break_nothing(tiny_llama):
    """A top-k wider than the vocabulary failed the step of every request in it, and the
    engine stayed broken (the next step raised too)."""
    llm = LLM(tiny_llama, dtype="float32", device="cpu", block_size=4, num_kv_blocks=64, log_stats=False)
    vocab, e = llm.config.vocab_size, llm.engine
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    alone = llm.generate([[5, 6, 7]], greedy)[0].token_ids
    (good,) = e.add_request([5, 6, 7], greedy)
    e.step()
    for name in ("logprobs", "prompt_logprobs"):
        with pytest.raises(ValueError, match=f"{name} \\({vocab + 1}\\) must not exceed the vocabulary size"):
            e.add_request([5, 6, 7], SamplingParams(max_tokens=2, **{name: vocab + 1}))
    got = {}
    while e.has_unfinished():
        for out in e.step():
            got[out.request_id] = out.token_ids
    assert got == {good.request_id: alone}
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, logprobs=vocab, prompt_logprobs=vocab))[0]
    assert [len(d) for d in out.logprobs] == [vocab, vocab]  # the whole vocabulary, the sampled token in it
    assert [len(d) for d in out.prompt_logprobs[1:]] == [vocab, vocab]
    assert_no_leak(llm)


# ------------------------------------------------------------------ chat messages
def real_model(name: str) -> str:
    """The named default's file, or a skip when its package is not installed."""
    from qkv.loading import LoadError
    from qkv.loading.models import resolve

    try:
        return str(resolve(name))
    except LoadError as e:
        pytest.skip(str(e))


def test_chat_content_the_template_cannot_render_is_a_chat_template_error():
    from qkv.loading.chat_template import ChatTemplateError

    # SmolLM2's template joins strings with +: content None (or 5) was a TypeError from inside it.
    llm = LLM(real_model("smollm2"), device="cpu", num_kv_blocks=16, log_stats=False, aot_decode=False)
    for content in (None, 5):
        with pytest.raises(ChatTemplateError, match="cannot render these messages"):
            llm.chat([{"role": "user", "content": content}], SamplingParams(max_tokens=1))
    assert_no_leak(llm)


# ------------------------------------------------------------------ qkv perplexity
def test_perplexity_text_flag_errors_name_the_flag(capsys, tmp_path):
    """All refused before the model loads (the model here does not exist)."""
    model = tmp_path / "m.gguf"
    code, err = _cli(capsys, "perplexity", model, "--text", tmp_path)  # a directory: was IsADirectoryError
    assert code == 2 and err.startswith(f"qkv: error: --text {tmp_path}: cannot read it") and "Traceback" not in err
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    code, err = _cli(capsys, "perplexity", model, "--text", bad)
    assert code == 2
    assert err.strip() == f"qkv: error: --text {bad}: not UTF-8 text (invalid continuation byte at byte 3)"
    code, err = _cli(capsys, "perplexity", model, "--text", bad, "--max-tokens", "-1")  # was ids[:-1], unsaid
    assert code == 2 and err.strip() == "qkv: error: --max-tokens must be at least 0 (0: all), got -1"


def test_perplexity_too_few_tokens_says_max_tokens_cut_them():
    from qkv.tools.perplexity import perplexity

    with pytest.raises(ValueError, match=r"^1 of the text's 5 tokens are too few to score"):
        perplexity(lambda ids: None, [1, 2, 3, 4, 5], window=4, max_tokens=1)


# ------------------------------------------------------------------ qkv bench
@pytest.mark.parametrize("argv,line", [
    (["latency", "--max-tokens", "1"], "--max-tokens must be >= 2, got 1"),  # was a ZeroDivisionError
    (["latency", "--repeat", "0"], "--repeat must be >= 1, got 0"),  # was "max() arg is an empty sequence"
    (["latency", "--prompt-len", "0"], "--prompt-len must be >= 1, got 0"),  # was a 512-token prompt, unsaid
    (["latency", "--bandwidth", "-1"], "--bandwidth must be positive, got -1.0"),
    (["prefix", "--num-requests", "0"], "--num-requests must be >= 1, got 0"),  # was "min() arg is an empty..."
    (["prefix", "--system-tokens", "0"], "--system-tokens must be >= 1, got 0"),
    (["prefix", "--no-prefix-caching"],  # it runs both modes: was dropped unsaid
     "--no-prefix-caching: bench prefix times the prefix cache on and off; drop it"),
    (["latency", "--device", "cpu", "--bandwidth", "1e11"],  # the roofline's rates: dropped unsaid off CUDA
     "--bandwidth: only bench latency on CUDA draws a roofline (this is bench latency on cpu)"),
    (["throughput", "--device", "cpu", "--bandwidth", "1e11", "--matmul-flops", "1e12"],
     "--bandwidth, --matmul-flops: only bench latency on CUDA draws a roofline (this is bench throughput on cpu)"),
])
def test_bench_counts_are_refused_before_the_load(capsys, tmp_path, argv, line):
    code, err = _cli(capsys, "bench", *argv, "--model", tmp_path / "m.gguf")
    assert code == 2 and err.strip() == f"qkv: error: {line}"


@pytest.mark.parametrize("value", ["a:b", "8:4", "0"])
def test_bench_length_ranges_name_the_flag(capsys, tmp_path, value):
    with pytest.raises(SystemExit) as e:  # argparse: was int()'s or randrange()'s message after the load
        main(["bench", "throughput", "--model", str(tmp_path / "m.gguf"), "--input-len", value])
    assert e.value.code == 2 and "argument --input-len" in capsys.readouterr().err


def test_bench_json_into_a_directory_is_one_line(capsys, tiny_llama, tmp_path):
    code, err = _cli(capsys, "bench", "latency", "--model", tiny_llama, "--device", "cpu", "--prompt-len", "8",
                     "--max-tokens", "2", "--repeat", "1", "--json", tmp_path)  # was an IsADirectoryError traceback
    assert code == 2 and err.strip().splitlines()[-1] == f"qkv: error: [Errno 21] Is a directory: '{tmp_path}'"


def test_bench_plot_writes_the_path_it_names(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    from qkv.tools.bench_gpu import plot

    out = tmp_path / "chart"  # no suffix: was written as chart.png while it printed "plot: chart"
    plot({"qkv": {"decode_tok_s": 10.0}}, str(out), "latency")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (tmp_path / "chart.png").exists()


# ------------------------------------------------------------------ qkv memory
@pytest.mark.parametrize("flag", ["--context", "--gqa-kv-heads", "--max-num-seqs", "--max-num-batched-tokens"])
def test_memory_zero_counts_are_refused(capsys, tmp_path, flag):
    """0 meant the default (--context, --gqa-kv-heads) or pools no engine builds."""
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 8,
        "num_key_value_heads": 2, "intermediate_size": 512, "vocab_size": 1000, "max_position_embeddings": 2048}))
    code, err = _cli(capsys, "memory", tmp_path, flag, "0")
    assert code == 2 and err.startswith(f"qkv: error: {flag}") and "Traceback" not in err


# ------------------------------------------------------------------ text that was not UTF-8
def test_text_that_was_not_utf8_is_a_value_error():
    """Python decodes argv and stdin with surrogateescape: such text reached the tokenizer as
    "TypeError: TextInputSequence must be str" (a traceback from ``qkv generate``)."""
    llm = LLM(real_model("smollm2"), device="cpu", num_kv_blocks=16, log_stats=False, aot_decode=False)
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")
    with pytest.raises(ValueError, match=r"not valid Unicode .*'\\udce9' at character 3"):
        llm.generate(bad, SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="not valid Unicode"):
        llm.chat([{"role": "user", "content": bad}], SamplingParams(max_tokens=1))
    assert_no_leak(llm)


def test_chat_repl_goes_on_after_a_refused_turn(capsys, monkeypatch):
    """One bad line (not UTF-8, or past the context) ended the whole chat with a traceback
    or an error; now that turn is refused and left out of the conversation."""
    import io

    model = real_model("smollm2")
    bad = b"\xff\xfe".decode("utf-8", "surrogateescape")
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{bad}\nWhat is 2+2?\n\n"))
    code, err = _cli(capsys, "chat", "--model", model, "--device", "cpu", "--no-aot-decode", "--max-tokens", "3",
                     "--verbose")
    assert code == 0
    assert "qkv chat: error: the text is not valid Unicode" in err
    turn = [line for line in err.splitlines() if line.startswith("[prompt ")]
    # The answered turn's prompt is the good line alone: the refused one was dropped.
    llm = LLM(model, device="cpu", num_kv_blocks=16, log_stats=False, aot_decode=False)
    alone = len(llm.chat_prompt([{"role": "user", "content": "What is 2+2?"}]))
    assert turn == [f"[prompt {alone} tokens, 0 served from the KV cache; 3 generated]"]


def test_chat_repl_keeps_an_empty_system_message(capsys, monkeypatch):
    """``--system ""`` was dropped, so SmolLM2's template put its own default system prompt in;
    an empty system message is a choice (no system prompt) and is now sent."""
    import io

    model = real_model("smollm2")
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2+2?\n\n"))
    code, err = _cli(capsys, "chat", "--model", model, "--device", "cpu", "--no-aot-decode", "--max-tokens", "2",
                     "--verbose", "--system", "")
    assert code == 0
    llm = LLM(model, device="cpu", num_kv_blocks=16, log_stats=False, aot_decode=False)
    user = {"role": "user", "content": "What is 2+2?"}
    empty, default = (len(llm.chat_prompt(m)) for m in ([{"role": "system", "content": ""}, user], [user]))
    assert empty != default  # the template's default system prompt is not what was asked
    turn = [line for line in err.splitlines() if line.startswith("[prompt ")]
    assert turn == [f"[prompt {empty} tokens, 0 served from the KV cache; 2 generated]"]


# ------------------------------------------------------------------ qkv convert --uptrain
@pytest.mark.parametrize("lr", [float("inf"), float("nan"), 0.0, -1.0])
def test_uptrain_lr_must_be_finite(lr):
    from qkv.tools.uptrain import UptrainConfig

    with pytest.raises(ValueError, match="--uptrain-lr must be positive and finite"):  # inf used to train (to NaNs)
        UptrainConfig(tokens=1 << 20, lr=lr)
    assert UptrainConfig(tokens=1 << 20, lr=1e-3).lr == 1e-3


@pytest.mark.parametrize("argv,line", [
    (["--threads", "0"], "--threads must be at least 1, got 0"),  # was torch's RuntimeError, a traceback
    (["--threads", "-1"], "--threads must be at least 1, got -1"),
    (["--repeat", "0"], "--repeat must be at least 1, got 0"),  # was one timed run, unsaid
])
def test_bench_transcribe_counts_are_refused_first(capsys, tmp_path, argv, line):
    code, err = _cli(capsys, "bench", "transcribe", tmp_path / "talk.wav", *argv)
    assert code == 2 and err.strip() == f"qkv: error: {line}"


# ------------------------------------------------------------------ qkv memory whisper-base
def test_memory_of_the_named_whisper_equals_the_engines(capsys):
    """``qkv memory whisper-base`` read the CTranslate2 config.json as HF's: "no 'model_type'
    field". Its pools and bytes are now the engine's own."""
    real_model("whisper-base")
    budget = 256 << 20
    code = main(["memory", "whisper-base", "--kv-dtype", "float32", "--max-num-seqs", "4",
                 "--kv-cache-memory", str(budget), "--context", "448", "--json"])
    out = capsys.readouterr().out
    assert code == 0, capsys.readouterr().err
    r = json.loads(out)
    assert [(g["kind"], g["blocks_per_sequence"]) for g in r["groups"]] == [("full", 28), ("cross", 94)]
    llm = LLM("whisper-base", device="cpu", max_num_seqs=4, kv_cache_memory=budget, log_stats=False)
    assert list(r["pools"]["blocks"].values()) == [g.pool.num_blocks for g in llm.engine.kv.groups]
    assert r["pools"]["bytes"] == llm.engine.runner.kv_cache_bytes


def test_max_model_len_past_the_models_context_is_refused(tiny_llama):
    """It was capped to the model's context without a word: a server asked for 100k tokens
    silently served 512."""
    with pytest.raises(ValueError, match=r"max_model_len \(513\) exceeds the model's context length \(512 tokens\)"):
        LLM(tiny_llama, dtype="float32", device="cpu", max_model_len=513, log_stats=False)
    assert LLM(tiny_llama, dtype="float32", device="cpu", max_model_len=512, num_kv_blocks=8,
               log_stats=False).engine.max_model_len == 512


@pytest.mark.parametrize("name", ["enable_prefix_caching", "async_scheduling", "enforce_eager", "compile_decode",
                                  "log_stats", "aot_decode"])
def test_switches_take_booleans_only(tiny_llama, name):
    """The string "false" was truthy: enable_prefix_caching="false" kept the prefix cache on,
    async_scheduling="false" turned async scheduling on."""
    with pytest.raises(ValueError, match=f"{name} must be true or false, got 'false'"):
        LLM(tiny_llama, dtype="float32", device="cpu", num_kv_blocks=8, **{name: "false"})


# ------------------------------------------------------------------ options that leave nothing to sample
def test_options_that_mask_every_allowed_token_are_refused():
    """allowed_token_ids all banned (by bad_words, or by min_tokens as stop ids) left a row of
    -inf, and the sampler drew the vocabulary's last id at every step: tokens outside
    allowed_token_ids, finish_reason "length"."""
    llm = LLM(real_model("smollm2"), device="cpu", num_kv_blocks=32, log_stats=False, aot_decode=False)
    paren = llm.encode("()")
    assert len(paren) == 1
    cases = [(dict(allowed_token_ids=paren, bad_words=["()"]), "bad_words ban every token of allowed_token_ids"),
             (dict(allowed_token_ids=paren, stop_token_ids=paren, min_tokens=2), r"min_tokens \(2\) bans every token"),
             (dict(allowed_token_ids=sorted(llm.engine.eos_ids), min_tokens=1), r"min_tokens \(1\) bans every token")]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            llm.generate("Hello", SamplingParams(max_tokens=3, temperature=1.0, seed=0, **kw))
    assert_no_leak(llm)
    # One allowed token left over, or min_tokens reached: it runs, inside allowed_token_ids.
    out = llm.generate("Hello", SamplingParams(max_tokens=3, temperature=1.0, seed=0, ignore_eos=True,
                                               allowed_token_ids=paren + [42], bad_words=["()"]))[0]
    assert out.token_ids == [42, 42, 42]


# ------------------------------------------------------------------ scoring more than the pool holds
def test_scoring_past_the_whole_pool_is_request_too_large(tiny_llama):
    """``LLM.logits`` (``qkv perplexity``) and prompt_logprobs raised PoolBusy, "retry later"
    (a traceback from the CLI; a 429 to retry forever from the server), for a sequence that
    even an empty pool can never hold."""
    from qkv.engine.scheduler import PoolBusy, RequestTooLarge

    llm = LLM(tiny_llama, dtype="float32", device="cpu", block_size=4, num_kv_blocks=3, log_stats=False)
    ids = list(range(3, 20))  # 17 tokens: 5 blocks of 4
    with pytest.raises(RequestTooLarge, match=r"17 tokens need \[5\] KV blocks, but the pool has only \[3\]"):
        llm.logits(ids)
    with pytest.raises(RequestTooLarge):
        llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=1))
    assert_no_leak(llm)
    assert llm.logits(ids[:12]).shape == (12, llm.config.vocab_size)  # what fits still scores
    (busy,) = llm.engine.add_request(ids[:8], SamplingParams(max_tokens=2))
    llm.engine.step()  # holds 2 of the 3 blocks
    with pytest.raises(PoolBusy):  # fits an empty pool, not this one now: retry is right
        llm.logits(ids[:12])
    llm.engine.abort(busy.request_id)
    assert_no_leak(llm)


def test_cli_perplexity_past_the_pool_is_one_line(capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    code, err = _cli(capsys, "perplexity", real_model("smollm2"), "--text", text, "--window", "100", "--max-tokens",
                     "100", "--num-kv-blocks", "3", "--device", "cpu", "--no-aot-decode", "--quiet")
    assert code == 2 and err.strip().splitlines()[-1] == ("qkv: error: 100 tokens need [7] KV blocks, but the pool "
                                                          "has only [3]; raise num_kv_blocks")


class _Stop(Exception):
    pass


@pytest.mark.parametrize("argv,budget", [([], 2048), (["--window", "3000"], 3001),
                                         (["--max-num-batched-tokens", "7"], 7),  # was replaced by 2048, unsaid
                                         (["--decode"], 1)])
def test_perplexity_token_budget(monkeypatch, tmp_path, argv, budget):
    import qkv

    seen = {}

    def fake_llm(model, **kw):
        seen.update(kw)
        raise _Stop

    monkeypatch.setattr(qkv, "LLM", fake_llm)
    text = tmp_path / "t.txt"
    text.write_text("some text")
    from qkv.tools import perplexity

    with pytest.raises(_Stop):
        perplexity.run(_perplexity_args(text, argv))
    assert seen["max_num_batched_tokens"] == budget


def _perplexity_args(text, argv):
    import argparse

    from qkv.tools import perplexity

    p = argparse.ArgumentParser()
    perplexity.add_arguments(p)
    return p.parse_args(["m.gguf", "--text", str(text), "--device", "cpu", *argv])


def test_perplexity_decode_with_a_budget_is_refused(capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("some text")
    code, err = _cli(capsys, "perplexity", tmp_path / "m.gguf", "--text", text, "--decode",
                     "--max-num-batched-tokens", "64")
    assert code == 2 and "--decode scores one token a step" in err


def test_memory_refuses_packed_pages_for_whisper_as_the_engine_does(capsys):
    real_model("whisper-base")
    with pytest.raises(ValueError, match="cross-attention cache does not read int8/int4 pages"):
        LLM("whisper-base", device="cpu", kv_dtype="int4", log_stats=False)
    code, err = _cli(capsys, "memory", "whisper-base", "--kv-dtype", "int4")  # printed pools the engine never builds
    assert code == 2 and err.startswith("qkv: error: --kv-dtype int4: whisper's cross-attention cache")


@pytest.mark.parametrize("flag", ["--compile", "--no-aot-decode"])
def test_compile_refuses_the_decode_switches(capsys, tmp_path, flag):
    code, err = _cli(capsys, "compile", tmp_path / "m.gguf", flag)  # were overridden unsaid, after the load
    assert code == 2
    assert err.strip() == f"qkv: error: {flag} chooses how a run decodes, not what qkv compile builds: drop it"


def test_request_id_must_be_a_string(tiny_llama):
    llm = LLM(tiny_llama, dtype="float32", device="cpu", num_kv_blocks=16, log_stats=False)
    with pytest.raises(ValueError, match="request_id must be a string, got int 5"):  # was a TypeError from "+"
        llm.engine.add_request([5, 6], SamplingParams(max_tokens=1), request_id=5)
    assert_no_leak(llm)
    assert not llm.engine.has_unfinished()


# ------------------------------------------------------------------ a CPU pool past the machine's memory
def test_cpu_pool_past_the_machines_memory_is_refused(tiny_llama):
    """num_kv_blocks=10**9 had the process killed for memory (the pool's bookkeeping) before it
    printed a word; a pool past RAM cannot be mapped either. Checked with few, huge blocks
    (2**20 tokens of 512 B: 512 MiB each), so that nothing large is ever allocated."""
    import os

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    n = ram // (512 << 20) + 1
    with pytest.raises(ValueError, match=rf"a KV cache of \[{n}\] blocks of 1048576 tokens takes .* GiB, more than "
                                         r"this machine's .* GiB of memory"):
        LLM(tiny_llama, dtype="float32", device="cpu", block_size=1 << 20, num_kv_blocks=n, log_stats=False)
    llm = LLM(tiny_llama, dtype="float32", device="cpu", block_size=1 << 20, num_kv_blocks=1, log_stats=False)
    assert llm.engine.runner.kv_cache_bytes == 512 << 20  # what fits is built as asked (reserved, not resident)


def test_cpu_pool_check_counts_every_tensor_parallel_rank(tiny_llama):
    # Under tensor parallelism each rank maps a pool of the (per-rank) specs: the check counted one.
    import os

    from qkv.engine.engine import check_cpu_pool

    llm = LLM(tiny_llama, dtype="float32", device="cpu", block_size=1 << 20, num_kv_blocks=1, log_stats=False)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    n = ram // llm.engine.runner.kv_cache_bytes * 2 // 3  # one rank's pool fits, two do not
    check_cpu_pool(llm.engine.specs, 1 << 20, [n])
    with pytest.raises(ValueError, match=rf"\[{n}\] blocks of 1048576 tokens on each of 2 ranks takes"):
        check_cpu_pool(llm.engine.specs, 1 << 20, [n], ranks=2)


def test_token_ids_as_a_tensor_are_taken_and_bad_tensors_named(tmp_path):
    # LLM.logits(tensor) said the ids were "out of the vocabulary": a tensor's elements are
    # 0-d tensors, not ints. A 1-D integer tensor is its list; anything else is named.
    import torch

    from qkv.loading.chat_template import ChatTemplateError, read_chat_template

    llm = LLM(real_model("smollm2"), device="cpu", num_kv_blocks=16, log_stats=False, aot_decode=False)
    ids = llm.encode("The capital of France is")
    assert torch.equal(llm.logits(torch.tensor(ids)), llm.logits(ids))
    for bad, words in ((torch.tensor([ids]), r"1-D of integers, got \(1, "), (torch.tensor(ids, dtype=torch.float32),
                                                                            "torch.float32")):
        with pytest.raises(ValueError, match=words):
            llm.logits(bad)
    assert_no_leak(llm)
    with pytest.raises(ChatTemplateError, match="a directory, not a file"):  # was "no such file"
        read_chat_template(str(tmp_path))


@pytest.mark.parametrize("where", ["execute", "sample"])
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_raw_engine_after_a_step_raised(tiny_llama, monkeypatch, where, async_scheduling):
    """A step that raised (here in the forward pass or in sampling, after the scheduler had
    advanced its requests) once left them half advanced: a driver that went on stepping got
    a token sampled from the wrong position. Now every unfinished request is aborted, its
    blocks back in the pool, and new requests give what a fresh engine gives."""
    from qkv import LLM, SamplingParams
    from qkv.engine import engine as engine_mod

    llm = LLM(tiny_llama, device="cpu", num_kv_blocks=64, async_scheduling=async_scheduling)
    eng = llm.engine
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate([[5, 6, 7, 8], [9, 10]], params)]
    eng.add_request([5, 6, 7, 8], params, request_id="a")
    eng.add_request([9, 10], params, request_id="b")
    eng.step()
    eng.step()
    target, name = (eng.runner, "execute") if where == "execute" else (engine_mod.sampler, "sample")
    real = getattr(target, name)

    def boom(*a, **kw):
        raise RuntimeError("injected")

    monkeypatch.setattr(target, name, boom)
    with pytest.raises(RuntimeError, match="injected"):
        eng.step()
    monkeypatch.setattr(target, name, real)
    assert not eng.has_unfinished()
    assert_no_leak(llm)
    eng.add_request([5, 6, 7, 8], params, request_id="c")
    eng.add_request([9, 10], params, request_id="d")
    done = {}
    while eng.has_unfinished():
        done.update({o.request_id: o.token_ids for o in eng.step() if o.finished})
    assert [done["c"], done["d"]] == expected
    assert_no_leak(llm)
