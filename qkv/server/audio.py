"""``POST /v1/audio/transcriptions``: OpenAI's multipart transcription endpoint.

Fields: ``file`` (required), ``model``, ``language``, ``response_format`` (json, text,
verbose_json). Fields qkv does not honour (``prompt``, a non-zero ``temperature``,
``timestamp_granularities``, other formats) are refused by name. The upload is decoded
before the model is asked, so a malformed file is a 400 naming it; a model that is not
Whisper is a 400 naming the model.

``transcribe`` (windows, log-mel, prompt, segments) runs in a worker thread, but its decoding
does not touch the engine there: each ``generate`` call submits the windows' requests, with
their log-mel as ``encoder_features``, to the server's one engine thread (EngineLoop), so
they batch with every other request. If the client hangs up, the requests are aborted and
the worker's wait is cancelled, so nothing keeps its blocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse

from qkv.audio.errors import AudioError
from qkv.audio.transcribe import RESPONSE_FORMATS

from . import protocol as P
from .engine_loop import QueueFull, ShuttingDown

MAX_AUDIO_BYTES = 25 * 1024 * 1024  # OpenAI's own limit for one upload
_KNOWN = {"file", "model", "language", "response_format", "temperature"}


def refuse_text_request(llm, model_name: str) -> None:
    """A completions/chat request to a speech model is a 400 saying which endpoint to use."""
    if llm.config.model_type == "whisper":
        raise P.APIError(400, f"model {model_name!r} is a speech-to-text model (Whisper): it takes audio "
                         "through POST /v1/audio/transcriptions, not text prompts", code="invalid_value",
                         param="model")


def add_transcription_route(app, llm, *, auth, check_model, state: dict, engine_loop) -> None:
    """Register the endpoint on ``app``. ``check_model(name)`` raises the server's 404 for a
    model it does not serve; ``state["draining"]`` refuses new work during shutdown;
    ``engine_loop()`` is the running EngineLoop that owns ``llm.engine``."""
    from qkv.audio.speech_engine import check_whisper, speech_model, speech_params, suppression

    from .app import until_done_or_gone

    ids = itertools.count()
    suppress = suppression(llm.config, llm.source) if llm.config.model_type == "whisper" else ([], [])

    @app.post("/v1/audio/transcriptions", dependencies=auth)
    async def transcriptions(request: Request):
        if state.get("draining"):
            raise P.APIError(503, "the server is shutting down", "server_error", "shutting_down")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_AUDIO_BYTES + 65536:
            raise P.APIError(400, f"upload of {declared} bytes exceeds the limit of {MAX_AUDIO_BYTES}",
                             code="request_too_large", param="file")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise P.APIError(400, "send multipart/form-data with a 'file' field", code="invalid_value", param="file")
        try:
            form = await request.form(max_files=1, max_fields=16)
        except Exception as e:  # the multipart parser's errors: a malformed body
            raise P.APIError(400, f"malformed multipart body: {e}", code="invalid_value", param="file") from None
        fields = {}
        for k, v in form.multi_items():  # a dict would keep the last value and drop the others unread
            if k in fields and k in _KNOWN:
                raise P.APIError(400, f"{k} is given more than once", code="invalid_value", param=k)
            fields[k] = v
        for name in sorted(set(fields) - _KNOWN):
            raise P.APIError(400, f"{name} is not supported by this server", code="unsupported_parameter", param=name)
        check_model(_text(fields, "model"))
        response_format = _text(fields, "response_format") or "json"
        if response_format not in RESPONSE_FORMATS:
            raise P.APIError(400, f"response_format {response_format!r} is not supported (one of "
                             f"{', '.join(RESPONSE_FORMATS)})", code="unsupported_parameter", param="response_format")
        temperature = _text(fields, "temperature")
        if temperature is not None and _number(temperature) != 0:  # "0", "0.00", "0e0": all greedy
            raise P.APIError(400, "temperature: only greedy decoding (0) is supported", code="unsupported_parameter",
                             param="temperature")
        upload = fields.get("file")
        if upload is None or isinstance(upload, str):
            raise P.APIError(400, "the 'file' field (an audio upload) is required", code="invalid_value", param="file")
        data = await upload.read(MAX_AUDIO_BYTES + 1)
        if len(data) > MAX_AUDIO_BYTES:
            raise P.APIError(400, f"file exceeds the limit of {MAX_AUDIO_BYTES} bytes", code="request_too_large",
                             param="file")
        from qkv.audio.io import load_audio

        try:
            samples = await asyncio.to_thread(load_audio, data, None, upload.filename or "file")
        except AudioError as e:
            raise P.APIError(400, str(e), code="invalid_audio", param="file") from None
        try:
            check_whisper(llm.config, llm.tokenizer, llm.source)
        except ValueError as e:
            raise P.APIError(400, str(e), code="invalid_value", param="model") from None
        aloop = asyncio.get_running_loop()
        rid = f"transcr-{uuid.uuid4().hex[:16]}"
        streams: list = []
        waits: list[concurrent.futures.Future] = []
        closed = False

        async def decode(features, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
            loop = engine_loop()
            stream = loop.submit(prompts, speech_params(suppress, max_new_tokens), f"{rid}-{next(ids)}", None,
                                 list(features))
            streams.append(stream)
            await asyncio.wrap_future(stream.added)
            final = {}
            while len(final) < stream.num_samples:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    final[item.request_id] = item
            return [list(final[r].token_ids) for r in stream.request_ids]

        def generate(features, prompts, max_new_tokens):  # in the worker thread: wait for the engine thread
            if closed:
                raise ShuttingDown("the transcription was abandoned")
            wait = asyncio.run_coroutine_threadsafe(decode(features, prompts, max_new_tokens), aloop)
            waits.append(wait)
            return wait.result()

        model = speech_model(llm, generate)
        state["inflight"] = state.get("inflight", 0) + 1  # a graceful shutdown waits for this answer
        try:
            work = asyncio.ensure_future(asyncio.to_thread(_transcribe, model, samples, _text(fields, "language"),
                                                           response_format))
            await until_done_or_gone(request, work)
            if not work.done():  # the client hung up: the finally below aborts its windows
                work.cancel()
                raise P.APIError(499, "client disconnected", code="client_closed")
            result = work.result()
        except AudioError as e:
            field = str(e).partition(":")[0]
            raise P.APIError(400, str(e), code="invalid_value", param=field if field in _KNOWN else None) from None
        except QueueFull as e:
            raise P.APIError(429, str(e), "server_error", "queue_full") from None
        except ShuttingDown as e:
            raise P.APIError(503, str(e), "server_error", "shutting_down") from None
        except ValueError as e:  # the engine refused a request (e.g. too large for the cache)
            raise P.APIError(400, str(e), code="invalid_value") from None
        finally:  # a client gone (this task cancelled) or an error: no request of ours may run on
            closed = True
            state["inflight"] -= 1
            for w in waits:
                w.cancel()
            for st in streams:
                engine_loop().abort(st)
        if isinstance(result, str):
            return PlainTextResponse(result)
        return JSONResponse(result)


def _transcribe(model, samples, language, response_format):
    from qkv.audio.transcribe import transcribe

    return transcribe(model, samples, language, response_format=response_format)


def _text(fields: dict, name: str) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise P.APIError(400, f"{name} must be a text field", code="invalid_value", param=name)
    return value.strip() or None


def _number(text: str) -> float | None:
    """A form field's number (None: not one; a form sends every value as text)."""
    try:
        return float(text)
    except ValueError:
        return None
