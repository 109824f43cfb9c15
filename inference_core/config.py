"""Settings: every knob of the gateway, read once from ``INFERENCE_*`` variables and a YAML file.

Parsing happens in one place so that a bad value stops start-up with a single line naming the
variable or the file's key, instead of failing on the first request. A mistyped name is named
too, with the nearest right one: an unknown key of the file, at any depth, stops start-up; an
unknown ``INFERENCE_*`` variable is a warning, since scripts use a few of their own. The file
(``INFERENCE_CONFIG``) is read here, beneath the environment; its ``backends:`` and ``models:``
are built into routing by ``config_file.py``.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import AnyHttpUrl, BaseModel, Field, SecretStr, TypeAdapter, ValidationError, field_validator
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "INFERENCE_"
FILE_VARIABLE = f"{ENV_PREFIX}CONFIG"
#: ``INFERENCE_*`` variables that are no setting: the scripts and tests read them (scripts/vllm-venv,
#: scripts/test-container, tests/vllm), and a shell that exports them may start the gateway too.
NOT_SETTINGS = frozenset({"INFERENCE_IMAGE", "INFERENCE_VLLM_CACHE", "INFERENCE_VLLM_VENV"})
ROUTING_KEYS = frozenset({"backends", "models", "keys"})
# With ``backends:`` in the file these would describe a second backend, one without a name.
_SINGLE_BACKEND_KEYS = ("base_url", "provider_type", "api_key")
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_URL = TypeAdapter(AnyHttpUrl)
#: Where a vLLM publishes its KV events: tcp://host:port (an IPv6 host in brackets) or ipc://path.
ZMQ_ENDPOINT = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):\d{1,5}|ipc://\S+")
log = logging.getLogger(__name__)


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
    CACHE_AWARE = "cache_aware"


class RedisFailure(StrEnum):
    OPEN = "open"
    CLOSED = "closed"


class LogFormat(StrEnum):
    JSON = "json"
    TEXT = "text"


class Settings(BaseSettings):
    """The gateway's configuration; each field is also the ``INFERENCE_<NAME>`` variable and the file's ``<name>``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    config: Path | None = Field(None, description="A YAML file of backends, model aliases and settings (see README).")
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
    access_log: bool = Field(True, description="One access-log line per request (false: none).")
    probe_interval: Annotated[float, Field(gt=0)] = Field(
        5.0, description="Seconds between background health probes of the backend."
    )
    shutdown_grace: Annotated[float, Field(ge=0)] = Field(
        30.0, description="Seconds in-flight requests may take to finish after SIGTERM."
    )
    lb_policy: LBPolicy = Field(
        LBPolicy.LEAST_OUTSTANDING,
        description="Spreading over replicas: least_outstanding, round_robin, load_aware, prefix_affinity or "
        "cache_aware.",
    )
    kv_events: str = Field(
        "",
        description="cache_aware: each replica's KV-event PUB socket (vLLM's --kv-events-config endpoint, e.g. "
        "tcp://vllm-0:5557), comma-separated in INFERENCE_BASE_URL's order; empty for a replica without.",
    )
    kv_replay: str = Field(
        "", description="cache_aware: each replica's KV-event replay socket (tcp://vllm-0:5558), in the same order."
    )
    tokenizer: Path | None = Field(
        None,
        description="cache_aware: the served model's tokenizer directory (tokenizer.json, tokenizer_config.json); "
        "unset: prompts are tokenized by a replica's /tokenize.",
    )
    kv_load_slack: Annotated[int, Field(ge=0)] = Field(
        8,
        description="cache_aware: a replica with more requests than the least busy by more than this is passed "
        "over, whatever its cache holds.",
    )
    kv_events_silence: Annotated[float, Field(gt=0)] = Field(
        10.0,
        description="cache_aware: seconds without the events a routed prompt should cause before that replica "
        "is routed by load alone.",
    )
    kv_index_blocks: Annotated[int, Field(ge=1)] = Field(
        200_000, description="cache_aware: most blocks remembered per replica (about 200 bytes each)."
    )
    response_affinity_size: Annotated[int, Field(ge=1)] = Field(
        100_000,
        description="Stored response ids whose replica the gateway remembers, for previous_response_id "
        "(least recently used forgotten first).",
    )
    eject_after: Annotated[int, Field(ge=1)] = Field(
        3, description="Consecutive failures (probes or requests) that take a replica out of rotation."
    )
    limit_window: Annotated[float, Field(gt=0)] = Field(
        60.0, description="Seconds in one window of the keys' rpm and tpm limits (rpm: requests per window)."
    )
    redis_url: SecretStr | None = Field(
        None, description="redis://host:6379/0: keys' limits shared by every gateway on it (unset: this process's)."
    )
    redis_failure: RedisFailure = Field(
        RedisFailure.OPEN,
        description="Redis unreachable: open (each gateway applies the limits alone) or closed (answer 503).",
    )
    data_dir: Path = Field(
        Path("inference-core-data"),
        description="Folder for uploaded files and their records (SQLite; with INFERENCE_DATABASE_URL only "
        "temporary files); created on the first upload.",
    )
    database_url: SecretStr | None = Field(
        None,
        description="postgresql://user:password@host/db: files and batches kept in PostgreSQL, shared by "
        "every gateway on it (unset: SQLite in INFERENCE_DATA_DIR).",
    )
    batch_max_file_bytes: Annotated[int, Field(ge=1)] = Field(
        200 * 1024 * 1024, description="Largest file accepted by POST /v1/files, in bytes."
    )
    batch_priority: int = Field(100, description="Priority of batch lines in the queue (lower is sooner).")
    batch_max_concurrent: Annotated[int, Field(ge=1)] = Field(32, description="Batch lines in flight at once.")
    batch_max_lines: Annotated[int, Field(ge=1)] = Field(50_000, description="Most lines in one batch's input.")
    batch_window_seconds: Annotated[float, Field(gt=0)] = Field(
        86_400, description="How long a batch's completion_window ('24h') lasts; lines not run by then expire."
    )
    default_completion_tokens: Annotated[int, Field(ge=0)] = Field(
        256, description="Completion tokens reserved under a key's tpm for a request that sets no max_tokens."
    )

    @field_validator("config", "redis_url", "database_url", "tokenizer", mode="before")
    @classmethod
    def _unset(cls, value: object) -> object:
        # Compose files, charts and Secrets set a variable empty to mean "none" (INFERENCE_CONFIG= would
        # otherwise read as the current directory).
        return None if value == "" else value

    @field_validator("database_url")
    @classmethod
    def _postgresql(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(("postgresql://", "postgres://")):
            raise ValueError("not a postgresql:// URL")  # the value itself may hold a password: not repeated
        return value

    @field_validator("base_url")
    @classmethod
    def _urls(cls, value: str) -> str:
        roots = [part.strip() for part in value.split(",") if part.strip()]
        if not roots:
            raise ValueError("no URL given")
        for root in roots:
            _URL.validate_python(root)
        return ",".join(roots)

    @field_validator("kv_events", "kv_replay")
    @classmethod
    def _endpoints(cls, value: str) -> str:
        for part in value.split(",") if value else ():
            if part.strip() and not ZMQ_ENDPOINT.fullmatch(part.strip()):
                raise ValueError(f"{part.strip()!r} is not a ZMQ endpoint such as tcp://vllm-0:5557")
        return value

    @property
    def upstream_roots(self) -> tuple[str, ...]:
        """Each replica's API root, without a trailing slash."""
        return tuple(root.rstrip("/") for root in self.base_url.split(","))

    @property
    def replicas(self) -> list[dict[str, str]]:
        """Each replica as the file's mapping form: its URL, with its KV-event sockets where given."""
        roots = self.upstream_roots
        columns: dict[str, list[str]] = {"url": list(roots)}
        for name in ("kv_events", "kv_replay"):
            text: str = getattr(self, name)
            given = [part.strip() for part in text.split(",")] if text else []
            if len(given) > len(roots):
                raise ConfigError(
                    f"INFERENCE_{name.upper()}: {len(given)} entries for {len(roots)} INFERENCE_BASE_URL replicas"
                )
            columns[name] = given + [""] * (len(roots) - len(given))
        return [
            {name: column[number] for name, column in columns.items() if column[number]} for number in range(len(roots))
        ]


class ConfigError(Exception):
    """A setting could not be parsed; ``str()`` is the one line shown to the operator."""


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment, with ``overrides`` (command-line flags) on top.

    A file named by ``config`` or ``INFERENCE_CONFIG`` lies beneath the environment: a setting's
    variable, when set, wins over the file's value for it.
    """
    given = {name: value for name, value in overrides.items() if value is not None}
    environment = {name.upper(): value for name, value in os.environ.items()}  # pydantic-settings ignores case
    chosen = given.get("config") or environment.get(FILE_VARIABLE)
    path = Path(str(chosen)) if chosen else None
    from_file: dict[str, object] = {}
    keys: dict[str, str] = {}  # setting -> the file's key for it
    document = read_config_file(path) if path else {}
    for key, value in document.items():
        name = "model" if key == "default_model" else key
        if key not in ROUTING_KEYS and name not in given and f"{ENV_PREFIX}{name.upper()}" not in environment:
            from_file[name] = _joined(value)
            keys[name] = key
    try:
        return Settings(**(from_file | given))  # type: ignore[arg-type]
    except ValidationError as exc:
        errors = _errors(exc)
        in_file = [error for error in errors if error["loc"] and error["loc"][0] in keys]
        lines = [_variable_problem(error) for error in errors if error not in in_file]
        if path and in_file:
            lines.append(str(file_error(path, *(_setting_problem(error, keys) for error in in_file))))
        raise ConfigError("; ".join(lines)) from None


def warn_unknown_variables() -> None:
    """Log a warning for each ``INFERENCE_*`` variable that names no setting, with the nearest that does.

    pydantic-settings reads only the variables it knows, so a misspelt one would leave its setting
    at the default without a word. Called once logging is set up, so that the warning is a line of
    the gateway's log; the variable's value, maybe a secret, is never shown.
    """
    for name in sorted(os.environ):
        variable = name.upper()
        setting = variable.removeprefix(ENV_PREFIX).lower()
        if variable.startswith(ENV_PREFIX) and variable not in NOT_SETTINGS and setting not in Settings.model_fields:
            close = _closest(setting, Settings.model_fields)
            log.warning("%s is not a setting%s", name, f"; did you mean {ENV_PREFIX}{close.upper()}?" if close else "")


def read_config_file(path: Path) -> dict[str, Any]:
    """The file's top-level mapping, with ``${VAR}`` expanded and its keys checked.

    Reloads call this again at any time, so every problem is a ConfigError.
    """
    try:
        document = _parse_yaml(path.read_bytes())
        if not isinstance(document, dict):
            kind = "an empty file" if document is None else f"a {type(document).__name__}"
            raise file_error(path, f"expected a mapping of settings, backends and models, found {kind}")
        expanded: dict[str, Any] = _expand(path, document, ())
    except OSError as exc:
        raise file_error(path, f"cannot read ({exc.strerror or type(exc).__name__})") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}: " if mark else ""
        context = f" ({exc.context})" if exc.context and exc.problem else ""
        raise file_error(path, f"{where}not valid YAML: {exc.problem or exc.context}{context}") from None
    except yaml.YAMLError as exc:  # not UTF-8 or UTF-16; str(exc) would quote the bytes
        raise file_error(path, f"not valid YAML: {getattr(exc, 'reason', 'unreadable')}") from None
    except RecursionError:
        raise file_error(path, "nested too deeply, or a value holds itself (&a [*a])") from None
    _check_keys(path, expanded)
    return expanded


def file_error(path: Path, *problems: str) -> ConfigError:
    """The one line for problems in the file: ``INFERENCE_CONFIG <path>: <key.path>: <problem>; ...``."""
    return ConfigError(f"{FILE_VARIABLE} {path}: " + "; ".join(problems))


def describe_file(path: Path, exc: ValidationError, model: type[BaseModel]) -> str:
    """One line for a file's bad values, each named by its key path, never by its value.

    ``model`` is the one that was validated: a key it does not know is matched against the keys
    accepted where it stands, for a "did you mean".
    """
    problems = []
    for error in _errors(exc):
        location = error["loc"]
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = _unknown_key(str(location[-1]), _keys_at(model, location[:-1]))
        problems.append(f"{key_path(location)}: {message}" if location else message)
    return str(file_error(path, *problems))


def key_path(location: Iterable[str | int]) -> str:
    """``backends.local.base_url[1]``: where a value sits in the file."""
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else part
    return text


def _errors(exc: ValidationError) -> list[ErrorDetails]:
    return exc.errors(include_url=False, include_input=False)


def _variable_problem(error: ErrorDetails) -> str:
    field = str(error["loc"][0]) if error["loc"] else "?"
    return f"{ENV_PREFIX}{field.upper()}: {error['msg']}{_accepts(field)}"


def _setting_problem(error: ErrorDetails, keys: Mapping[str, str]) -> str:
    field = str(error["loc"][0])
    return f"{keys[field]}: {error['msg']}{_accepts(field)}"


def _accepts(field: str) -> str:
    return " (accepts: an http:// or https:// URL, or several separated by commas)" if field == "base_url" else ""


def _joined(value: object) -> object:
    """A list of strings as the comma-separated text the variables take (base_url, cors_origins...)."""
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return ",".join(value)
    return value


def _check_keys(path: Path, document: Mapping[str, Any]) -> None:
    known = (Settings.model_fields.keys() - {"config"}) | ROUTING_KEYS | {"default_model"}
    for key in document:
        if key not in known:
            accepts = "backends, models, default_model and the settings"
            raise file_error(path, f"{key}: {_unknown_key(str(key), known, accepts)}")
    if "model" in document and "default_model" in document:
        raise file_error(path, "default_model: given twice, also as model")
    for key in _SINGLE_BACKEND_KEYS if "backends" in document else ():
        if key in document:
            raise file_error(path, f"{key}: give it under backends.<name>, not at the top")


def _unknown_key(key: str, known: Collection[str], accepts: str = "") -> str:
    """``unknown key (did you mean lb_policy?)``: the one wording for a mistyped key, at any depth of the file.

    Without a close match it lists what ``accepts`` says, by default every known key.
    """
    close = _closest(key, known)
    return f"unknown key (did you mean {close}?)" if close else f"unknown key (accepts {accepts or ', '.join(known)})"


def _closest(name: str, known: Collection[str]) -> str | None:
    """The known name ``name`` most likely misspells, if any is close (difflib's ratio of 0.6 or more)."""
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return close[0] if close else None


def _keys_at(model: type[BaseModel], location: Sequence[str | int]) -> list[str]:
    """The keys a mapping at ``location`` in ``model``'s input accepts: the fields of the model there.

    Found by following the field types down, so a section added to the file needs no list of its keys here.
    """
    kind: Any = model
    for part in location:
        kind = _unwrapped(kind)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            field = kind.model_fields.get(str(part))
            kind = field.annotation if field else None
        else:  # dict[str, X] holds an X under each name; tuple[X, ...] an X at each index
            arguments = get_args(kind)
            kind = arguments[1] if get_origin(kind) is dict else arguments[0] if arguments else None
    kind = _unwrapped(kind)
    return list(kind.model_fields) if isinstance(kind, type) and issubclass(kind, BaseModel) else []


def _unwrapped(kind: Any) -> Any:
    """The type inside ``Annotated[X, ...]`` and ``X | None``."""
    while True:
        inside = [argument for argument in get_args(kind) if argument is not type(None)]
        if get_origin(kind) is Annotated or (get_origin(kind) in (Union, UnionType) and len(inside) == 1):
            kind = inside[0]
        else:
            return kind


def _expand(path: Path, value: Any, where: tuple[str | int, ...]) -> Any:
    """Every ``${VAR}`` in a string replaced by the variable's value; an unset one is an error."""
    if isinstance(value, str):

        def value_of(match: re.Match[str]) -> str:
            if match[1] not in os.environ:
                raise file_error(path, f"{key_path(where)}: the variable {match[1]} is not set")
            return os.environ[match[1]]

        return _VARIABLE.sub(value_of, value)
    if isinstance(value, dict):
        return {key: _expand(path, item, (*where, str(key))) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand(path, item, (*where, index)) for index, item in enumerate(value)]
    return value


def _parse_yaml(data: bytes) -> Any:
    """``yaml.safe_load``, except that a key given twice is an error: YAML would keep the last silently."""
    loader = yaml.SafeLoader(data)
    try:
        node = loader.get_single_node()
        _refuse_duplicate_keys(node)
        return None if node is None else loader.construct_document(node)
    except (ValueError, KeyError, TypeError):  # e.g. "2024-02-30" read as a date; the message would quote the value
        raise yaml.MarkedYAMLError(problem="a value does not fit its type; quote it to make it a string") from None
    finally:
        loader.dispose()


def _refuse_duplicate_keys(root: Any) -> None:
    pending, seen = [root], set()
    while pending:
        node = pending.pop()
        if id(node) in seen:  # an alias: the same node again, maybe inside itself
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys = set()
            for key, value in node.value:
                # "<<: *defaults" followed by an override is how YAML merges; only repeats of the same key are errors.
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if key.value in keys:
                        raise yaml.MarkedYAMLError(
                            problem=f"key {key.value!r} given twice", problem_mark=key.start_mark
                        )
                    keys.add(key.value)
                pending += (key, value)
        elif isinstance(node, yaml.SequenceNode):
            pending += node.value
