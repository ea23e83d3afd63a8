"""``POST /v1/audio/transcriptions``: OpenAI's multipart transcription endpoint.

Fields: ``file`` (required), ``model``, ``language``, ``response_format`` (json, text,
verbose_json). Fields qkv does not honour (``prompt``, a non-zero ``temperature``,
``timestamp_granularities``, other formats) are refused by name. The upload is decoded
before the model is asked, so a malformed file is a 400 naming it. The model's
``transcribe(samples, language=, response_format=)`` runs in a worker thread; a model
without it (this qkv's LLM before Whisper support) gives a 501 saying so.
"""

from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse

from qkv.audio.errors import AudioError
from qkv.audio.transcribe import RESPONSE_FORMATS

from . import protocol as P

MAX_AUDIO_BYTES = 25 * 1024 * 1024  # OpenAI's own limit for one upload
NOT_MERGED = "Whisper model support is not merged yet: this server's model cannot transcribe"
_KNOWN = {"file", "model", "language", "response_format", "temperature"}


def add_transcription_route(app, llm, *, auth, check_model, state: dict) -> None:
    """Register the endpoint on ``app``. ``check_model(name)`` raises the server's 404 for a
    model it does not serve; ``state["draining"]`` refuses new work during shutdown."""

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
        fields = {k: v for k, v in form.multi_items()}
        for name in sorted(set(fields) - _KNOWN):
            raise P.APIError(400, f"{name} is not supported by this server", code="unsupported_parameter", param=name)
        check_model(_text(fields, "model"))
        response_format = _text(fields, "response_format") or "json"
        if response_format not in RESPONSE_FORMATS:
            raise P.APIError(400, f"response_format {response_format!r} is not supported (one of "
                             f"{', '.join(RESPONSE_FORMATS)})", code="unsupported_parameter", param="response_format")
        temperature = _text(fields, "temperature")
        if temperature not in (None, "0", "0.0"):
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
        if not callable(getattr(llm, "transcribe", None)):
            raise P.APIError(501, NOT_MERGED, "server_error", "not_implemented")
        try:
            result = await asyncio.to_thread(llm.transcribe, samples, language=_text(fields, "language"),
                                             response_format=response_format)
        except AudioError as e:
            field = str(e).partition(":")[0]
            raise P.APIError(400, str(e), code="invalid_value", param=field if field in _KNOWN else None) from None
        if isinstance(result, str):
            return PlainTextResponse(result)
        return JSONResponse(result)


def _text(fields: dict, name: str) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise P.APIError(400, f"{name} must be a text field", code="invalid_value", param=name)
    return value.strip() or None
