"""qkv's OpenAI-compatible HTTP server: ``create_app(llm)``; ``qkv serve`` runs it with uvicorn."""

__all__ = ["create_app", "ServerLimits"]


def __getattr__(name):
    # fastapi and torch load only when a server is built, not when `qkv --help` lists commands.
    if name in __all__:
        from qkv.server import app

        return getattr(app, name)
    raise AttributeError(name)
