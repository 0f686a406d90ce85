"""Vercel's entry point: the same ASGI app the other platforms run."""

from src.main import app

__all__ = ["app"]
