"""`kimi-engine serve`: an OpenAI-compatible HTTP server over one engine (see docs/serve.md)."""

from .app import create_app

__all__ = ["create_app"]
