"""The OpenAI-compatible HTTP app: ``create_app(llm, ...)`` -> FastAPI.

    POST /v1/completions       POST /v1/chat/completions   (docs/serving.md: every field)
    GET  /v1/models            GET  /health                GET  /metrics (Prometheus)
    POST /tokenize             POST /detokenize            GET  /version   (vLLM's)

Handlers never touch the engine: they parse, tokenize and check the request against the
context and the pool's fixed sizes themselves (so a request that can never run is refused at
once, even while the engine thread is deep in a long prefill), then submit it to the
EngineLoop thread and read the outputs back from an asyncio queue. Every error, including a
client's malformed body, is answered in OpenAI's shape ``{"error": {"message", "type",
"code", "param"}}``; a client's mistake is a 4xx, never a 500. A client that hangs up has its
request aborted. ``app.state.drain(timeout)`` is the graceful shutdown (see cli.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import sys
import time
from typing import AsyncIterator, Sequence

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from qkv.engine.request import SamplingParams
from qkv.engine.scheduler import PoolBusy, RequestTooLarge
from qkv.loading.chat_template import ChatTemplateLimitError, ChatTemplateRenderError
from qkv.server import protocol as P
from qkv.server import tokenize as T
from qkv.server import tool_calls as TC
from qkv.server.engine_client import EngineDead
from qkv.server.engine_loop import EngineLoop, QueueFull, ShuttingDown, Stream
from qkv.server.http_plumbing import CORS, install, request_id
from qkv.server.metrics import ServerMetrics
from qkv.server.structured import compiled_constraint, constraint
from qkv.server.tenants import KeyRing, request_salt

log = logging.getLogger("qkv.server")


RETRY_AFTER_S = 1  # what a 429 asks the client to wait
_submissions = itertools.count()  # makes each engine request id unique


class ServerLimits:
    """What one request may ask for. ``max_body_bytes`` bounds the raw JSON body;
    ``max_waiting`` the sequences queued for a seat (beyond it: 429), None for no bound."""

    def __init__(self, max_n: int = 16, max_prompts: int = 32, max_body_bytes: int = 1 << 20,
                 default_max_tokens: int | None = None, max_waiting: int | None = 256):
        self.max_n, self.max_prompts, self.max_body_bytes = max_n, max_prompts, max_body_bytes
        self.default_max_tokens = default_max_tokens  # chat without max_tokens: None = rest of the context
        self.max_waiting = max_waiting


def create_app(llm, model_name: str = "qkv", api_key: str | Sequence[str] | None = None,
               limits: ServerLimits | None = None, *, allow_special_tokens_in_content: bool = False,
               cors: CORS | None = None) -> FastAPI:
    """An app serving ``llm`` (a qkv.LLM) as ``model_name``. The app owns one EngineLoop,
    started and stopped by its lifespan; nothing else may drive ``llm.engine`` meanwhile.
    ``api_key``: one key or several; with several, each key is a tenant whose prompts never
    share prefix-cache blocks with another key's (tenants.py). ``allow_special_tokens_in_content``:
    special tokens written in chat messages are control tokens (unsafe: clients can forge turns).
    ``cors``: origins (methods, headers) browsers may call from; None: no CORS headers."""
    limits = limits or ServerLimits()
    engine = llm.engine
    keys = KeyRing([api_key] if isinstance(api_key, str) else list(api_key or []))
    holder: dict = {}
    metrics = ServerMetrics(lambda: holder["loop"].stats if "loop" in holder else engine.stats(), model_name)
    state = {"draining": False, "inflight": 0}  # generation responses not yet fully sent

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if hasattr(llm, "engine_loop"):  # a RemoteModel: the engine runs in its own process
            loop = llm.engine_loop(metrics, limits.max_waiting)
        else:
            loop = EngineLoop(engine, metrics, max_waiting=limits.max_waiting)
        holder["loop"] = app.state.engine_loop = loop
        loop.start()
        try:
            yield
        finally:
            loop.stop()  # aborts what is left: every block goes back to the pool

    app = FastAPI(title="qkv", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics = metrics
    install(app, cors)  # CORS, X-Request-Id

    async def drain(timeout: float) -> None:
        """Graceful shutdown, part one: from now on new generation requests get 503
        ``shutting_down`` (and /health 503); open responses get ``timeout`` seconds to finish,
        then the engine aborts them (streams end with an error event and ``data: [DONE]``).
        Returns once every response has been sent; the caller then stops the HTTP server."""
        state["draining"] = True
        deadline = time.monotonic() + timeout
        while state["inflight"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if state["inflight"]:
            log.warning("shutdown: aborting %d open responses after %.1f s", state["inflight"], timeout)
            holder["loop"].request_stop()
            deadline = time.monotonic() + 5  # they only have their last events left to write
            while state["inflight"] and time.monotonic() < deadline:
                await asyncio.sleep(0.02)

    app.state.drain = drain

    # ---------------------------------------------------------------- errors
    @app.exception_handler(P.APIError)
    async def _api_error(request, e: P.APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(P.error_body(str(e.detail), kind, code=str(e.status_code)), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        return JSONResponse(P.error_body(str(e), "invalid_request_error", "invalid_value"), status_code=400)

    @app.exception_handler(Exception)
    async def _server_error(request, e: Exception):
        log.exception("request %s: unhandled error", request_id(request))
        # Answered outside the middleware: the request id header is added here.
        return JSONResponse(P.error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500,
                            headers={"X-Request-Id": request_id(request)})

    # ---------------------------------------------------------------- auth
    async def authorize(request: Request) -> None:
        """Checks the bearer key; leaves its tenant salt in ``request.state.tenant``."""
        request.state.tenant = None
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        index = keys.match(token.strip()) if scheme.lower() == "bearer" else None
        if index is None:
            raise P.APIError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                             "authentication_error", "invalid_api_key")
        request.state.tenant = keys.salt(index)

    auth = [Depends(authorize)]

    # ---------------------------------------------------------------- plain endpoints
    @app.get("/health")
    async def health():
        loop: EngineLoop | None = holder.get("loop")
        if loop is None or not loop.alive:
            return JSONResponse(P.error_body("engine loop is not running", "server_error"), status_code=503)
        if getattr(engine, "tp", None) is not None and engine.tp.failed is not None:  # a rank died: for good
            return JSONResponse(P.error_body(str(engine.tp.failed), "server_error"), status_code=503)
        if state["draining"]:
            return JSONResponse(P.error_body("the server is shutting down", "server_error", "shutting_down"),
                                status_code=503)
        return {"status": "ok"}

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": 0, "owned_by": "qkv",
                "max_model_len": engine.max_model_len}

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=auth)
    async def model(name: str):
        check_model(name)
        return model_card()

    @app.get("/metrics", dependencies=auth)
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version", dependencies=auth)
    async def version():
        from qkv import __version__

        return {"version": __version__}

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(request: Request):
        req = await parse(request, T.TokenizeRequest, limits.max_body_bytes)
        check_model(req.model)
        if llm.tokenizer is None:
            raise P.APIError(400, f"model {model_name!r} has no tokenizer", code="invalid_value")
        if req.prompt is not None:
            special = True if req.add_special_tokens is None else req.add_special_tokens
            ids = await asyncio.to_thread(llm.tokenizer.encode, req.prompt, special)
        else:
            check_chat_template()
            try:
                tools = TC.check_tools(req.tools, "auto")
            except TC.ToolError as e:
                raise P.APIError(400, str(e), code="invalid_value", param=e.field) from None
            msgs, kw = chat_inputs([m.plain() for m in req.messages], req.chat_template_kwargs, tools)
            ids = await asyncio.to_thread(render_chat, msgs, kw, req.add_generation_prompt)
            if req.add_special_tokens:
                ids = T.with_special_tokens(llm.tokenizer, ids)
        return T.tokenize_response(llm, ids, engine.max_model_len, req.return_token_strs)

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(request: Request):
        req = await parse(request, T.DetokenizeRequest, limits.max_body_bytes)
        check_model(req.model)
        if llm.tokenizer is None:
            raise P.APIError(400, f"model {model_name!r} has no tokenizer", code="invalid_value")
        return T.detokenize(llm, engine, req.tokens)

    # ---------------------------------------------------------------- generation
    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise P.APIError(404, f"model {name!r} does not exist; this server serves {model_name!r}",
                             "not_found_error", "model_not_found", "model")

    def check_request(req: P._Sampling, num_prompts: int) -> None:
        if state["draining"]:
            raise P.APIError(503, "the server is shutting down", "server_error", "shutting_down")
        check_model(req.model)
        refuse_text_request(llm, model_name)  # Whisper takes audio, on /v1/audio/transcriptions
        if req.n > limits.max_n:
            raise P.APIError(400, f"n={req.n} exceeds this server's limit of {limits.max_n}",
                             code="invalid_value", param="n")
        if num_prompts > limits.max_prompts:
            raise P.APIError(400, f"{num_prompts} prompts exceed this server's limit of {limits.max_prompts}",
                             code="invalid_value", param="prompt")
        try:
            req.check_supported()
        except P.Unsupported as e:
            raise P.APIError(400, str(e), code="unsupported_parameter", param=e.field) from None

    defaults = dict(getattr(llm, "generation_defaults", None) or {})  # generation_config.json
    if defaults:
        print("[qkv] request defaults from generation_config.json: "
              + ", ".join(f"{k}={v}" for k, v in defaults.items()), file=sys.stderr, flush=True)

    def sampling(req: P._Sampling, max_tokens: int, prompt_logprobs: int | None = None,
                 structured=None) -> SamplingParams:
        """The request's SamplingParams: what it leaves out (None) comes from the model's
        generation_config.json, as in vLLM, then from SamplingParams' own defaults."""
        chosen = {k: v for k, v in defaults.items() if k != "max_tokens"}
        for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty",
                  "presence_penalty"):
            if getattr(req, k) is not None:
                chosen[k] = getattr(req, k)
        bias = {int(k): v for k, v in req.logit_bias.items()} if req.logit_bias else None
        try:
            params = SamplingParams(n=req.n, max_tokens=max_tokens, seed=req.seed, stop=req.stop,
                                  stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
                                  min_tokens=req.min_tokens, logit_bias=bias, bad_words=req.bad_words,
                                  allowed_token_ids=req.allowed_token_ids, logprobs=req.logprobs_k(),
                                  prompt_logprobs=req.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
                                  include_stop_str_in_output=req.include_stop_str_in_output,
                                  skip_special_tokens=req.skip_special_tokens, structured_outputs=structured,
                                  **chosen)
        except ValueError as e:  # SamplingParams' messages begin with the field's name
            name = str(e).split(" ", 1)[0]
            raise P.APIError(400, str(e), code="invalid_value",
                             param=name if name in SamplingParams.__dataclass_fields__ else None) from None
        # Token ids past the vocabulary, here rather than in the engine: one >= 2**64 cannot
        # even be sent to the engine process.
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("allowed_token_ids", params.allowed_token_ids),
                          ("logit_bias", list(params.logit_bias or ()))):
            if ids:
                try:
                    engine.check_token_ids(ids, name)
                except ValueError as e:
                    raise P.APIError(400, str(e), code="invalid_value", param=name) from None
        if structured is not None and params.allowed_token_ids is not None:  # none the grammar allows first
            try:
                engine.grammars.check_allowed(structured, params.allowed_token_ids, constraint(req)[1])
            except ValueError as e:
                raise P.APIError(400, str(e), code="invalid_value", param="allowed_token_ids") from None
        return params

    from .audio import add_transcription_route, refuse_text_request  # /v1/audio/transcriptions (Whisper)

    add_transcription_route(app, llm, auth=auth, check_model=check_model, state=state,
                            engine_loop=lambda: holder["loop"])

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request):
        req = await parse(request, P.CompletionRequest, limits.max_body_bytes)
        prompts = req.prompts()
        check_request(req, len(prompts))
        structured = await compiled_constraint(engine, req)  # a bad schema is a 400 naming its field
        # Off the event loop: a long prompt's tokenization must not stall other streams.
        ids = await asyncio.to_thread(lambda: [encode(llm, p) for p in prompts])
        max_tokens = req.max_tokens or 16  # OpenAI's default for completions
        # echo with logprobs: the prompt's tokens come with their logprobs too, as at OpenAI.
        plp = req.logprobs if req.echo and req.logprobs is not None else None
        if plp is not None and req.prompt_logprobs is not None:
            plp = max(plp, req.prompt_logprobs)
        # Token ids are echoed with their special tokens: the logprobs' tokens and text_offset
        # name every prompt token, so the echoed text must hold each of them (skipping "<|im_start|>"
        # shifted every later offset).
        echo = [p if isinstance(p, str) else llm.tokenizer.decode(p, skip_special_tokens=False)
                if llm.tokenizer else "" for p in prompts] if req.echo else None
        return await generate(request, req, ids, sampling(req, max_tokens, plp, structured), chat=False, echo=echo)

    def render_chat(messages: list[dict], kwargs: dict, add_generation_prompt: bool) -> list[int]:
        """The chat prompt's ids. The messages' fault (the template refused them) is a 400;
        a template that breaks on its own is the model's fault, a 500 that says so."""
        try:
            return llm.chat_prompt(messages, add_generation_prompt=add_generation_prompt,
                                   special_tokens_in_content=allow_special_tokens_in_content, **kwargs)
        except ChatTemplateLimitError as e:  # a template that loops or balloons: the model's fault
            log.warning("chat template of %s stopped: %s", model_name, e)
            raise P.APIError(500, str(e), "server_error", "chat_template_error") from None
        except ChatTemplateRenderError as e:  # broke inside on valid messages: the model's fault
            log.warning("chat template of %s failed: %s", model_name, e)
            raise P.APIError(500, f"the model's chat template failed to render: {e}",
                             "server_error", "chat_template_error") from None
        except ValueError as e:  # ChatTemplateError: the template rejected the messages
            raise P.APIError(400, str(e), code="invalid_messages", param="messages") from None
        except Exception as e:  # jinja2 syntax errors, a TypeError inside the template, ...
            log.warning("chat template of %s failed: %s: %s", model_name, type(e).__name__, e)
            raise P.APIError(500, f"the model's chat template failed to render: {type(e).__name__}: {e}",
                             "server_error", "chat_template_error") from None

    def check_chat_template() -> None:
        if llm.tokenizer is None or not llm.tokenizer.chat_template:
            raise P.APIError(400, f"model {model_name!r} has no chat template: start the server with "
                             "--chat-template FILE (a Jinja chat template), or use /v1/completions",
                             code="no_chat_template", param="messages")

    def chat_inputs(messages: list[dict], kwargs: dict | None, tools: list | None) -> tuple[list[dict], dict]:
        """The template's messages and extra variables: tools (if any) and history tool calls
        as the template expects them; a 400 for what the template would drop."""
        # /tokenize's chat form too: a reserved name was a 500 (a second `messages`) or slipped
        # past the tool checks (`tools`).
        if bad := [k for k in (kwargs or {}) if k in P.TEMPLATE_RESERVED]:
            raise P.APIError(400, f"chat_template_kwargs: {bad[0]!r} is set by the server, not by the request",
                             code="unsupported_parameter", param="chat_template_kwargs")
        try:
            TC.check_template(llm.tokenizer.chat_template, tools, messages)
            messages = TC.template_messages(messages)
        except TC.ToolError as e:
            raise P.APIError(400, str(e), code="unsupported_parameter" if e.field == "tools" or
                             e.field.endswith("tool_calls") else "invalid_value", param=e.field) from None
        return messages, {**(kwargs or {}), **({"tools": tools} if tools else {})}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request):
        req = await parse(request, P.ChatCompletionRequest, limits.max_body_bytes)
        check_request(req, 1)
        structured = await compiled_constraint(engine, req)
        check_chat_template()
        tools = req.template_tools()
        msgs, kw = chat_inputs(req.plain_messages(), req.chat_template_kwargs, tools)
        ids = await asyncio.to_thread(render_chat, msgs, kw, req.add_generation_prompt)
        if not ids:
            raise P.APIError(400, "the chat prompt is empty: at least one token is needed", code="invalid_value",
                             param="messages")
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:
            max_tokens = default_max_tokens(engine, len(ids))
            for cap in (limits.default_max_tokens, defaults.get("max_tokens")):  # generation_config's max_new_tokens
                if cap is not None:
                    max_tokens = min(max_tokens, cap)
        tool_parsing = TC.Parsing(1 if req.parallel_tool_calls is False else None) if tools else None
        return await generate(request, req, [ids], sampling(req, max_tokens, structured=structured), chat=True,
                              tools=tool_parsing)

    async def generate(request: Request, req: P._Sampling, prompts: list[list[int]], params: SamplingParams,
                       chat: bool, echo: list[str] | None = None, tools: TC.Parsing | None = None):
        loop: EngineLoop = holder["loop"]
        check_fits(engine, prompts, params)  # here, not behind whatever the engine is computing
        if state["draining"]:  # it may have begun while this request was tokenized
            raise P.APIError(503, "the server is shutting down", "server_error", "shutting_down")
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{request_id(request)}"  # X-Request-Id, or a fresh one
        # The engine's id is unique even when clients reuse an X-Request-Id: two live requests with
        # one id clashed (the second refused; under qkv serve the first one's tokens were lost).
        engine_id = f"{rid}#{next(_submissions)}"
        try:
            stream = loop.submit(prompts, params, engine_id, request_salt(request.state.tenant, req.cache_salt))
        except QueueFull as e:
            raise P.APIError(429, str(e), "server_error", "queue_full",
                             headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except EngineDead as e:
            raise P.APIError(500, str(e), "server_error", "engine_dead") from None
        except ValueError as e:  # the engine process could not be sent it (engine_client.py)
            raise P.APIError(400, str(e), code="invalid_value") from None
        state["inflight"] += 1
        try:
            return await respond(request, req, prompts, params, chat, loop, rid, stream, echo, tools)
        except BaseException:
            state["inflight"] -= 1
            raise

    def done() -> None:
        state["inflight"] -= 1

    def token_text(token: int) -> str:
        """One token's text, as the engine writes it in logprobs."""
        return llm.tokenizer.decode([token], skip_special_tokens=False) if llm.tokenizer is not None else ""

    token_bytes = llm.tokenizer.token_bytes if llm.tokenizer is not None else None

    async def respond(request: Request, req: P._Sampling, prompts: list[list[int]], params: SamplingParams,
                      chat: bool, loop: EngineLoop, rid: str, stream: Stream, echo: list[str] | None,
                      tools: TC.Parsing | None = None):
        """The response; ``done`` is called once it has been sent (a stream: when it closes)."""
        try:
            await asyncio.wrap_future(stream.added)
        except RequestTooLarge as e:
            raise P.APIError(400, str(e), code="context_length_exceeded", param="max_tokens") from None
        except PoolBusy as e:  # prompt_logprobs' scoring found too few free blocks: the load's fault, not the input's
            raise P.APIError(429, f"the server is busy: {e}; retry later", "server_error", "server_busy",
                             headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ShuttingDown as e:
            raise P.APIError(503, str(e), "server_error", "shutting_down") from None
        except EngineDead as e:
            raise P.APIError(500, str(e), "server_error", "engine_dead") from None
        except ValueError as e:
            raise P.APIError(400, str(e), code="invalid_value") from None
        except BaseException:
            loop.abort(stream)  # cancelled while waiting: whatever was added must not run on
            raise
        answer = _Answer(rid, model_name, prompts, params.n, stream, chat, params.logprobs, echo,
                         req.prompt_logprobs is not None, tools, token_text, token_bytes)
        if req.stream:
            return SSEResponse(answer.events(loop, req.include_usage), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache"}, on_close=done)
        body = await answer.collect(loop, request)
        done()
        return JSONResponse(body)

    return app


# -------------------------------------------------------------------- helpers
async def parse(request: Request, model: type, max_bytes: int):
    """The body as ``model``; any problem (size, JSON, types) is a 400 in OpenAI's shape."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise P.APIError(400, f"request body of {declared} bytes exceeds the limit of {max_bytes}",
                         code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise P.APIError(400, f"request body exceeds the limit of {max_bytes} bytes", code="request_too_large")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise P.APIError(400, f"malformed JSON body: {e}", code="invalid_json") from None
    except RecursionError:  # the parser's own depth limit: no OpenAI field nests that deep
        raise P.APIError(400, "the JSON body nests too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise P.APIError(400, "the JSON body must be an object", code="invalid_json")
    if (where := P.bad_string(data)) is not None:
        raise P.APIError(400, f"{where}: not valid Unicode text (a lone surrogate escape such as \\ud800?)",
                         code="invalid_value", param=where)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise P.APIError(400, P.validation_message(e), code="invalid_value", param=P.validation_param(e)) from None
    except RecursionError:
        raise P.APIError(400, "the JSON body nests too deeply", code="invalid_json") from None


def check_fits(engine, prompts: list[list[int]], params: SamplingParams) -> None:
    """Refuse, in the handler, what the scheduler would refuse on the engine thread: a request
    past the context, with more samples than seats, or larger than the KV pool could ever hold.
    Reads only fixed sizes, so it is safe off the engine thread; the scheduler checks again."""
    limit = engine.max_model_len
    for ids in prompts:
        total = len(ids) + params.max_tokens
        if total > limit:
            raise P.APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                             f"exceeds the maximum context length of {limit} tokens",
                             code="context_length_exceeded", param="max_tokens")
        if not engine.kv.can_ever_fit(total):
            have = [g.pool.num_blocks for g in engine.kv.groups]
            raise P.APIError(400, f"prompt + max_tokens = {total} tokens needs {engine.kv.blocks_needed(total)} "
                             f"KV blocks, but the pool has only {have}; lower max_tokens",
                             code="context_length_exceeded", param="max_tokens")
    seats = engine.scheduler.max_num_seqs
    if params.n > seats:
        raise P.APIError(400, f"n={params.n} samples run as {params.n} sequences, but this server runs at most "
                         f"{seats} at once", code="invalid_value", param="n")


def default_max_tokens(engine, prompt_len: int) -> int:
    """For a chat without max_tokens: the rest of the context, or as much as the KV pool can
    ever hold when that is less. When nothing fits, a value the engine rejects with numbers.
    (Reads only the pool's fixed sizes, so it is safe off the engine thread.)"""
    hi = engine.max_model_len - prompt_len
    if hi < 1 or not engine.kv.can_ever_fit(prompt_len + 1):
        return max(1, hi)
    lo = 1  # fits; find the largest that does
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if engine.kv.can_ever_fit(prompt_len + mid) else (lo, mid - 1)
    return lo


def encode(llm, prompt: str | list[int]) -> list[int]:
    """The prompt's ids, checked as the engine checks them (empty, out of the vocabulary)."""
    try:
        return llm.engine.check_token_ids(llm.encode(prompt), "prompt")
    except ValueError as e:  # also: no tokenizer for a text prompt
        raise P.APIError(400, str(e), code="invalid_value", param="prompt") from None


class SSEChunks:
    """The ``data: ...`` lines of one stream. ``text`` writes the most common chunk, one
    choice's text without logprobs, around a template: the same bytes as ``event`` with that
    choice (the same keys in the same order) at a fraction of the cost, which is paid per
    stream per step and bounds how many streams one front end keeps fed."""

    def __init__(self, rid: str, model: str, chat: bool):
        self.rid, self.model, self.chat = rid, model, chat
        head = self.event([{"index": 0}])
        self._head = head[:head.index('"choices":[') + len('"choices":[')]
        self._created = self._head[self._head.index('"created":') + len('"created":'):].split(",", 1)[0]
        self._key, self._end = ('"delta":{"content":', "}") if chat else ('"text":', "")

    def event(self, choices: list[dict], use: dict | None = None) -> str:
        body = P.completion_response(self.rid, self.model, choices, use, self.chat, chunk=True)
        return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def text(self, index: int, text: str, finish_reason: str | None) -> str:
        now, head = str(int(time.time())), self._head
        if now != self._created:  # "created" is the time of each chunk, as event() writes it
            head = head.replace(f'"created":{self._created},', f'"created":{now},', 1)
        return (f'{head}{{"index":{index},{self._key}{json.dumps(text, ensure_ascii=False)}{self._end},'
                f'"logprobs":null,"finish_reason":{json.dumps(finish_reason)}}}]}}\n\n')


class _Answer:
    """Turns the engine outputs of one submission into an OpenAI response or SSE events.
    Choice ``p * n + i`` is sample ``i`` of prompt ``p``. ``logprobs``: top-k per token (None:
    not asked); ``echo``: each prompt's text, put before its completion (completions only);
    ``prompt_logprobs``: add vLLM's ``prompt_logprobs`` (per choice for completions, per
    response for chat). ``token_text``: a token's text (echo's first prompt token has no logprob
    entry to take it from)."""

    def __init__(self, rid: str, model: str, prompts: list[list[int]], n: int, stream: Stream, chat: bool,
                 logprobs: int | None = None, echo: list[str] | None = None, prompt_logprobs: bool = False,
                 tools: TC.Parsing | None = None, token_text=lambda token: "", token_bytes=None):
        self.rid, self.model, self.n, self.stream, self.chat = rid, model, n, stream, chat
        self.logprobs, self.echo, self.want_prompt_logprobs = logprobs, echo, prompt_logprobs
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.prompt_of = {h: p for p, h in enumerate(stream.request_ids)}
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.finished = 0
        self.sent: dict[int, int] = {}  # choice -> output tokens whose logprobs were streamed
        self.offsets: dict[int, int] = {}  # choice -> text_offset of its next streamed token
        self.tools = tools  # parse <tool_call> blocks out of chat answers (None: no tools)
        self.parsers: dict[int, TC.ChoiceStream] = {}  # choice -> its streaming tool-call parser
        self._error: BaseException | None = None  # met by _drain after outputs it returned
        self.token_text = token_text
        self.token_bytes = token_bytes  # a token's raw bytes for chat logprobs (None: its text's UTF-8)

    def _index(self, out) -> int:
        return self.prompt_of[out.request_id.split("/", 1)[0]] * self.n + out.index

    def _account(self, out) -> None:
        if out.finished:
            self.finished += 1
            self.completion_tokens += len(out.token_ids)
            if out.index == 0:  # siblings share their parent's prompt blocks
                self.cached_tokens += out.num_cached_tokens

    def _usage(self) -> dict:
        return P.usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)

    def _logprobs(self, out, start: int, with_prompt: bool) -> dict | None:
        """The logprobs of output tokens ``start..`` (and with ``with_prompt`` and echo, of the
        prompt's tokens first)."""
        if self.logprobs is None:
            return None
        tokens, entries = out.token_ids[start:], out.logprobs[start:]
        if self.chat:
            return P.chat_logprobs(tokens, entries, self.logprobs, self.token_bytes)
        i = self._index(out)
        if with_prompt and self.echo is not None:
            prompt = out.prompt_token_ids
            lps = P.completion_logprobs(prompt + tokens, (out.prompt_logprobs or []) + entries,
                                        first_text=self.token_text(prompt[0]))
        else:
            # A stream's chunk goes on where the choice's previous chunk ended, not at its start.
            offset = self.offsets.get(i, len(self._echo(out)))
            lps = P.completion_logprobs(tokens, entries, offset)
        if lps["tokens"]:
            self.offsets[i] = lps["text_offset"][-1] + len(lps["tokens"][-1])
        return lps

    def _echo(self, out) -> str:
        return self.echo[self._index(out) // self.n] if self.echo is not None else ""

    async def _next(self):
        item = await self.stream.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def _drain(self) -> list:
        """Every output queued now (at least one: waits for it). An error after some outputs
        is raised by the next call."""
        if self._error is not None:
            raise self._error
        q = self.stream.queue
        item, items = await q.get(), []
        while True:
            if isinstance(item, BaseException):
                if not items:
                    raise item
                self._error = item
                return items
            items.append(item)
            if q.empty():
                return items
            item = q.get_nowait()

    async def collect(self, loop: EngineLoop, request: Request) -> dict:
        """Wait for every sample; abort them all if the client hangs up first."""
        final: dict[int, object] = {}

        async def gather():
            while self.finished < self.stream.num_samples:
                out = await self._next()
                self._account(out)
                if out.finished:
                    final[self._index(out)] = out

        work = asyncio.ensure_future(gather())
        try:
            await until_done_or_gone(request, work)
        finally:
            if not work.done():
                work.cancel()
                loop.abort(self.stream)
        if work.cancelled():
            raise P.APIError(499, "client disconnected", code="client_closed")
        try:
            work.result()
        except ShuttingDown as e:
            raise P.APIError(503, str(e), "server_error", "shutting_down") from None
        except EngineDead as e:
            raise P.APIError(500, str(e), "server_error", "engine_dead") from None
        except Exception as e:
            raise P.APIError(500, f"generation failed: {e}", "server_error") from None
        choices = []
        for i in sorted(final):
            out = final[i]
            c = P.choice(i, self._echo(out) + out.text, out.finish_reason, chat=self.chat, chunk=False,
                         logprobs=self._logprobs(out, 0, True))
            if self.tools is not None:
                TC.answer_choice(c, self.tools)
            if self.want_prompt_logprobs and not self.chat:
                c["prompt_logprobs"] = P.vllm_prompt_logprobs(out.prompt_logprobs)
            choices.append(c)
        body = P.completion_response(self.rid, self.model, choices, self._usage(), self.chat)
        if self.want_prompt_logprobs and self.chat and final:
            body["prompt_logprobs"] = P.vllm_prompt_logprobs(final[min(final)].prompt_logprobs)
        return body

    async def events(self, loop: EngineLoop, include_usage: bool) -> AsyncIterator[str]:
        """SSE lines ending with ``data: [DONE]``. If the consumer stops early (disconnect),
        the ``finally`` aborts the request so its blocks return to the pool."""
        chunks = SSEChunks(self.rid, self.model, self.chat)
        event, text_event = chunks.event, chunks.text

        try:
            if self.chat:  # the role first, as OpenAI does
                yield event([P.choice(i, "", None, True, True, first=True)
                             for i in range(self.stream.num_samples)])
            while self.finished < self.stream.num_samples:
                try:
                    outs = await self._drain()
                except Exception as e:
                    code = "shutting_down" if isinstance(e, ShuttingDown) else \
                        "engine_dead" if isinstance(e, EngineDead) else None
                    yield f"data: {json.dumps(P.error_body(str(e), 'server_error', code))}\n\n"
                    break
                # Outputs that queued up while this stream was busy go out as one chunk per
                # choice and one write: a lagging stream catches up instead of falling further behind.
                merged: dict[int, list] = {}  # choice -> [its last output, the text of all of them]
                for out in outs:
                    self._account(out)
                    i = self._index(out)
                    if i in merged:
                        merged[i][0] = out
                        merged[i][1] += out.text_delta
                    else:
                        merged[i] = [out, out.text_delta]
                lines = []
                for i, (out, delta) in merged.items():
                    if not (delta or out.finished):
                        continue
                    first = i not in self.sent
                    # A chat chunk that only finishes carries an empty delta, not "content": "".
                    text = delta if delta or not self.chat else None
                    if first and self.echo is not None:
                        text = self._echo(out) + (text or "")
                    lps = self._logprobs(out, self.sent.get(i, 0), first)
                    self.sent[i] = out.num_tokens - out.num_prompt_tokens  # not len(token_ids): a copy
                    if self.tools is not None:  # content and tool-call deltas, in order
                        parser = self.parsers.setdefault(i, TC.ChoiceStream(self.tools))
                        lines += [event([c]) for c in parser.chunks(i, text or "", out.finish_reason, lps)]
                        continue
                    if lps is None and text is not None:
                        lines.append(text_event(i, text, out.finish_reason))
                        continue
                    lines.append(event([P.choice(i, text, out.finish_reason, self.chat, True, logprobs=lps)]))
                if lines:
                    yield "".join(lines)
            else:
                if include_usage:
                    yield event([], self._usage())
            yield "data: [DONE]\n\n"
        finally:
            if self.finished < self.stream.num_samples:
                loop.abort(self.stream)


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the body has been read, so only disconnect can come)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_done_or_gone(request: Request, work: asyncio.Future) -> None:
    """Wait for ``work`` or for the client to hang up, whichever comes first (``work.done()``
    tells which). Uvicorn never cancels a handler whose client has gone, so a long wait must
    watch for it, or its requests would hold their pages and the engine's steps to the end."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always closes its generator, whichever way the response ends,
    so the generator's ``finally`` (the abort) runs now rather than at garbage collection;
    then it calls ``on_close`` (once)."""

    def __init__(self, *args, on_close=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                if self._on_close is not None:
                    self._on_close()
                    self._on_close = None
