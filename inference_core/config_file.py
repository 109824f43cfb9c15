"""The routing part of the ``INFERENCE_CONFIG`` file: backends, and the model aliases routed over them.

config.py reads the file's top-level settings; this module builds its ``backends:`` and
``models:`` into a FleetConfig. A gateway without a file, or with a file that declares no
backends, serves one backend named ``default`` built from the settings, so the rest of the
gateway always sees a fleet.

Example::

    backends:
      local: {base_url: [http://vllm-0:8000/v1, http://vllm-1:8000/v1], api_key: ${VLLM_API_KEY}}
      openai: {provider: openai, base_url: https://api.openai.com/v1, models: [gpt-4o, "o*"]}
    models:
      chat: {target: local/meta-llama/Llama-3.1-8B-Instruct, fallbacks: [openai/gpt-4o-mini]}
    default_model: chat
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    SecretStr,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from inference_core.config import (
    ZMQ_ENDPOINT,
    ConfigError,
    LBPolicy,
    ProviderType,
    Settings,
    describe_file,
    read_config_file,
)

DEFAULT_BACKEND = "default"
# Names become metric labels and header values, so they keep to characters both accept.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_URL = TypeAdapter(AnyHttpUrl)


@dataclass(frozen=True, slots=True)
class Target:
    """Where an alias sends a request: a backend, and the model's name there.

    Written ``backend/model`` and split at the first ``/``, since model names hold slashes
    (``local/meta-llama/Llama-3.1-8B``).
    """

    backend: str
    model: str


def _target(value: object) -> Target:
    if isinstance(value, Target):
        return value
    backend, slash, model = value.partition("/") if isinstance(value, str) else ("", "", "")
    if not (backend and slash and model):
        raise PydanticCustomError("target", "expected backend/model, e.g. local/meta-llama/Llama-3.1-8B")
    return Target(backend, model)


def _listed(value: object) -> object:
    """One URL, several separated by commas (as INFERENCE_BASE_URL takes them), or a list."""
    return value.split(",") if isinstance(value, str) else value


def _http_root(value: str) -> str:
    try:
        _URL.validate_python(value.strip())
    except ValidationError:
        raise PydanticCustomError("url", "not an http:// or https:// URL") from None
    return value.strip().rstrip("/")


def _zmq_endpoint(value: str) -> str:
    if not ZMQ_ENDPOINT.fullmatch(value.strip()):
        raise PydanticCustomError("zmq", "not a ZMQ endpoint such as tcp://vllm-0:5557 or ipc:///run/vllm/kv")
    return value.strip()


def _replica(value: object) -> object:
    """A replica given as its URL alone is a replica with no KV-event sockets (a bad URL is named as given)."""
    return {"url": _http_root(value)} if isinstance(value, str) else value


class ReplicaConfig(BaseModel):
    """One replica of a backend: its API root and, for ``cache_aware``, where it publishes KV events."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: Annotated[str, AfterValidator(_http_root)] = Field(description="Its API root, without a trailing slash.")
    kv_events: Annotated[str, AfterValidator(_zmq_endpoint)] | None = Field(
        default=None, description="Its KV-event PUB socket (vLLM's --kv-events-config endpoint)."
    )
    kv_replay: Annotated[str, AfterValidator(_zmq_endpoint)] | None = Field(
        default=None, description="Its KV-event replay socket (replay_endpoint), to fill gaps."
    )

    @model_validator(mode="after")
    def _replay_needs_events(self) -> Self:
        if self.kv_replay is not None and self.kv_events is None:
            raise PydanticCustomError("kv_replay", "kv_replay without kv_events: give the PUB socket too")
        return self


TargetField = Annotated[Target, PlainValidator(_target)]


class BackendConfig(BaseModel):
    """One backend: a provider's replicas, with their own balancing, limits and timeout."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    provider: ProviderType = Field(default=ProviderType.VLLM, description="vllm or openai.")
    base_url: Annotated[
        tuple[Annotated[ReplicaConfig, BeforeValidator(_replica)], ...], BeforeValidator(_listed), Field(min_length=1)
    ] = Field(description="Each replica: its API root, or a mapping {url, kv_events, kv_replay}.")
    api_key: SecretStr = Field(default=SecretStr("EMPTY"), description="Key sent to this backend (never logged).")
    lb_policy: LBPolicy = Field(description="Spreading over its replicas; the file's default is lb_policy's.")
    max_concurrent_tasks: Annotated[int, Field(ge=1)] = Field(
        description="Requests in flight to this backend at once; the gateway-wide max_concurrent_tasks still "
        "caps all backends together, and is the default."
    )
    rate_limit_rps: Annotated[float, Field(ge=0)] = Field(default=0.0, description="Requests per second (0: no limit).")
    rate_limit_burst: Annotated[int, Field(ge=0)] = Field(
        default=0, description="Requests that may go at once under the rate limit (0: one second's worth)."
    )
    timeout: Annotated[float, Field(gt=0)] = Field(description="Seconds to wait for an answer; default: timeout's.")
    models: Annotated[tuple[Annotated[str, Field(min_length=1)], ...], Field(min_length=1)] | None = Field(
        default=None, description="Globs (fnmatch) of the model names it serves; None: learnt from its /v1/models."
    )
    tokenizer: Path | None = Field(
        default=None,
        description="cache_aware: the served model's tokenizer directory; None: a replica's /tokenize.",
    )
    stream_usage: bool = Field(
        default=True,
        description="Ask it for the usage of every chat and text completion stream (stream_options.include_usage), "
        "hidden from clients that did not ask; false for a backend that refuses stream_options.",
    )

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(replica.url for replica in self.base_url)


class AliasConfig(BaseModel):
    """A model name clients may ask for: where it is served, then where to go when that fails."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    target: TargetField
    fallbacks: tuple[TargetField, ...] = ()


class KeyConfig(BaseModel):
    """A gateway key with a name (its label in metrics and logs), what it may use, and its limits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: SecretStr | None = Field(default=None, description="The key clients send.")
    key_sha256: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")] | None = Field(
        default=None, description="The key's SHA-256 digest in hex, so the file need not hold the secret."
    )
    models: tuple[Annotated[str, Field(min_length=1)], ...] | None = Field(
        default=None, description="Globs of the models and aliases it may use; None: all."
    )
    rpm: Annotated[int, Field(ge=1)] | None = Field(default=None, description="Requests per window (a minute).")
    tpm: Annotated[int, Field(ge=1)] | None = Field(default=None, description="Tokens per window, prompt + completion.")
    max_concurrent: Annotated[int, Field(ge=1)] | None = Field(default=None, description="Requests in flight at once.")
    priority: int = Field(default=0, description="Its requests' priority; a request may ask for a later one only.")
    weight: Annotated[float, Field(gt=0)] = Field(default=1.0, description="Its share of the queue within a priority.")
    admin: bool = Field(default=False, description="Sees every key's usage at /v1/usage.")

    @model_validator(mode="after")
    def _one_key(self) -> Self:
        if (self.key is None) == (self.key_sha256 is None):
            raise PydanticCustomError("key", "give exactly one of key and key_sha256")
        return self


class FleetConfig(BaseModel):
    """Every backend, in the file's order, the aliases routed over them, and the model used when none is named."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backends: Annotated[dict[str, BackendConfig], Field(min_length=1)]
    models: dict[str, AliasConfig] = Field(default_factory=dict)
    default_model: str = Field(min_length=1)
    keys: dict[str, KeyConfig] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _names(self) -> Self:
        # Raised with no location, so each message starts with its own key path.
        for section, names in (("backends", self.backends), ("keys", self.keys)):
            for name in names:
                if not _NAME.fullmatch(name):
                    raise PydanticCustomError(
                        "name",
                        f"{section}.{name}: a name is 1-64 letters, digits, '_', '.' or '-', "
                        "the first a letter or digit",
                    )
        for alias, config in self.models.items():
            targets = [("target", config.target), *((f"fallbacks[{i}]", t) for i, t in enumerate(config.fallbacks))]
            for where, target in targets:
                if target.backend not in self.backends:
                    raise PydanticCustomError(
                        "unknown_backend",
                        f"models.{alias}.{where}: no backend named {target.backend!r} "
                        f"(backends: {', '.join(self.backends)})",
                    )
        return self


def load_fleet(settings: Settings) -> FleetConfig:
    """The backends and aliases to serve, from ``settings.config`` or else from the settings alone.

    The file is read again on every call, as a reload after SIGHUP does; any problem is a ConfigError.
    Values a backend leaves out default to the settings' (lb_policy, max_concurrent_tasks, timeout).
    """
    if settings.config is None:
        return FleetConfig(backends={DEFAULT_BACKEND: _settings_backend(settings)}, default_model=settings.model)
    document = read_config_file(settings.config)
    backends: Any = document.get("backends")
    if isinstance(backends, dict):
        defaults = {
            "lb_policy": settings.lb_policy,
            "max_concurrent_tasks": settings.max_concurrent_tasks,
            "timeout": settings.timeout,
        }
        backends = {name: defaults | given if isinstance(given, dict) else given for name, given in backends.items()}
    elif "backends" not in document:
        backends = {DEFAULT_BACKEND: _settings_backend(settings)}
    try:
        return FleetConfig(
            backends=backends,
            models=document.get("models", {}),
            keys=document.get("keys", {}),
            default_model=settings.model,
        )
    except ValidationError as exc:
        raise ConfigError(describe_file(settings.config, exc, FleetConfig)) from None


def _settings_backend(settings: Settings) -> BackendConfig:
    return BackendConfig(
        provider=settings.provider_type,
        base_url=tuple(ReplicaConfig(**replica) for replica in settings.replicas),
        api_key=settings.api_key,
        lb_policy=settings.lb_policy,
        tokenizer=settings.tokenizer,
        max_concurrent_tasks=settings.max_concurrent_tasks,
        rate_limit_rps=settings.rate_limit_rps,
        rate_limit_burst=settings.rate_limit_burst,
        timeout=settings.timeout,
    )
