"""Settings: every knob of the gateway, read once from ``INFERENCE_*`` variables.

Parsing happens in one place so that a bad value stops start-up with a single line naming the
variable, instead of failing on the first request.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import AnyHttpUrl, Field, SecretStr, TypeAdapter, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "INFERENCE_"
_URL = TypeAdapter(AnyHttpUrl)


class ProviderType(StrEnum):
    VLLM = "vllm"
    OPENAI = "openai"


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class LBPolicy(StrEnum):
    LEAST_OUTSTANDING = "least_outstanding"
    ROUND_ROBIN = "round_robin"
    LOAD_AWARE = "load_aware"
    PREFIX_AFFINITY = "prefix_affinity"


class LogFormat(StrEnum):
    JSON = "json"
    TEXT = "text"


class Settings(BaseSettings):
    """The gateway's configuration; each field is also the ``INFERENCE_<NAME>`` variable."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    provider_type: ProviderType = Field(ProviderType.VLLM, description="Backend kind: vllm or openai.")
    base_url: str = Field(
        "http://localhost:8000/v1",
        description="Backend API root, e.g. http://vllm:8000/v1; several replicas: comma-separated.",
    )
    api_key: SecretStr = Field(SecretStr("EMPTY"), description="Key sent to the backend (never logged).")
    model: str = Field("default-model", min_length=1, description="Model used when a request names none.")
    timeout: Annotated[float, Field(gt=0)] = Field(
        60.0, description="Seconds to wait for the backend's answer (for streams: between chunks)."
    )
    max_retries: Annotated[int, Field(ge=0)] = Field(3, description="Retry attempts for failed upstream calls.")
    max_connections: Annotated[int, Field(ge=1)] = Field(
        100,
        description="Keep-alive connections kept idle per backend replica. Requests never wait for a "
        "connection: one is opened when none is idle.",
    )
    max_concurrent_tasks: Annotated[int, Field(ge=1)] = Field(
        500, description="Requests in flight to the backend at once."
    )
    queue_size: Annotated[int, Field(ge=0)] = Field(10_000, description="Requests that may wait for a slot.")
    queue_timeout: Annotated[float, Field(gt=0)] = Field(
        30.0, description="Seconds a request may wait in the queue before a 503."
    )
    rate_limit_rps: Annotated[float, Field(ge=0)] = Field(
        0.0, description="Requests per second sent upstream (0: no limit)."
    )
    rate_limit_burst: Annotated[int, Field(ge=0)] = Field(
        0, description="Requests that may go upstream at once under the rate limit (0: one second's worth)."
    )
    retry_base_delay: Annotated[float, Field(ge=0)] = Field(
        0.5, description="Seconds of backoff before the first retry; doubles each retry, with full jitter."
    )
    retry_max_delay: Annotated[float, Field(ge=0)] = Field(
        8.0, description="Longest wait before a retry, including a backend's Retry-After."
    )
    max_batch_size: Annotated[int, Field(ge=1)] = Field(256, description="Most requests accepted in one batch call.")
    gateway_api_keys: SecretStr | None = Field(
        None, description="Keys clients must send as 'Authorization: Bearer' on /v1/* (key1,key2 or @file)."
    )
    cors_origins: str = Field("", description="Origins allowed by CORS, comma-separated, or * (empty: CORS off).")
    host: str = Field("0.0.0.0", description="Address the gateway listens on.")
    port: Annotated[int, Field(ge=0, le=65535)] = Field(8080, description="Port the gateway listens on.")
    drop_unsupported_params: bool = Field(
        True, description="Drop backend-specific parameters the backend lacks (false: answer 400)."
    )
    max_body_bytes: Annotated[int, Field(ge=1)] = Field(
        20 * 1024 * 1024, description="Largest request body accepted, in bytes."
    )
    log_level: LogLevel = Field(LogLevel.INFO, description="debug, info, warning or error.")
    log_format: LogFormat = Field(LogFormat.JSON, description="json (one object per line) or text.")
    probe_interval: Annotated[float, Field(gt=0)] = Field(
        5.0, description="Seconds between background health probes of the backend."
    )
    shutdown_grace: Annotated[float, Field(ge=0)] = Field(
        30.0, description="Seconds in-flight requests may take to finish after SIGTERM."
    )
    lb_policy: LBPolicy = Field(
        LBPolicy.LEAST_OUTSTANDING,
        description="Spreading over replicas: least_outstanding, round_robin, load_aware or prefix_affinity.",
    )
    response_affinity_size: Annotated[int, Field(ge=1)] = Field(
        100_000,
        description="Stored response ids whose replica the gateway remembers, for previous_response_id "
        "(least recently used forgotten first).",
    )
    eject_after: Annotated[int, Field(ge=1)] = Field(
        3, description="Consecutive failures (probes or requests) that take a replica out of rotation."
    )

    @field_validator("base_url")
    @classmethod
    def _urls(cls, value: str) -> str:
        roots = [part.strip() for part in value.split(",") if part.strip()]
        if not roots:
            raise ValueError("no URL given")
        for root in roots:
            _URL.validate_python(root)
        return ",".join(roots)

    @property
    def upstream_roots(self) -> tuple[str, ...]:
        """Each replica's API root, without a trailing slash."""
        return tuple(root.rstrip("/") for root in self.base_url.split(","))


class ConfigError(Exception):
    """A setting could not be parsed; ``str()`` is the one line shown to the operator."""


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment, with ``overrides`` (command-line flags) on top."""
    given = {name: value for name, value in overrides.items() if value is not None}
    try:
        return Settings(**given)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(describe(exc)) from None


def describe(exc: ValidationError) -> str:
    """One line per bad field: the variable, what it accepts, and never the value of a secret."""
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        field = str(error["loc"][0]) if error["loc"] else "?"
        lines.append(f"{ENV_PREFIX}{field.upper()}: {error['msg']}{_accepts(field)}")
    return "; ".join(lines)


def _accepts(field: str) -> str:
    return " (accepts: an http:// or https:// URL, or several separated by commas)" if field == "base_url" else ""
