"""`kimi-engine serve`: an OpenAI-compatible HTTP server over one engine (the README says how to run it)."""

from .app import create_app

__all__ = ["create_app"]
