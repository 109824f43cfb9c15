"""The engine: everything between a validated request and the transport."""

from inference_core.engine.core import Call, Engine, Reply, Stream

__all__ = ["Call", "Engine", "Reply", "Stream"]
