"""The configuration file: typed Structs, `${VAR}` interpolation, validation with key paths.

Contract:
- `load_config(path)` / `parse_config(text)` return a frozen `Config` or raise
  `worker.errors.ConfigError` with ONE line of the form `<key path>: <reason>`, e.g.
  `destinations[1].pixel_code: required`. Nothing else escapes.
- Unknown keys are errors at every level, including subscription `mapping` field names.
- Triggers (`when`, subscription `trigger`) and mapping overrides are compiled once, by
  `worker.mapping.Mapper`, which raises the same kind of key-path error; every command that maps
  builds its Mapper at start-up, so a bad one never becomes a surprise per event.
- Every key, default and meaning is documented in docs/configuration.md; keep the two in sync.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal, get_args, get_origin, get_type_hints

import msgspec
import phonenumbers
import yaml

from worker.errors import ConfigError
from worker.mapping.spec import DestinationConfig, NonEmptyStr

__all__ = [
    "CircuitConfig",
    "Config",
    "HttpConfig",
    "KafkaConfig",
    "LoggingConfig",
    "RateLimitConfig",
    "RetryConfig",
    "TikTokConfig",
    "load_config",
    "masked",
    "parse_config",
]

PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
ClientValue = str | int | float | bool


# Every section is frozen (immutable after load) and forbids unknown fields (a typo in a key
# is an error, not a silent default); kw_only lets required keys follow defaulted ones.


class KafkaConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    bootstrap_servers: NonEmptyStr = "localhost:9092"
    topics: Annotated[tuple[NonEmptyStr, ...], msgspec.Meta(min_length=1)] = ("segment-events",)
    group_id: NonEmptyStr = "tiktok-conversions"
    dead_letter_topic: NonEmptyStr = "segment-events.tiktok-dlq"
    # Parked events (SPEC §4); consumed by the workers as group `<group_id>.retry`.
    retry_topic: NonEmptyStr = "segment-events.tiktok-retry"
    # librdkafka properties passed verbatim (security.protocol, sasl.*, ssl.*, ...).
    # (Values are checked in _check_semantics, so the error can name the property.)
    client: dict[str, Any] = msgspec.field(default_factory=dict)
    max_inflight_messages: PositiveInt = 20000
    commit_interval_s: PositiveFloat = 1.0
    drain_timeout_s: PositiveFloat = 25.0


class RetryConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    initial_backoff_s: PositiveFloat = 0.5
    max_backoff_s: PositiveFloat = 60.0
    in_memory_s: PositiveFloat = 30.0  # retry in memory this long, then park
    deadline_s: PositiveFloat = 3600.0


class CircuitConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    failure_threshold: PositiveInt = 5  # consecutive failed requests that open it
    open_s: PositiveFloat = 30.0  # first pause before a probe; doubles up to max_open_s
    max_open_s: PositiveFloat = 300.0


class TikTokConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    base_url: NonEmptyStr = "https://business-api.tiktok.com"
    max_batch_events: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1000
    batch_linger_ms: NonNegativeInt = 200
    request_timeout_s: PositiveFloat = 10.0
    max_concurrent_requests: PositiveInt = 64  # all lanes together
    lane_concurrency: PositiveInt = 8  # requests in flight per lane (request key)
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    circuit: CircuitConfig = msgspec.field(default_factory=CircuitConfig)
    # Segment's destination always sends "Segment"; keeping it means the same bodies TikTok
    # already accepts for this customer. null omits the key.
    partner_name: NonEmptyStr | None = "Segment"


class RateLimitConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    qps: PositiveFloat = 1000.0
    backend: Literal["redis", "local"] = "redis"
    redis_url: NonEmptyStr = "redis://localhost:6379/0"
    expected_replicas: PositiveInt = 1


class HttpConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    host: NonEmptyStr = "0.0.0.0"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 9464
    liveness_timeout_s: PositiveFloat = 60.0


class LoggingConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    format: Literal["json", "console"] = "json"


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    kafka: KafkaConfig = msgspec.field(default_factory=KafkaConfig)
    tiktok: TikTokConfig = msgspec.field(default_factory=TikTokConfig)
    rate_limit: RateLimitConfig = msgspec.field(default_factory=RateLimitConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    destinations: Annotated[tuple[DestinationConfig, ...], msgspec.Meta(min_length=1)]


# --------------------------------------------------------------------------- loading


def load_config(
    path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
) -> Config:
    """Read, interpolate and validate the YAML file at `path`."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"{os.fspath(path)}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{os.fspath(path)}: not UTF-8 text") from None
    return parse_config(text, environ=environ)


def parse_config(text: str, *, environ: Mapping[str, str] | None = None) -> Config:
    """Parse YAML text into a validated `Config`; `environ` defaults to `os.environ`."""
    env = os.environ if environ is None else environ
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error(exc)) from None
    if data is None:
        data = {}
    data = _interpolate(data, (), env)
    try:
        config = msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_translate(str(exc))) from None
    _check_semantics(config)
    return config


def _yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is not None:
        return f"YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return f"YAML syntax error: {problem}"


# --------------------------------------------------------------------------- ${VAR}

_VAR_RE: Final = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(node: Any, path: tuple[str | int, ...], env: Mapping[str, str]) -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in every string value; `$${` is a literal `${`."""
    if isinstance(node, str):
        if "$" not in node:
            return node

        def repl(m: re.Match[str]) -> str:
            if m.group(0) == "$${":
                return "${"
            name, default = m.group(1), m.group(2)
            value = env.get(name)
            if default is not None:
                return value if value else default  # shell `:-`: unset or empty
            if value is None:
                raise ConfigError(
                    f"{_fmt_path(path)}: environment variable {name} is not set "
                    f"(use ${{{name}:-default}} for a default)"
                )
            return value

        return _VAR_RE.sub(repl, node)
    if isinstance(node, dict):
        return {k: _interpolate(v, (*path, str(k)), env) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, (*path, i), env) for i, v in enumerate(node)]
    return node


def _fmt_path(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


# --------------------------------------------------------------------------- error text

_AT_RE: Final = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_TYPE_NAMES: Final = {
    "object": "a mapping",
    "array": "a list",
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "null": "null",
}


def _translate(message: str) -> str:
    """Turn a msgspec validation message into `<key path>: <reason>`."""
    m = _AT_RE.match(message)
    assert m is not None  # the pattern matches any string
    msg, raw_path = m.group("msg"), m.group("path") or ""
    path = raw_path.lstrip(".")
    if mm := re.match(r"Object missing required field `([^`]+)`", msg):
        return f"{_join(path, mm.group(1))}: required"
    if mm := re.match(r"Object contains unknown field `([^`]+)`", msg):
        return f"{_join(path, mm.group(1))}: unknown key"
    if msg.startswith("Invalid enum value"):
        choices = _enum_choices(path)
        reason = f"must be one of: {', '.join(choices)}" if choices else "not an allowed value"
        return f"{path or '(top level)'}: {reason}"
    if mm := re.match(r"Expected `([^`]+)`, got `([^`]+)`", msg):
        want = " or ".join(_TYPE_NAMES.get(t.strip(), t.strip()) for t in mm.group(1).split("|"))
        got = mm.group(2)
        hint = (
            " (quote the value in YAML)"
            if got in ("bool", "int", "float") and "str" in (mm.group(1))
            else ""
        )
        return f"{path or '(top level)'}: expected {want}, got {_TYPE_NAMES.get(got, got)}{hint}"
    if mm := re.match(r"Expected `([^`]+)` (.+)$", msg):
        kind, constraint = mm.group(1), mm.group(2)
        if "matching regex" in constraint and path.endswith("name"):
            return (
                f"{path}: must be 1-64 characters of letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        if constraint.startswith("of length >= 1"):
            return f"{path}: must not be empty"
        return f"{path}: must be {_TYPE_NAMES.get(kind, kind)} {constraint}"
    return f"{path or '(top level)'}: {msg[0].lower() + msg[1:] if msg else 'invalid'}"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _enum_choices(path: str) -> list[str]:
    """Walk the Struct types along `path` and return the Literal's options, if it is one."""
    tp: Any = Config
    for part in re.findall(r"[^.\[\]]+", path):
        if part.isdigit():
            tp = _strip(tp)
            args = get_args(tp)
            tp = args[0] if args else Any
            continue
        tp = _strip(tp)
        if not (isinstance(tp, type) and issubclass(tp, msgspec.Struct)):
            return []
        tp = get_type_hints(tp, include_extras=True).get(part, Any)
    tp = _strip(tp)
    if get_origin(tp) is Literal:
        return [str(a) for a in get_args(tp)]
    return []


def _strip(tp: Any) -> Any:
    """Remove Annotated[...] and Optional wrappers."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
            continue
        args = [a for a in get_args(tp) if a is not type(None)]
        if origin is not None and len(args) == 1 and origin not in (tuple, list, dict, Literal):
            tp = args[0]
            continue
        return tp


# --------------------------------------------------------------------------- semantics


def _check_semantics(config: Config) -> None:
    """Checks msgspec cannot express: uniqueness and cross-field ranges."""
    # A rebalance or stop blocks the consumer thread (and its heartbeat) for up to the drain
    # time plus a margin; liveness must not declare that stuck and get the pod restarted.
    if config.http.liveness_timeout_s <= config.kafka.drain_timeout_s + 10:
        raise ConfigError(
            "http.liveness_timeout_s: must be greater than kafka.drain_timeout_s + 10 "
            f"({config.kafka.drain_timeout_s + 10:g}): draining a revoked partition pauses "
            "the consumer loop that long"
        )
    retry = config.tiktok.retry
    if retry.max_backoff_s < retry.initial_backoff_s:
        raise ConfigError("tiktok.retry.max_backoff_s: must be >= tiktok.retry.initial_backoff_s")
    circuit = config.tiktok.circuit
    if circuit.max_open_s < circuit.open_s:
        raise ConfigError("tiktok.circuit.max_open_s: must be >= tiktok.circuit.open_s")
    kafka = config.kafka
    if kafka.retry_topic == kafka.dead_letter_topic:
        raise ConfigError(
            "kafka.retry_topic: must differ from kafka.dead_letter_topic "
            "(parked events are delivered again, dead letters are not)"
        )
    if kafka.retry_topic in kafka.topics:
        raise ConfigError("kafka.retry_topic: must not be one of kafka.topics")
    for key, value in config.kafka.client.items():
        if not isinstance(value, ClientValue):
            raise ConfigError(
                f"kafka.client.{key}: expected a string, number or boolean "
                "(librdkafka properties are scalars)"
            )
        if key in ("enable.auto.commit", "enable.auto.offset.store", "group.id"):
            raise ConfigError(
                f"kafka.client.{key}: managed by the worker; remove it "
                "(offsets are committed only after delivery)"
            )
    seen: dict[str, int] = {}
    for i, dest in enumerate(config.destinations):
        where = f"destinations[{i}]"
        if dest.name in seen:
            raise ConfigError(
                f"{where}.name: duplicate destination name (also destinations[{seen[dest.name]}])"
            )
        seen[dest.name] = i
        if dest.phone_default_region is not None and (
            dest.phone_default_region not in phonenumbers.SUPPORTED_REGIONS
        ):
            raise ConfigError(
                f"{where}.phone_default_region: not a supported ISO 3166-1 alpha-2 region "
                "(upper case, e.g. US, GB, DE)"
            )
    # Triggers, subscription names and mapping overrides are checked where they are compiled,
    # once, by `worker.mapping.Mapper` (every command that maps builds one at start-up).


# --------------------------------------------------------------------------- masking

_MASK: Final = "***"
_SECRET_KEY_RE: Final = re.compile(
    r"password|secret|jaas|token|credential|\.pem$|oauthbearer\.config|api\.key", re.I
)


def secret_values(config: Config) -> list[str]:
    """Every secret the config holds (tokens, passwords), for log scrubbing."""
    values = [d.access_token for d in config.destinations]
    values += [
        str(v)
        for k, v in config.kafka.client.items()
        if any(word in k for word in ("password", "secret", "sasl.oauthbearer"))
    ]
    password = urllib.parse.urlsplit(config.rate_limit.redis_url).password
    if password:
        values.append(urllib.parse.unquote(password))
    return values


def masked(config: Config) -> dict[str, Any]:
    """The effective config as plain data, with every secret replaced by `***`."""
    data: dict[str, Any] = msgspec.to_builtins(config)
    data["kafka"]["client"] = {
        k: (_MASK if _SECRET_KEY_RE.search(k) else v) for k, v in data["kafka"]["client"].items()
    }
    data["rate_limit"]["redis_url"] = _mask_url(data["rate_limit"]["redis_url"])
    for dest in data["destinations"]:
        dest["access_token"] = _MASK
    return data


def _mask_url(url: str) -> str:
    """Hide the password in `scheme://user:password@host/...`."""
    return re.sub(r"^([a-z][a-z0-9+.-]*://)([^:@/]*):([^@/]*)@", rf"\1\2:{_MASK}@", url, flags=re.I)
