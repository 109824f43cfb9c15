"""The engine: everything between a validated request and the transport."""

from inference_core.engine.admission import Admission, Lane
from inference_core.engine.backend import Backend
from inference_core.engine.call import Call, Outcome, Reply, Stream
from inference_core.engine.core import Engine
from inference_core.engine.fleet import Destination, Fleet
from inference_core.engine.gate import KeyGate
from inference_core.engine.ratelimit import RateLimiter
from inference_core.engine.retry import FallbackEvent, RetryEvent, RetryPolicy

__all__ = [
    "Admission",
    "Backend",
    "Call",
    "Destination",
    "Engine",
    "FallbackEvent",
    "Fleet",
    "KeyGate",
    "Lane",
    "Outcome",
    "RateLimiter",
    "Reply",
    "RetryEvent",
    "RetryPolicy",
    "Stream",
]
