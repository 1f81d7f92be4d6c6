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

import logging
import os
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Final, Literal, get_args, get_origin, get_type_hints

import msgspec
import phonenumbers
import yaml

from worker.core.msgspec_errors import ErrorKind, parse_validation_message
from worker.core.redaction import MASK, is_secret_key, mask_url_credentials, url_secrets
from worker.delivery.ratelimit.limiter import DEFAULT_HEADROOM
from worker.delivery.ratelimit.redis_gcra import SENTINEL_SCHEMES, parse_sentinel_url
from worker.errors import ConfigError
from worker.mapping.spec import SOURCE_ID_KEYS, DestinationConfig, NonEmptyStr

__all__ = [
    "CircuitConfig",
    "Config",
    "HttpConfig",
    "KafkaConfig",
    "KafkaSecurityConfig",
    "LoggingConfig",
    "RateLimitConfig",
    "RetryConfig",
    "TikTokConfig",
    "liveness_timeout_s",
    "load_config",
    "masked",
    "parse_config",
]

# A rebalance or stop blocks the consumer thread (and its heartbeat) for up to the drain time;
# liveness must allow that plus this much before it declares the loop stuck.
LIVENESS_MIN_MARGIN_S: Final = 10.0
# The default liveness timeout is the drain time plus this (60 s with the default drain).
LIVENESS_DEFAULT_MARGIN_S: Final = 35.0
REDIS_SCHEMES: Final = ("redis", "rediss", "unix")

PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
ClientValue = str | int | float | bool


# Every section is frozen (immutable after load) and forbids unknown fields (a typo in a key
# is an error, not a silent default); kw_only lets required keys follow defaulted ones.


# The values of Segment's Kafka destination "Authentication Mechanism" setting, plus none.
KafkaMechanism = Literal[
    "none", "plain", "scram-sha-256", "scram-sha-512", "aws", "client-cert-auth"
]


class KafkaSecurityConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How every Kafka client of the worker authenticates (worker.kafka.security applies it).

    Mirrors the settings of Segment's Kafka destination, so a user copies the same choices;
    secrets come from `${VAR}` or mounted files, never inline (checked in parse_config)."""

    mechanism: KafkaMechanism = "none"
    # Segment's "SSL Enabled"; None means on for every mechanism but none.
    tls: bool | None = None
    username: NonEmptyStr | None = None
    password: NonEmptyStr | None = None
    password_file: NonEmptyStr | None = None
    ca_file: NonEmptyStr | None = None  # "SSL Certificate Authority", as a PEM file
    cert_file: NonEmptyStr | None = None  # "SSL Client Certificate"
    key_file: NonEmptyStr | None = None  # "SSL Client Key"
    key_password: NonEmptyStr | None = None
    verify_certificates: bool = True  # "SSL Reject Unauthorized CA"
    aws_region: NonEmptyStr | None = None  # aws: default $AWS_REGION / $AWS_DEFAULT_REGION
    aws_role_arn: NonEmptyStr | None = None  # aws: assume this role (default: the credential chain)

    @property
    def tls_enabled(self) -> bool:
        return self.tls if self.tls is not None else self.mechanism != "none"


class KafkaConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    bootstrap_servers: NonEmptyStr = "localhost:9092"
    topics: Annotated[tuple[NonEmptyStr, ...], msgspec.Meta(min_length=1)] = ("segment-events",)
    group_id: NonEmptyStr = "tiktok-conversions"
    dead_letter_topic: NonEmptyStr = "segment-events.tiktok-dlq"
    # Parked events (SPEC §4); consumed by the workers as group `<group_id>.retry`.
    retry_topic: NonEmptyStr = "segment-events.tiktok-retry"
    # Where a group with no committed offset begins (librdkafka's auto.offset.reset).
    start_from: Literal["earliest", "latest"] = "earliest"
    security: KafkaSecurityConfig = msgspec.field(default_factory=KafkaSecurityConfig)
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
    # Events whose Segment `timestamp` is older are skipped (too_old): TikTok deduplicates
    # event_id for 48 h only, so a replay of older history would count twice. null: no limit.
    max_event_age_s: PositiveFloat | None = 172800.0
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    circuit: CircuitConfig = msgspec.field(default_factory=CircuitConfig)
    # Segment's destination always sends "Segment"; keeping it means the same bodies TikTok
    # already accepts for this customer. null omits the key.
    partner_name: NonEmptyStr | None = "Segment"


class RateLimitConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    qps: PositiveFloat = 1000.0
    backend: Literal["redis", "local"] = "redis"
    redis_url: NonEmptyStr = "redis://localhost:6379/0"
    # The password on its own, so it need not be percent-encoded into redis_url.
    redis_password: NonEmptyStr | None = None
    expected_replicas: PositiveInt = 1
    # Fraction of qps the schedule holds back so that requests released on time but sent a
    # little late still arrive within the budget (default measured by `make bench`).
    headroom: Annotated[float, msgspec.Meta(ge=0, le=0.5)] = DEFAULT_HEADROOM


class HttpConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    host: NonEmptyStr = "0.0.0.0"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 9464
    # null: kafka.drain_timeout_s + LIVENESS_DEFAULT_MARGIN_S (see liveness_timeout_s()).
    liveness_timeout_s: PositiveFloat | None = None


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
    _check_not_inline(data)
    data = _interpolate(data, (), env)
    try:
        config = msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_translate(str(exc))) from None
    _check_semantics(config)
    if config.http.liveness_timeout_s is None:  # the effective value, for readers and output
        http = msgspec.structs.replace(config.http, liveness_timeout_s=liveness_timeout_s(config))
        config = msgspec.structs.replace(config, http=http)
    return config


# Secrets of kafka.security that must come from the environment (or a *_file key).
_NOT_INLINE: Final = ("password", "key_password")


def _check_not_inline(data: Any) -> None:
    """Refuse a literal Kafka password in the file: it belongs in ${VAR} or a mounted file."""
    kafka = data.get("kafka") if isinstance(data, dict) else None
    security = kafka.get("security") if isinstance(kafka, dict) else None
    if not isinstance(security, dict):
        return
    for key in _NOT_INLINE:
        value = security.get(key)
        if isinstance(value, str) and value and "${" not in value:
            alt = " or password_file" if key == "password" else ""
            raise ConfigError(
                f"kafka.security.{key}: must not be written in the file; use ${{VAR}} "
                f"(an environment variable){alt}"
            )


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
    m = parse_validation_message(message)
    path = m.key_path
    where = path or "(top level)"
    if m.kind is ErrorKind.MISSING_FIELD:
        return f"{_join(path, m.field or '')}: required"
    if m.kind is ErrorKind.UNKNOWN_FIELD:
        return f"{_join(path, m.field or '')}: unknown key"
    if m.kind is ErrorKind.INVALID_ENUM:
        choices = _enum_choices(path)
        reason = f"must be one of: {', '.join(choices)}" if choices else "not an allowed value"
        return f"{where}: {reason}"
    if m.kind is ErrorKind.WRONG_TYPE:
        want = " or ".join(_TYPE_NAMES.get(t, t) for t in m.expected)
        got = m.got or ""
        quote = got in ("bool", "int", "float") and "str" in m.expected
        hint = " (quote the value in YAML)" if quote else ""
        return f"{where}: expected {want}, got {_TYPE_NAMES.get(got, got)}{hint}"
    if m.kind is ErrorKind.CONSTRAINT:
        kind, constraint = " | ".join(m.expected), m.constraint or ""
        if "matching regex" in constraint and path.endswith("name"):
            return (
                f"{path}: must be 1-64 characters of letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        if constraint.startswith("of length >= 1"):
            return f"{path}: must not be empty"
        return f"{path}: must be {_TYPE_NAMES.get(kind, kind)} {constraint}"
    msg = m.text
    return f"{where}: {msg[0].lower() + msg[1:] if msg else 'invalid'}"


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
    """Checks msgspec cannot express: uniqueness, cross-field ranges, source ids."""
    # A rebalance or stop blocks the consumer thread (and its heartbeat) for up to the drain
    # time plus a margin; liveness must not declare that stuck and get the pod restarted.
    # Only an explicit value can break the rule: the default is derived from the drain time.
    floor = config.kafka.drain_timeout_s + LIVENESS_MIN_MARGIN_S
    if config.http.liveness_timeout_s is not None and config.http.liveness_timeout_s <= floor:
        raise ConfigError(
            f"http.liveness_timeout_s: must be greater than kafka.drain_timeout_s + "
            f"{LIVENESS_MIN_MARGIN_S:g} ({floor:g}): draining a revoked partition pauses "
            "the consumer loop that long (leave it out to derive it from the drain time)"
        )
    _check_base_url(config.tiktok.base_url)
    _check_redis(config.rate_limit)
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
    _check_kafka_security(config.kafka)
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
        if key == "auto.offset.reset":
            raise ConfigError(
                "kafka.client.auto.offset.reset: set kafka.start_from (earliest or latest) instead"
            )
    _check_kafka_client(config.kafka)
    seen: dict[str, int] = {}
    for i, dest in enumerate(config.destinations):
        where = f"destinations[{i}]"
        if dest.name in seen:
            raise ConfigError(
                f"{where}.name: duplicate destination name (also destinations[{seen[dest.name]}])"
            )
        seen[dest.name] = i
        _check_source_ids(dest, where)
        if dest.phone_default_region is not None and (
            dest.phone_default_region not in phonenumbers.SUPPORTED_REGIONS
        ):
            raise ConfigError(
                f"{where}.phone_default_region: not a supported ISO 3166-1 alpha-2 region "
                "(upper case, e.g. US, GB, DE)"
            )
        if dest.event_source == "crm" and not dest.subscriptions:
            raise ConfigError(
                f"{where}.subscriptions: required for event_source crm (Segment has no CRM "
                "presets; CRM events use your own event names)"
            )
    # Triggers, subscription names and mapping overrides are checked where they are compiled,
    # once, by `worker.mapping.Mapper` (every command that maps builds one at start-up).


def _check_source_ids(dest: DestinationConfig, where: str) -> None:
    """The id key of the destination's source is required; the other sources' keys are
    errors (a pixel code on an offline destination is a mistake, not a spare value)."""
    wanted = SOURCE_ID_KEYS[dest.event_source]
    if getattr(dest, wanted) is None:
        because = "" if dest.event_source == "web" else f" for event_source {dest.event_source}"
        raise ConfigError(f"{where}.{wanted}: required{because}")
    for key in ("pixel_code", "event_set_id", "tiktok_app_id"):
        if key != wanted and getattr(dest, key) is not None:
            raise ConfigError(
                f"{where}.{key}: not used by event_source {dest.event_source} "
                f"(it needs {wanted}); remove it"
            )


def liveness_timeout_s(config: Config) -> float:
    """`http.liveness_timeout_s`, or its default derived from `kafka.drain_timeout_s`."""
    if config.http.liveness_timeout_s is not None:
        return config.http.liveness_timeout_s
    return config.kafka.drain_timeout_s + LIVENESS_DEFAULT_MARGIN_S


def _check_base_url(url: str) -> None:
    """`tiktok.base_url` must be http(s)://host[:port] with an optional path prefix."""
    where = "tiktok.base_url"
    form = "must be http://host[:port] or https://host[:port]"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError:
        raise ConfigError(f"{where}: {form} (the port is not a number from 1 to 65535)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: {form}, got {url!r}")
    if port == 0 or parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(f"{where}: {form} (no credentials, query or fragment), got {url!r}")


def _check_redis(rate_limit: RateLimitConfig) -> None:
    """`rate_limit.redis_url`: redis://, rediss:// or unix://, parseable as redis-py parses it,
    or redis+sentinel:// with sentinels and a master name.
    Error texts never repeat the URL: it may hold a password."""
    where = "rate_limit.redis_url"
    url = rate_limit.redis_url
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme in SENTINEL_SCHEMES:
        try:
            parse_sentinel_url(url)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return
    if scheme not in REDIS_SCHEMES:
        raise ConfigError(
            f"{where}: must start with redis://, rediss:// (TLS), unix:// or redis+sentinel:// "
            "(e.g. redis://redis:6379/0)"
        )
    encode_hint = (
        "percent-encode reserved characters in the user name and password "
        "(@ as %40, : as %3A, / as %2F), or set rate_limit.redis_password"
    )
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (parsing the port is the check)
    except ValueError:
        raise ConfigError(f"{where}: not a valid URL; {encode_hint}") from None
    if scheme == "unix":
        if not parts.path:
            raise ConfigError(f"{where}: unix:// needs a socket path (unix:///run/redis.sock)")
    elif not parts.hostname:
        raise ConfigError(f"{where}: no host; {encode_hint}")
    elif parts.path not in ("", "/") and not parts.path.lstrip("/").isdigit():
        raise ConfigError(
            f"{where}: the path must be a database number (redis://host:6379/0); {encode_hint}"
        )
    try:  # and as redis-py will at start-up (no connection is made)
        import redis.asyncio

        redis.asyncio.ConnectionPool.from_url(url)
    except ValueError:
        raise ConfigError(f"{where}: not a valid Redis URL; {encode_hint}") from None
    if rate_limit.redis_password is not None and parts.password:
        raise ConfigError(
            "rate_limit.redis_password: the redis_url holds a password too; keep one of them"
        )


def _check_kafka_client(kafka: KafkaConfig) -> None:
    """Build the consumer and producer settings the worker will use and let librdkafka check
    every property name and value, exactly as start-up does, without contacting a broker
    (no bootstrap servers are given to these throw-away clients)."""
    # Imported here: confluent_kafka is only needed when there is a config to check.
    from confluent_kafka import Consumer, KafkaException, Producer

    from worker.kafka.settings import consumer_settings, producer_settings

    consumer = consumer_settings(
        bootstrap_servers="",
        group_id=kafka.group_id,
        client=kafka.client,
        start_from=kafka.start_from,
    )
    producer = producer_settings(bootstrap_servers="", client=kafka.client)
    for factory, conf in ((Consumer, consumer), (Producer, producer)):
        conf = {k: v for k, v in conf.items() if k != "bootstrap.servers"}
        # librdkafka's warnings (no bootstrap.servers here) go to a logger nobody polls.
        conf["logger"] = _SILENT_KAFKA_LOGGER
        try:
            client = factory(conf)
        except KafkaException as exc:
            raise ConfigError(librdkafka_error(exc.args[0].str(), kafka.client)) from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"kafka.client: {exc}") from None
        if isinstance(client, Consumer):
            client.close()
        else:
            client.flush(0)


_SILENT_KAFKA_LOGGER: Final = logging.getLogger("worker.config.librdkafka-check")
_SILENT_KAFKA_LOGGER.propagate = False
_SILENT_KAFKA_LOGGER.addHandler(logging.NullHandler())

_DOTTED_RE: Final = re.compile(r"\b[a-z]+(?:\.[a-z]+)+\b")
_PROPERTY_RE: Final = re.compile(r'property:?\s+"([^"]+)"')


def librdkafka_error(text: str, keys: Iterable[str] = ()) -> str:
    """`kafka.client.<property>: <librdkafka's reason>`, naming the property when the text
    quotes it or mentions one of `keys` (the configured properties). librdkafka quotes a
    refused value; for a secret-looking property it is left out."""
    text = re.sub(r"^Failed to create (consumer|producer|admin client): ", "", text)
    m = _PROPERTY_RE.search(text)
    key: str | None = m.group(1) if m else None
    if key is None:
        mentioned = [k for k in keys if k in text]
        if "SASL mechanism" in text:
            mentioned.append("sasl.mechanism")
        key = max(mentioned, key=len) if mentioned else None
    if key is None and (dotted := _DOTTED_RE.search(text)):  # "sasl.username ... must be set"
        key = dotted.group(0)
    if key is None:
        return f"kafka.client: {text}"
    if is_secret_key(key):
        return f"kafka.client.{key}: refused by librdkafka (value not shown)"
    return f"kafka.client.{key}: {text}"


def _check_kafka_security(kafka: KafkaConfig) -> None:
    """Combinations of kafka.security that cannot work; files are checked when used."""
    sec = kafka.security
    where = "kafka.security"
    sasl = sec.mechanism in ("plain", "scram-sha-256", "scram-sha-512")
    if sasl:
        if sec.username is None:
            raise ConfigError(f"{where}.username: required for mechanism {sec.mechanism}")
        if (sec.password is None) == (sec.password_file is None):
            raise ConfigError(
                f"{where}.password: mechanism {sec.mechanism} needs exactly one of "
                "password (${VAR}) and password_file"
            )
    else:
        for key in ("username", "password", "password_file"):
            if getattr(sec, key) is not None:
                raise ConfigError(
                    f"{where}.{key}: only used with mechanism plain, scram-sha-256 or "
                    f"scram-sha-512 (mechanism is {sec.mechanism})"
                )
    if sec.mechanism != "aws":
        for key in ("aws_region", "aws_role_arn"):
            if getattr(sec, key) is not None:
                raise ConfigError(f"{where}.{key}: only used with mechanism aws")
    if sec.mechanism == "client-cert-auth" and (sec.cert_file is None or sec.key_file is None):
        raise ConfigError(
            f"{where}.{'cert_file' if sec.cert_file is None else 'key_file'}: "
            "required for mechanism client-cert-auth"
        )
    if (sec.cert_file is None) != (sec.key_file is None):
        raise ConfigError(
            f"{where}.{'cert_file' if sec.cert_file is None else 'key_file'}: "
            "a client certificate needs both cert_file and key_file"
        )
    if sec.key_password is not None and sec.key_file is None:
        raise ConfigError(f"{where}.key_password: only used with key_file")
    if not sec.tls_enabled:
        if sec.mechanism in ("aws", "client-cert-auth"):
            raise ConfigError(
                f"{where}.tls: mechanism {sec.mechanism} needs TLS; remove tls: false"
            )
        for key in ("ca_file", "cert_file"):
            if getattr(sec, key) is not None:
                raise ConfigError(f"{where}.{key}: only used with TLS (tls: true)")
    if sec.mechanism != "none" or sec.tls_enabled:
        for key in kafka.client:
            if key == "security.protocol" or key.startswith(("sasl.", "ssl.")):
                raise ConfigError(
                    f"kafka.client.{key}: conflicts with kafka.security; "
                    "configure authentication and TLS in one place (kafka.security)"
                )


# --------------------------------------------------------------------------- masking


def secret_values(config: Config) -> list[str]:
    """Every secret the config holds (tokens, passwords), for log scrubbing."""
    values = [d.access_token for d in config.destinations]
    security = config.kafka.security
    values += [v for v in (security.password, security.key_password) if v]
    values += [str(v) for k, v in config.kafka.client.items() if is_secret_key(k)]
    values += url_secrets(config.rate_limit.redis_url)
    if config.rate_limit.redis_password:
        values.append(config.rate_limit.redis_password)
    return values


def masked(config: Config) -> dict[str, Any]:
    """The effective config as plain data, with every secret replaced by `***`."""
    data: dict[str, Any] = msgspec.to_builtins(config)
    data["kafka"]["client"] = {
        k: (MASK if is_secret_key(k) else v) for k, v in data["kafka"]["client"].items()
    }
    security = data["kafka"]["security"]
    for key in ("password", "key_password"):
        if security.get(key) is not None:
            security[key] = MASK
    data["rate_limit"]["redis_url"] = mask_url_credentials(data["rate_limit"]["redis_url"])
    if data["rate_limit"]["redis_password"] is not None:
        data["rate_limit"]["redis_password"] = MASK
    for dest in data["destinations"]:
        dest["access_token"] = MASK
    return data
