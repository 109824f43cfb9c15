"""The engine: everything between a validated request and the transport."""

from inference_core.engine.admission import Admission
from inference_core.engine.core import Call, Engine, Outcome, Probe, Reply, Stream
from inference_core.engine.ratelimit import RateLimiter
from inference_core.engine.retry import RetryEvent, RetryPolicy

__all__ = [
    "Admission",
    "Call",
    "Engine",
    "Outcome",
    "Probe",
    "RateLimiter",
    "Reply",
    "RetryEvent",
    "RetryPolicy",
    "Stream",
]
