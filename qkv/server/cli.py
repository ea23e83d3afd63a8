"""``qkv serve``: load a model and serve it over OpenAI's HTTP API with uvicorn.

    qkv serve --model smollm2 --port 8000 [--api-key KEY ...] [--api-key-file FILE]

Binds 127.0.0.1 unless told otherwise. Ctrl-C (SIGINT) or SIGTERM shuts down gracefully: the
app drains first (new requests get 503 ``shutting_down`` while open responses get
``--shutdown-timeout`` seconds to finish; what is left is aborted, streams ending with an
error event and ``data: [DONE]``), then uvicorn stops accepting and exits. A second signal
stops at once.

The engine runs in a process of its own (engine_process.py) unless ``--engine-in-process``:
this process parses HTTP, renders templates, tokenizes, detokenizes and streams. If the
engine process dies, requests get 500 ``engine_dead``, /health 503, and the server exits
with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import sys
from pathlib import Path

from qkv.cli import add_chat_template_argument, add_model_arguments, load_llm


DEATH_LINGER_S = 2.0  # after the engine died: /health says 503 (and requests 500) this long before the exit


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_chat_template_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=None,
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health; repeat for "
                        "several keys (each one a tenant: no prefix-cache sharing between keys). "
                        "$QKV_API_KEY adds one more")
    p.add_argument("--api-key-file", default=None, help="a file of API keys, one per line ('#' comments)")
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: --model)")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--max-n", type=int, default=16, help="largest n (samples) per request")
    p.add_argument("--max-waiting-requests", type=int, default=256,
                   help="sequences that may wait for a seat; beyond it requests get 429 (0: no bound)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body")
    p.add_argument("--default-max-tokens", type=int, default=None,
                   help="chat max_tokens when a request gives none (default: the rest of the context)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds open responses get to finish on SIGTERM/SIGINT before they are aborted")
    p.add_argument("--allow-special-tokens-in-content", action="store_true",
                   help="encode special tokens written in chat message content as control tokens "
                        "(unsafe: a client can forge system or assistant turns; off: content is plain text)")
    p.add_argument("--allowed-origins", type=_names, default=[], metavar="ORIGINS",
                   help="origins browsers may call from (CORS): comma-separated or a JSON list, '*' for any "
                        "(default: none, no CORS headers)")
    p.add_argument("--allowed-methods", type=_names, default=["*"], metavar="METHODS",
                   help="HTTP methods allowed cross-origin (with --allowed-origins; default: all)")
    p.add_argument("--allowed-headers", type=_names, default=["*"], metavar="HEADERS",
                   help="request headers allowed cross-origin (with --allowed-origins; default: all)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--engine-in-process", action="store_true",
                   help="run the engine in a thread of the server's process (default: a process of its own)")
    p.add_argument("--api-server-count", type=int, default=1, metavar="N",
                   help="front-end processes (HTTP, tokenization, detokenization, streaming) sharing the port "
                        "in front of the one engine process (default 1)")
    from qkv.tools.shapes import SHAPES

    p.add_argument("--random-weights", metavar="SHAPE", default=None, choices=sorted(SHAPES),
                   help="serve a named shape with random weights, with --model's tokenizer and chat template "
                        "(benchmarks; the vocabulary becomes the tokenizer's)")


def _names(value: str) -> list[str]:
    """``a,b`` or vLLM's JSON list ``["a", "b"]``."""
    import json

    if value.lstrip().startswith("["):
        try:
            names = json.loads(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"not a JSON list: {e}") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise argparse.ArgumentTypeError("a JSON list of strings is needed")
        return names
    return [n.strip() for n in value.split(",") if n.strip()]


def served_name(model: str) -> str:
    """``smollm2`` stays ``smollm2``; a path becomes its last component."""
    return Path(model).name if os.sep in model or model.endswith(".gguf") else model


def run(args) -> int:
    import uvicorn  # noqa: F401  (a missing serve extra is named here, before the model loads)

    from qkv.server.tenants import read_keys

    try:
        keys = read_keys(args.api_key, args.api_key_file)
    except ValueError as e:
        print(f"qkv serve: {e}", file=sys.stderr)
        return 2
    for flag, least in (("max_n", 1), ("max_body_bytes", 1), ("max_waiting_requests", 0), ("default_max_tokens", 1)):
        if getattr(args, flag) is not None and getattr(args, flag) < least:  # default_max_tokens 0: every chat a 400
            print(f"qkv serve: --{flag.replace('_', '-')} must be at least {least}", file=sys.stderr)
            return 2
    from qkv.server.frontends import check_count

    if (refused := check_count(args)) is not None:
        print(f"qkv serve: {refused}", file=sys.stderr)
        return 2
    if not keys and not _is_loopback(args.host):
        print(f"qkv serve: warning: binding {args.host} without --api-key: anyone who can reach it may use it",
              file=sys.stderr)
    extra = {"max_model_len": args.max_model_len} if args.max_model_len else {}
    if args.api_server_count > 1:
        from qkv.server.frontends import serve_frontends

        return serve_frontends(args, keys, extra)
    if args.engine_in_process:
        llm = engine_llm(args, extra)
    else:
        import functools

        from qkv.server.engine_process import EngineProcess
        from qkv.server.remote_model import RemoteModel

        _leave_a_core(args)
        process = EngineProcess(functools.partial(engine_llm, args, extra))
        try:
            llm = RemoteModel(process.start(), process)
        except ValueError as e:
            print(f"qkv serve: {e}", file=sys.stderr)
            return 2
        except RuntimeError as e:
            print(f"qkv serve: {e}", file=sys.stderr)
            return 1
    return serve_app(args, llm, keys)


def serve_app(args, llm, keys: list[str], sockets=None, frontend: int | None = None) -> int:
    """Serve ``llm`` with uvicorn until a signal or the engine's death; the exit status.
    ``sockets``: listening sockets to serve (a front end of several, frontends.py) instead of
    binding ``--host``/``--port``; ``frontend``: that front end's index (an X-Qkv-Frontend header)."""
    import uvicorn

    from qkv.server.app import ServerLimits, create_app
    from qkv.server.draining import DrainingServer
    from qkv.server.http_plumbing import CORS

    name = args.served_model_name or served_name(args.model)
    limits = ServerLimits(max_n=args.max_n, max_body_bytes=args.max_body_bytes,
                          default_max_tokens=args.default_max_tokens,
                          max_waiting=args.max_waiting_requests or None)
    app = create_app(llm, name, api_key=keys, limits=limits,
                     allow_special_tokens_in_content=args.allow_special_tokens_in_content,
                     cors=CORS(args.allowed_origins, args.allowed_methods, args.allowed_headers))
    if frontend is None:
        print(f"qkv serve: {name} ({llm.source}) on http://{args.host}:{args.port}/v1"
              f"{f' ({len(keys)} API keys)' if keys else ''}", file=sys.stderr, flush=True)
    else:
        from qkv.server.frontends import FrontendHeader

        app.add_middleware(FrontendHeader, index=frontend)
    # After the drain every response has been sent: uvicorn's own grace period is a formality.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=3)
    server = DrainingServer(config, app.state.drain, args.shutdown_timeout)
    status = [0]

    def engine_died() -> None:  # on the event loop: answer 500/503 a moment longer, then exit non-zero
        print(f"qkv serve: the engine process died; exiting in {DEATH_LINGER_S:g} s", file=sys.stderr, flush=True)
        status[0] = 1
        asyncio.get_running_loop().call_later(DEATH_LINGER_S, setattr, server, "should_exit", True)

    llm.on_death = engine_died
    server.run(sockets)
    return status[0]


def _leave_a_core(args) -> None:
    """A CPU engine in its own process gets one core fewer than the machine has unless
    --threads says otherwise: its torch threads spin while they wait for work, and the front
    end needs a core to stream what they compute (2 cores: 1 thread is ~10x faster than 2)."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads is None and device == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        args.threads = max(1, cores - 1)
        print(f"qkv serve: the engine uses {args.threads} CPU threads (one core left to the front end; "
              "--threads to change)", file=sys.stderr, flush=True)


def engine_llm(args, extra: dict):
    """The served LLM (in the engine process unless --engine-in-process): ``--model``, or a
    ``--random-weights`` shape with ``--model``'s tokenizer."""
    if getattr(args, "random_weights", None):
        from qkv.cli import engine_kwargs
        from qkv.loading import load
        from qkv.tools.shapes import random_llm

        if Path(args.model).is_dir():  # tokenizer files alone are enough
            from qkv.loading.hf import hf_tokenizer

            tokenizer = hf_tokenizer(Path(args.model), [])
        else:
            tokenizer = load(args.model).tokenizer
        kw = {k: v for k, v in engine_kwargs(args).items()
              if k not in ("device", "dtype", "threads", "quantization", "attention_override", "tensor_parallel_size")}
        kw.setdefault("max_model_len", 4096)
        kw.update(extra)
        return random_llm(args.random_weights, device=args.device or "cuda", dtype=args.dtype, tokenizer=tokenizer,
                          **kw)
    return load_llm(args, **extra)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
