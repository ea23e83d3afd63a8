"""``qkv serve``: load a model and serve it over OpenAI's HTTP API with uvicorn.

    qkv serve --model smollm2 --port 8000 [--api-key KEY ...] [--api-key-file FILE]

Binds 127.0.0.1 unless told otherwise. Ctrl-C (SIGINT) or SIGTERM shuts down gracefully: the
app drains first (new requests get 503 ``shutting_down`` while open responses get
``--shutdown-timeout`` seconds to finish; what is left is aborted, streams ending with an
error event and ``data: [DONE]``), then uvicorn stops accepting and exits. A second signal
stops at once.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from qkv.cli import add_chat_template_argument, add_model_arguments, load_llm


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
    import uvicorn

    from qkv.server.app import ServerLimits, create_app
    from qkv.server.draining import DrainingServer
    from qkv.server.http_plumbing import CORS

    from qkv.server.tenants import read_keys

    try:
        keys = read_keys(args.api_key, args.api_key_file)
    except ValueError as e:
        print(f"qkv serve: {e}", file=sys.stderr)
        return 2
    for flag, least in (("max_n", 1), ("max_body_bytes", 1), ("max_waiting_requests", 0)):
        if getattr(args, flag) < least:
            print(f"qkv serve: --{flag.replace('_', '-')} must be at least {least}", file=sys.stderr)
            return 2
    if not keys and not _is_loopback(args.host):
        print(f"qkv serve: warning: binding {args.host} without --api-key: anyone who can reach it may use it",
              file=sys.stderr)
    llm = load_llm(args, **({"max_model_len": args.max_model_len} if args.max_model_len else {}))
    name = args.served_model_name or served_name(args.model)
    limits = ServerLimits(max_n=args.max_n, max_body_bytes=args.max_body_bytes,
                          default_max_tokens=args.default_max_tokens,
                          max_waiting=args.max_waiting_requests or None)
    app = create_app(llm, name, api_key=keys, limits=limits,
                     allow_special_tokens_in_content=args.allow_special_tokens_in_content,
                     cors=CORS(args.allowed_origins, args.allowed_methods, args.allowed_headers))
    print(f"qkv serve: {name} ({llm.source}) on http://{args.host}:{args.port}/v1"
          f"{f' ({len(keys)} API keys)' if keys else ''}", file=sys.stderr, flush=True)
    # After the drain every response has been sent: uvicorn's own grace period is a formality.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=3)
    DrainingServer(config, app.state.drain, args.shutdown_timeout).run()
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
