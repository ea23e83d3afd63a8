"""The ``qkv`` command: generate, chat, and the tools registered in COMMANDS.

Each tool lives in its own module with ``add_arguments(parser)`` and ``run(args)``; this
file only dispatches, so adding a command never touches another's code.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys

DESCRIPTION = ("qkv: an LLM inference engine built around the KV cache. "
               "Run 'qkv COMMAND --help' for a command's options.")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option shows its default, also those without a help text; None and False
    defaults (unset options, off switches) show none, and a help text that already speaks of
    its default is left as written."""

    def _format_action(self, action):
        if action.help is None and action.option_strings and action.default not in (None, False):
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help  # unset, off, or the help already says what the default is
        return super()._get_help_string(action)


# command -> (module, help). Imported only when that command runs.
COMMANDS = {
    "generate": ("qkv.cli", "generate text for one prompt, streamed to stdout"),
    "chat": ("qkv.cli", "multi-turn chat; each turn reuses the KV of the turns before"),
    "serve": ("qkv.server.cli", "OpenAI-compatible HTTP server"),
    "bench": ("qkv.tools.bench", "benchmarks: latency, throughput, prefix, serve, transcribe"),
    "memory": ("qkv.tools.memory", "exact KV-cache memory arithmetic and plots"),
    "convert": ("qkv.tools.convert", "MHA -> GQA/MQA by mean-pooling K/V heads"),
    "perplexity": ("qkv.tools.perplexity", "perplexity over sliding windows"),
    "compile": ("qkv.tools.compile_step", "build a model's ahead-of-time compiled CPU decode step"),
    "transcribe": ("qkv.audio.cli", "speech to text with a Whisper model"),
}


def add_model_arguments(p: argparse.ArgumentParser, model_flag: bool = True) -> None:
    """Options every command that loads a model shares (``model_flag=False``: the command
    names its model with a positional argument instead of ``--model``)."""
    if model_flag:
        p.add_argument("--model", default="smollm2", help="named model, .gguf file or HF directory")
    from qkv.engine.dtype import check_arg as check_dtype

    p.add_argument("--dtype", default="auto", type=check_dtype,
                   help="auto | float32 | bfloat16 | float16 (auto: the checkpoint's dtype on CUDA, bfloat16 for "
                        "GGUF and random shapes; float32 on the CPU, bfloat16 with quantized weights)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--compile", action="store_true",
                   help="CPU, Llama family: run decode steps as one torch.compile'd graph (compiled on the first "
                        "decode step, tens of seconds; cached on disk)")
    p.add_argument("--no-aot-decode", action="store_true",
                   help="CPU: decode eagerly even where 'qkv compile' has built this model's compiled step")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV blocks in the pool (default: as many as 1 GiB holds on a CPU; on CUDA, what memory profiling leaves)")
    p.add_argument("--max-num-batched-tokens", type=_budget_arg, default="auto",
                   help="tokens per engine step (prefill chunk size); auto: 8192 on a CUDA device of >= 70 GiB, "
                        "else 2048")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences running at once")
    p.add_argument("--no-prefix-caching", action="store_true", help="do not reuse KV blocks across requests")
    p.add_argument("--quantization", default="auto", choices=["auto", "none", "int4", "int8", "bf16", "fp8"],
                   help="CPU weights: auto keeps the file's precision class (a Q4 GGUF: int4; Q6/Q8: int8; "
                        "F16/BF16: bf16; qkv/model/cpu_format.py); none: float32. fp8: e4m3 weights and "
                        "activations on the GPU (qkv/model/fp8.py; emulated on the CPU, for measuring)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch step n+1 before reading step n's tokens (default: on with CUDA graphs)")
    from qkv.kvcache.kv_int import check_arg

    p.add_argument("--kv-cache-dtype", default="auto", metavar="DTYPE[,V_DTYPE]", type=check_arg,
                   help="KV cache storage: auto = the model's dtype; fp8 (e4m3) holds twice the tokens of bf16; "
                        "int8 / int4 (group scales included: 1.94x / 3.56x the tokens of bf16); two values set K "
                        "and V apart, e.g. int4,int8")
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="shard the model over N processes (one per GPU on CUDA; gloo on the CPU)")
    p.add_argument("--attention-override", default=None, metavar="JSON",
                   help='change how layers attend, e.g. \'{"dilation": 2}\' (dilated sliding windows; '
                        'an int for every sliding layer or a list per layer)')


def _budget_arg(value: str):
    from qkv.engine.budget import check

    try:
        return check(value)
    except ValueError:  # argparse names the flag
        raise argparse.ArgumentTypeError(f"not a positive whole number of tokens or 'auto': {value!r}") from None


# Modules that only an optional extra installs -> the extra that brings them.
EXTRAS = {"fastapi": "serve", "uvicorn": "serve", "pydantic": "serve", "prometheus_client": "serve",
          "matplotlib": "plot", "soundfile": "audio", "soxr": "audio", "transformers": "train"}


def engine_kwargs(args) -> dict:
    return dict(dtype=args.dtype, device=args.device, threads=args.threads, block_size=args.block_size,
                num_kv_blocks=args.num_kv_blocks, max_num_batched_tokens=args.max_num_batched_tokens,
                max_num_seqs=args.max_num_seqs, enable_prefix_caching=not args.no_prefix_caching,
                quantization=args.quantization, kv_dtype=getattr(args, "kv_cache_dtype", "auto"),
                async_scheduling=getattr(args, "async_scheduling", None),
                attention_override=getattr(args, "attention_override", None),
                tensor_parallel_size=getattr(args, "tensor_parallel_size", 1),
                log_stats=getattr(args, "verbose", True), compile_decode=getattr(args, "compile", False),
                **({"aot_decode": False} if getattr(args, "no_aot_decode", False) else {}))


# Sampling flags: (flag default when neither the flag nor the model's generation_config sets it).
SAMPLING_DEFAULTS = {"max_tokens": 256, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                     "repetition_penalty": 1.0}


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    gc = "default: the model's generation_config.json, else %s"
    p.add_argument("--max-tokens", type=int, default=None, help=gc % SAMPLING_DEFAULTS["max_tokens"])
    p.add_argument("--temperature", type=float, default=None, help=gc % "0 (greedy)")
    p.add_argument("--top-p", type=float, default=None, help=gc % SAMPLING_DEFAULTS["top_p"])
    p.add_argument("--top-k", type=int, default=None, help=gc % "0 (off)")
    p.add_argument("--min-p", type=float, default=None, help=gc % "0 (off)")
    p.add_argument("--repetition-penalty", type=float, default=None, help=gc % "1 (off)")
    p.add_argument("--seed", type=int, default=None)


def sampling_params(args):
    """The flags given, else the model's generation_config.json defaults (as vLLM; printed on
    stderr), else SAMPLING_DEFAULTS. A named default or a GGUF file has no generation_config."""
    from pathlib import Path

    from qkv import SamplingParams
    from qkv.loading.hf import generation_defaults
    from qkv.loading.models import NAMED

    name = getattr(args, "model", None)
    model_defaults = {}
    if name is not None and name not in NAMED:
        model_defaults = generation_defaults(Path(name).expanduser())
    chosen, used = {}, {}
    for k, builtin in SAMPLING_DEFAULTS.items():
        v = getattr(args, k, None)
        if v is None and k in model_defaults:
            v = used[k] = model_defaults[k]
        chosen[k] = builtin if v is None else v
    if used:
        print("[qkv] sampling defaults from generation_config.json: "
              + ", ".join(f"{k}={v}" for k, v in used.items()), file=sys.stderr, flush=True)
    return SamplingParams(seed=args.seed, **chosen)


def add_chat_template_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template file used instead of the model's own (rendered in the same sandbox)")


def load_llm(args, **extra):
    """The LLM of ``args`` (with its --chat-template). A template that cannot be read or
    compiled is a ValueError naming the flag and the file (main prints it in one line)."""
    from qkv import LLM
    from qkv.loading.chat_template import ChatTemplateError

    template = getattr(args, "chat_template", None)
    try:
        return LLM(args.model, chat_template=template, **engine_kwargs(args), **extra)
    except ChatTemplateError as e:
        if template is None:
            raise
        raise ValueError(f"--chat-template: {e}") from None
    finally:
        _collector_after_start_up()


_paused_collector = False  # whether this process's collector is off for start-up (below)
_froze = False  # whether start-up froze what it made (gc.freeze)


def _collector_before_start_up(command: str | None) -> None:
    """``qkv generate`` and ``qkv chat`` import torch and load the model with Python's cyclic
    garbage collector off: its passes over the ~170k objects torch's import leaves took
    0.2-0.3 s of the README's first command (2 cores), and import and load leave next to
    no cyclic garbage. ``_collector_after_start_up`` turns it back on (``main`` also does, on
    any way out)."""
    global _paused_collector
    if command in ("generate", "chat") and gc.isenabled():
        gc.disable()
        _paused_collector = True


def _collector_after_start_up(freeze: bool = True) -> None:
    """The collector back on, with what start-up made moved out of its sight (``gc.freeze``):
    otherwise its first passes would walk all of it again while tokens are being generated."""
    global _paused_collector, _froze
    if _paused_collector:
        if freeze:
            gc.freeze()
            _froze = True
        gc.enable()
        _paused_collector = False


def add_arguments(p: argparse.ArgumentParser, command: str) -> None:
    add_model_arguments(p)
    add_sampling_arguments(p)
    add_chat_template_argument(p)
    if command == "generate":
        p.add_argument("prompt")
        p.add_argument("--raw", action="store_true", help="no chat template: the prompt is plain text")
        p.add_argument("--verbose", action="store_true",
                       help="show the engine's start-up lines (dtype, KV cache, timings) on stderr")
    else:
        p.add_argument("--verbose", action="store_true",
                       help="show the engine's start-up lines and the prompt tokens served from the cache")
        p.add_argument("--system", default=None, help="a system message")


def _run_generate(args) -> int:
    llm = load_llm(args)
    params = sampling_params(args)
    if args.raw:
        prompt = llm.encode(args.prompt)
    elif llm.tokenizer is None or not llm.tokenizer.chat_template:
        print(f"[qkv] {args.model} has no chat template: the prompt is sent as plain text (as with --raw)",
              file=sys.stderr)
        prompt = llm.encode(args.prompt)
    else:
        prompt = llm.chat_prompt([{"role": "user", "content": args.prompt}])
    last = None
    for last in llm.stream(prompt, params):
        sys.stdout.write(last.text_delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    _say_why_it_ended(last, params)
    return 0


def _say_why_it_ended(out, params) -> None:
    """An answer cut by the token limit looks like one that ended: say which it was."""
    if out is None or out.finish_reason != "length":
        return
    limit = (f"--max-tokens {params.max_tokens}" if len(out.token_ids) >= params.max_tokens
             else "the model's context length")
    print(f"[qkv] stopped after {len(out.token_ids)} tokens at {limit}, not at the end of the answer",
          file=sys.stderr)


def _run_chat(args) -> int:
    llm = load_llm(args)
    if llm.tokenizer is None or not llm.tokenizer.chat_template:
        print(f"qkv chat: {args.model} has no chat template; give one with --chat-template FILE "
              "(or use 'qkv generate --raw' for plain text)", file=sys.stderr)
        return 2
    params = sampling_params(args)
    messages = [{"role": "system", "content": args.system}] if args.system is not None else []  # "" is a message too
    try:  # line editing and history for input() where the platform has GNU readline
        import readline  # noqa: F401
    except ImportError:
        pass
    print("qkv chat: empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        answer, last = "", None
        try:
            for out in llm.stream(llm.chat_prompt(messages), params):
                sys.stdout.write(out.text_delta)
                sys.stdout.flush()
                answer, last = out.text, out
        except ValueError as e:  # this turn is refused (not UTF-8, past the context): not the whole chat
            messages.pop()
            print(f"qkv chat: error: {e}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        _say_why_it_ended(last, params)
        messages.append({"role": "assistant", "content": answer})
        if args.verbose and last is not None:
            print(f"[prompt {len(last.prompt_token_ids)} tokens, {last.num_cached_tokens} served from the "
                  f"KV cache; {len(last.token_ids)} generated]", file=sys.stderr)
    return 0


def run(args) -> int:
    return _run_generate(args) if args.command == "generate" else _run_chat(args)


def _add_command_arguments(p: argparse.ArgumentParser, name: str, module: str) -> None:
    if module == "qkv.cli":
        add_arguments(p, name)
        return
    try:
        importlib.import_module(module).add_arguments(p)
    except ImportError as e:
        top = (getattr(e, "name", None) or "").partition(".")[0]
        hint = f"; pip install 'qkv[{EXTRAS[top]}]'" if top in EXTRAS else ""
        p.set_defaults(unavailable=f"qkv {name} is unavailable: {e}{hint}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qkv", description=DESCRIPTION, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    called = argv is not None  # from Python (tests): leave the collector as it was found
    argv = sys.argv[1:] if argv is None else list(argv)
    # Only the command being run gets its options (importing its module, and so torch):
    # ``qkv --help`` and a mistyped command answer at once.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    _collector_before_start_up(chosen)
    try:
        return _main(parser, sub, argv, chosen)
    finally:
        _collector_after_start_up(freeze=False)  # an error before the load: as it was
        if called:
            _unfreeze()


def _unfreeze() -> None:
    global _froze
    if _froze:
        gc.unfreeze()
        _froze = False


def _main(parser: argparse.ArgumentParser, sub, argv: list[str], chosen: str | None) -> int:
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter)
        if name == chosen:
            _add_command_arguments(p, name, module)
        p.set_defaults(module=module)
    args = parser.parse_args(argv)
    if getattr(args, "unavailable", None):
        parser.error(args.unavailable)
    # User-facing errors (LoadError and ConfigError are ValueErrors, as are the validation
    # errors of SamplingParams and the engine) print one line; anything else is a bug: traceback.
    try:
        from qkv.engine.llm import check_device

        check_device(getattr(args, "device", None), "--device")  # before the load, which may take minutes
        if args.module == "qkv.cli":
            return run(args)
        return importlib.import_module(args.module).run(args) or 0
    except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        # A directory where a file was asked for (--text, --json) is the user's slip like a missing file.
        print(f"qkv: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        top = (e.name or "").partition(".")[0]
        if top not in EXTRAS:
            raise
        print(f"qkv: error: qkv {args.command} needs {top}, which is not installed: "
              f"pip install 'qkv[{EXTRAS[top]}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
