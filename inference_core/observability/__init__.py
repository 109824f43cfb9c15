"""What operators see: request ids, structured logs, Prometheus metrics and the request span."""

from inference_core.observability.context import RequestContext, RequestRecord, record_of
from inference_core.observability.logs import configure_logging
from inference_core.observability.metrics import Metrics

__all__ = ["Metrics", "RequestContext", "RequestRecord", "configure_logging", "record_of"]
