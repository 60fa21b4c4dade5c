"""The OpenAI-compatible HTTP server (`lorax-core serve`): adapters are models."""
from lorax_core.server.app import create_app

__all__ = ["create_app"]
