"""Configuration loading: defaults, ${VAR} interpolation, validation messages, masking."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from worker.config import Config, load_config, masked, parse_config
from worker.errors import ConfigError
from worker.mapping.mapper import Mapper

MINIMAL = """
destinations:
  - name: web-shop
    pixel_code: PIXEL1
    access_token: tok-1
"""


def config_error(text: str, environ: dict[str, str] | None = None) -> str:
    """The one-line error start-up gives: the config is parsed, then its mapping compiled."""
    with pytest.raises(ConfigError) as err:
        Mapper(parse_config(textwrap.dedent(text), environ=environ or {}))
    message = str(err.value)
    assert "\n" not in message
    return message


def test_defaults_are_the_specs() -> None:
    c = parse_config(MINIMAL, environ={})
    assert isinstance(c, Config)
    assert c.kafka.bootstrap_servers == "localhost:9092"
    assert c.kafka.topics == ("segment-events",)
    assert c.kafka.group_id == "tiktok-conversions"
    assert c.kafka.dead_letter_topic == "segment-events.tiktok-dlq"
    assert c.kafka.client == {}
    assert (c.kafka.max_inflight_messages, c.kafka.commit_interval_s, c.kafka.drain_timeout_s) == (
        20000,
        1.0,
        25.0,
    )
    t = c.tiktok
    assert (t.base_url, t.max_batch_events, t.batch_linger_ms) == (
        "https://business-api.tiktok.com",
        1000,
        200,
    )
    assert (t.request_timeout_s, t.max_concurrent_requests, t.partner_name) == (10, 64, "Segment")
    assert (t.retry.initial_backoff_s, t.retry.max_backoff_s, t.retry.deadline_s) == (0.5, 60, 3600)
    assert t.retry.in_memory_s == 30
    assert (t.circuit.failure_threshold, t.circuit.open_s, t.circuit.max_open_s) == (5, 30, 300)
    assert c.kafka.retry_topic == "segment-events.tiktok-retry"
    r = c.rate_limit
    assert (r.qps, r.backend, r.redis_url, r.expected_replicas, r.headroom) == (
        1000,
        "redis",
        "redis://localhost:6379/0",
        1,
        0.05,
    )
    assert (c.http.host, c.http.port, c.http.liveness_timeout_s) == ("0.0.0.0", 9464, 60.0)
    assert (c.logging.level, c.logging.format) == ("info", "json")
    (d,) = c.destinations
    assert (d.name, d.pixel_code, d.access_token) == ("web-shop", "PIXEL1", "tok-1")
    assert (d.app_id, d.test_event_code, d.when, d.presets, d.phone_default_region) == (
        None,
        None,
        None,
        "documented",
        None,
    )
    assert d.subscriptions == ()


def test_full_config_round_trips() -> None:
    text = """
    kafka:
      bootstrap_servers: k1:9093,k2:9093
      topics: [a, b]
      client:
        security.protocol: SASL_SSL
        sasl.mechanism: PLAIN
        sasl.username: user
        sasl.password: secret
        queued.max.messages.kbytes: 65536
        enable.partition.eof: false
    tiktok: {max_batch_events: 50, partner_name: null, retry: {deadline_s: 60}}
    rate_limit: {backend: local, qps: 2.5}
    http: {port: 0}
    logging: {level: debug, format: console}
    destinations:
      - name: web-shop
        pixel_code: PIXEL1
        access_token: tok
        presets: all
        phone_default_region: GB
        when: 'context.app.name = "shop"'
        subscriptions:
          - name: Custom
            trigger: 'type = "track" and event = "Product Added"'
            event: AddToCart
            contents: single
            mapping:
              email: ["$.properties.email", "$.context.traits.email"]
              value: $.properties.total
              event_source: {value: web}
              ttclid: null
    """
    c = parse_config(textwrap.dedent(text), environ={})
    assert c.kafka.topics == ("a", "b")
    assert c.kafka.client["queued.max.messages.kbytes"] == 65536
    assert c.kafka.client["enable.partition.eof"] is False
    assert (c.tiktok.max_batch_events, c.tiktok.partner_name, c.tiktok.retry.deadline_s) == (
        50,
        None,
        60,
    )
    assert (c.rate_limit.backend, c.rate_limit.qps, c.http.port) == ("local", 2.5, 0)
    sub = c.destinations[0].subscriptions[0]
    assert sub.mapping["email"] == ("$.properties.email", "$.context.traits.email")
    assert sub.mapping["ttclid"] is None


def test_env_interpolation() -> None:
    text = """
    rate_limit: {redis_url: "redis://:${REDIS_PASSWORD}@redis:6379/${REDIS_DB:-0}", qps: "${QPS}"}
    http: {port: "${PORT:-9100}"}
    destinations:
      - name: ${NAME:-shop}
        pixel_code: ${PIXEL}
        access_token: ${TOKEN}
        test_event_code: "$${NOT_A_VAR}"
    """
    env = {"REDIS_PASSWORD": "pw", "QPS": "250", "PIXEL": "P", "TOKEN": "T", "REDIS_DB": ""}
    c = parse_config(textwrap.dedent(text), environ=env)
    assert c.rate_limit.redis_url == "redis://:pw@redis:6379/0"  # empty REDIS_DB -> default
    assert c.rate_limit.qps == 250
    assert c.http.port == 9100
    d = c.destinations[0]
    assert (d.name, d.pixel_code, d.access_token, d.test_event_code) == (
        "shop",
        "P",
        "T",
        "${NOT_A_VAR}",
    )


def test_environment_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TW_TEST_TOKEN", "from-env")
    text = MINIMAL.replace("tok-1", "${TW_TEST_TOKEN}")
    assert parse_config(text).destinations[0].access_token == "from-env"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "destinations:\n  - name: a\n    pixel_code: [oops\n",
            "YAML syntax error at line 4",
            id="yaml-syntax",
        ),
        pytest.param(
            MINIMAL + "kafka: {bootstrap_server: x}\n",
            "kafka.bootstrap_server: unknown key",
            id="unknown-key",
        ),
        pytest.param(
            MINIMAL.replace("access_token: tok-1", "access_token: tok-1\n    acess_token: x"),
            "destinations[0].acess_token: unknown key",
            id="unknown-nested-key",
        ),
        pytest.param(
            """
            destinations:
              - {name: a, pixel_code: P, access_token: T}
              - {name: b, access_token: T}
            """,
            "destinations[1].pixel_code: required",
            id="missing-required",
        ),
        pytest.param("kafka: {}\n", "destinations: required", id="no-destinations"),
        pytest.param(
            "destinations: []\n", "destinations: must not be empty", id="empty-destinations"
        ),
        pytest.param(
            MINIMAL + "tiktok: {max_batch_events: 1001}\n",
            "tiktok.max_batch_events: must be an integer <= 1000",
            id="batch-too-large",
        ),
        pytest.param(
            MINIMAL + "tiktok: {max_batch_events: 0}\n",
            "tiktok.max_batch_events: must be an integer >= 1",
            id="batch-zero",
        ),
        pytest.param(
            MINIMAL + "rate_limit: {qps: 0}\n",
            "rate_limit.qps: must be a number > 0.0",
            id="qps-zero",
        ),
        pytest.param(
            MINIMAL + "http: {port: 70000}\n",
            "http.port: must be an integer <= 65535",
            id="port-range",
        ),
        pytest.param(
            MINIMAL + "rate_limit: {backend: memcached}\n",
            "rate_limit.backend: must be one of: redis, local",
            id="bad-enum",
        ),
        pytest.param(
            MINIMAL.replace("tok-1", "tok-1\n    presets: some"),
            "destinations[0].presets: must be one of: documented, all, none",
            id="bad-presets",
        ),
        pytest.param(
            MINIMAL + "logging: {level: verbose}\n",
            "logging.level: must be one of: debug, info, warning, error, critical",
            id="bad-level",
        ),
        pytest.param(
            MINIMAL + "kafka: {topics: segment}\n",
            "kafka.topics: expected a list, got a string",
            id="wrong-type",
        ),
        pytest.param(
            MINIMAL.replace("PIXEL1", "12345"),
            "destinations[0].pixel_code: expected a string or null, got an integer "
            "(quote the value in YAML)",
            id="number-for-string",
        ),
        pytest.param(
            MINIMAL.replace("tok-1", "tok-1\n    phone_default_region: NO"),
            "destinations[0].phone_default_region: expected a string or null, got a boolean "
            "(quote the value in YAML)",
            id="yaml-norway-problem",
        ),
        pytest.param(
            MINIMAL.replace("tok-1", "tok-1\n    phone_default_region: usa"),
            "destinations[0].phone_default_region: not a supported ISO 3166-1 alpha-2 region",
            id="bad-region",
        ),
        pytest.param(
            MINIMAL.replace("name: web-shop", "name: web shop"),
            "destinations[0].name: must be 1-64 characters of letters, digits",
            id="bad-name",
        ),
        pytest.param(
            MINIMAL + MINIMAL.replace("destinations:\n", "").replace("PIXEL1", "PIXEL2"),
            "destinations[1].name: duplicate destination name (also destinations[0])",
            id="duplicate-destination",
        ),
        pytest.param(
            MINIMAL.replace("tok-1", "tok-1\n    when: 'type = '"),
            "destinations[0].when: expected a value after '=', found end of trigger at position 8",
            id="bad-when",
        ),
        pytest.param(
            MINIMAL.replace(
                "tok-1",
                "tok-1\n    subscriptions:\n"
                "      - {name: s, event: E, trigger: 'event = \"x\" and (type'}",
            ),
            "destinations[0].subscriptions[0].trigger: "
            "expected ')', found end of trigger at position 22",
            id="bad-trigger",
        ),
        pytest.param(
            MINIMAL.replace(
                "tok-1",
                "tok-1\n    subscriptions:\n"
                "      - {name: Search, event: E, trigger: 'type = \"x\"'}",
            ),
            "destinations[0].subscriptions[0].name: duplicate subscription name 'Search'",
            id="subscription-clashes-with-preset",
        ),
        pytest.param(
            MINIMAL.replace("tok-1", "tok-1\n    subscriptions:\n      - {name: s, event: E}"),
            "destinations[0].subscriptions[0].trigger: required",
            id="subscription-trigger-required",
        ),
        pytest.param(
            MINIMAL + "tiktok: {retry: {initial_backoff_s: 5, max_backoff_s: 1}}\n",
            "tiktok.retry.max_backoff_s: must be >= tiktok.retry.initial_backoff_s",
            id="backoff-order",
        ),
        pytest.param(
            MINIMAL + "tiktok: {circuit: {open_s: 60, max_open_s: 30}}\n",
            "tiktok.circuit.max_open_s: must be >= tiktok.circuit.open_s",
            id="circuit-open-order",
        ),
        pytest.param(
            MINIMAL + "tiktok: {circuit: {failure_threshold: 0}}\n",
            "tiktok.circuit.failure_threshold: must be an integer >= 1",
            id="circuit-threshold",
        ),
        pytest.param(
            MINIMAL + "tiktok: {retry: {in_memory_s: 0}}\n",
            "tiktok.retry.in_memory_s: must be a number > 0",
            id="in-memory-positive",
        ),
        pytest.param(
            MINIMAL + "kafka: {retry_topic: segment-events.tiktok-dlq}\n",
            "kafka.retry_topic: must differ from kafka.dead_letter_topic",
            id="retry-topic-is-dlq",
        ),
        pytest.param(
            MINIMAL + "kafka: {topics: [a, b], retry_topic: b}\n",
            "kafka.retry_topic: must not be one of kafka.topics",
            id="retry-topic-is-source",
        ),
        pytest.param(
            MINIMAL + "kafka: {client: {enable.auto.commit: true}}\n",
            "kafka.client.enable.auto.commit: managed by the worker",
            id="managed-client-key",
        ),
        pytest.param(
            MINIMAL + "kafka: {client: {sasl.mechanism: [a]}}\n",
            "kafka.client.sasl.mechanism: expected a string, number or boolean",
            id="client-value-type",
        ),
        pytest.param(
            "- just\n- a list\n", "(top level): expected a mapping, got a list", id="not-a-mapping"
        ),
        pytest.param(
            MINIMAL.replace("tok-1", "${MISSING_TOKEN}"),
            "destinations[0].access_token: environment variable MISSING_TOKEN is not set",
            id="unset-variable",
        ),
        pytest.param(
            MINIMAL.replace("tok-1", "''"),
            "destinations[0].access_token: must not be empty",
            id="empty-token",
        ),
    ],
)
def test_errors_name_the_key_path(text: str, message: str) -> None:
    got = config_error(text)
    assert got.startswith(message), got


def test_load_config_reads_files_and_reports_missing_ones(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(MINIMAL)
    assert load_config(path, environ={}).destinations[0].name == "web-shop"
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "nope.yaml", environ={})
    assert str(err.value).startswith(f"{tmp_path / 'nope.yaml'}: cannot read")


def test_masked_hides_every_secret() -> None:
    text = """
    kafka:
      client:
        sasl.username: user
        sasl.password: kafka-secret
        ssl.key.password: key-secret
        sasl.oauthbearer.client.secret: oauth-secret
        sasl.oauthbearer.config: oauth-config-secret
        ssl.key.location: /etc/key.pem
    rate_limit: {redis_url: "rediss://default:redis-secret@redis:6380/0"}
    destinations:
      - {name: a, pixel_code: P1, access_token: token-secret-1}
      - {name: b, pixel_code: P2, access_token: token-secret-2}
    """
    c = parse_config(textwrap.dedent(text), environ={})
    dump = yaml.safe_dump(masked(c))
    for secret in (
        "kafka-secret",
        "key-secret",
        "oauth-secret",
        "oauth-config-secret",
        "redis-secret",
        "token-secret-1",
        "token-secret-2",
    ):
        assert secret not in dump
    data = masked(c)
    assert data["kafka"]["client"]["sasl.username"] == "user"
    assert data["kafka"]["client"]["ssl.key.location"] == "/etc/key.pem"
    assert data["rate_limit"]["redis_url"] == "rediss://***@redis:6380/0"  # all of user:password
    assert [d["access_token"] for d in data["destinations"]] == ["***", "***"]
    assert [d["pixel_code"] for d in data["destinations"]] == ["P1", "P2"]
    # The config itself is untouched.
    assert c.destinations[0].access_token == "token-secret-1"


def test_config_is_frozen() -> None:
    c = parse_config(MINIMAL, environ={})
    with pytest.raises(AttributeError):
        c.kafka = c.kafka  # type: ignore[misc]


def test_liveness_must_outlast_a_drain() -> None:
    text = """
kafka: {drain_timeout_s: 30}
http: {liveness_timeout_s: 35}
destinations: [{name: a, pixel_code: P, access_token: t}]
"""
    with pytest.raises(ConfigError, match=r"^http\.liveness_timeout_s: must be greater than"):
        parse_config(text)


# --------------------------------------------------------------------------- issue 19


def test_start_from_defaults_to_earliest_and_sets_auto_offset_reset() -> None:
    from worker.kafka.settings import consumer_settings

    assert parse_config(MINIMAL, environ={}).kafka.start_from == "earliest"
    c = parse_config(MINIMAL + "kafka: {start_from: latest}\n", environ={})
    assert c.kafka.start_from == "latest"
    conf = consumer_settings(
        bootstrap_servers="b:9092",
        group_id="g",
        client=c.kafka.client,
        start_from=c.kafka.start_from,
    )
    assert conf["auto.offset.reset"] == "latest"
    assert config_error(MINIMAL + "kafka: {start_from: beginning}\n") == (
        "kafka.start_from: must be one of: earliest, latest"
    )
    # One place decides it: the raw librdkafka property would contradict start_from.
    assert config_error(MINIMAL + "kafka: {client: {auto.offset.reset: latest}}\n").startswith(
        "kafka.client.auto.offset.reset: set kafka.start_from"
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        pytest.param(
            "kafka: {client: {securty.protocol: SASL_SSL}}\n",
            'kafka.client.securty.protocol: No such configuration property: "securty.protocol"',
            id="librdkafka-key-typo",
        ),
        pytest.param(
            "kafka: {client: {security.protocol: SASL_SSLL}}\n",
            'kafka.client.security.protocol: Invalid value "SASL_SSLL"',
            id="librdkafka-bad-value",
        ),
        pytest.param(
            "kafka: {client: {security.protocol: SASL_SSL, sasl.mechanism: PLAINX, "
            "sasl.username: u, sasl.password: p}}\n",
            "kafka.client.sasl.mechanism: Unsupported SASL mechanism: PLAINX",
            id="librdkafka-refused-at-client-creation",
        ),
        pytest.param(
            "kafka: {client: {security.protocol: SASL_SSL, sasl.mechanism: PLAIN}}\n",
            "kafka.client.sasl.username: sasl.username and sasl.password must be set",
            id="librdkafka-missing-credentials",
        ),
        pytest.param(
            'tiktok: {base_url: "127.0.0.1:44961"}\n',
            "tiktok.base_url: must be http://host[:port] or https://host[:port]",
            id="base-url-without-scheme",
        ),
        pytest.param(
            'tiktok: {base_url: "https://:443"}\n',
            "tiktok.base_url: must be http://host[:port] or https://host[:port]",
            id="base-url-without-host",
        ),
        pytest.param(
            'tiktok: {base_url: "https://api.example:port"}\n',
            "tiktok.base_url: must be http://host[:port] or https://host[:port] "
            "(the port is not a number",
            id="base-url-bad-port",
        ),
        pytest.param(
            'rate_limit: {redis_url: "not a url"}\n',
            "rate_limit.redis_url: must start with redis://, rediss:// (TLS), unix:// or "
            "redis+sentinel://",
            id="redis-url-not-a-url",
        ),
        pytest.param(
            'rate_limit: {redis_url: "redis+sentinel://:pw@sentinel-a:26379,sentinel-b/m"}\n',
            "rate_limit.redis_url: redis+sentinel URL: expected host:port",
            id="sentinel-url-without-port",
        ),
        pytest.param(
            'rate_limit: {redis_url: "redis+sentinel://sentinel-a:26379"}\n',
            "rate_limit.redis_url: redis+sentinel URL: expected /<master name>",
            id="sentinel-url-without-master",
        ),
        pytest.param(
            "rate_limit: {headroom: 0.6}\n",
            "rate_limit.headroom:",
            id="headroom-too-large",
        ),
        pytest.param(
            'rate_limit: {redis_url: "http://redis:6379/0"}\n',
            "rate_limit.redis_url: must start with redis://, rediss:// (TLS), unix:// or "
            "redis+sentinel://",
            id="redis-url-wrong-scheme",
        ),
        pytest.param(
            'rate_limit: {redis_url: "redis://:p@ss:w/rd@redis:6379/0"}\n',
            "rate_limit.redis_url: not a valid URL; percent-encode reserved characters",
            id="redis-url-unencoded-password",
        ),
        pytest.param(
            'rate_limit: {redis_url: "redis://:pw@redis:6379/0", redis_password: pw2}\n',
            "rate_limit.redis_password: the redis_url holds a password too",
            id="redis-password-twice",
        ),
    ],
)
def test_config_refuses_what_start_up_refuses(extra: str, message: str) -> None:
    got = config_error(MINIMAL + extra)
    assert got.startswith(message), got
    assert "p@ss" not in got  # never the password
    assert "w/rd" not in got


def test_librdkafka_value_of_a_secret_property_is_not_repeated() -> None:
    from worker.config import librdkafka_error

    text = 'Invalid value "hunter2" for configuration property "sasl.password"'
    assert librdkafka_error(text) == (
        "kafka.client.sasl.password: refused by librdkafka (value not shown)"
    )


def test_redis_urls_that_redis_py_accepts_pass() -> None:
    for url in (
        "redis://redis:6379/0",
        "rediss://user:p%40ss%3Aw%2Frd@redis.example:6380/2",
        "redis://:p@ss@redis:6379/0",  # an unencoded @ is still unambiguous
        "unix:///run/redis/redis.sock",
        "redis://redis",
    ):
        c = parse_config(MINIMAL + f'rate_limit: {{redis_url: "{url}"}}\n', environ={})
        assert c.rate_limit.redis_url == url


@pytest.mark.parametrize(
    ("url", "shown", "secrets"),
    [
        ("redis://:p%40ss%3Aw%2Frd@redis:6379/0", "redis://***@redis:6379/0", ["p%40ss"]),
        ("redis://:p@ss@redis:6379/0", "redis://***@redis:6379/0", ["p@ss", "ss@"]),
        ("rediss://admin:pw-123456@r:6380/1", "rediss://***@r:6380/1", ["admin", "pw-123456"]),
        ("redis://redis:6379/0", "redis://redis:6379/0", []),
    ],
)
def test_masked_hides_the_whole_userinfo(url: str, shown: str, secrets: list[str]) -> None:
    from worker.config import secret_values

    c = parse_config(MINIMAL + f'rate_limit: {{redis_url: "{url}"}}\n', environ={})
    data = masked(c)
    assert data["rate_limit"]["redis_url"] == shown
    dump = yaml.safe_dump(data)
    for secret in secrets:
        assert secret not in dump
    userinfo = url.partition("://")[2].rpartition("@")[0]
    if userinfo:
        assert userinfo in secret_values(c)  # scrubbed from logs too


def test_masked_hides_a_password_written_unencoded_however_it_is_written() -> None:
    from worker.core.redaction import mask_url_credentials

    # The reproduction: the documented form with REDIS_PASSWORD='p@ss:w/rd'. The URL
    # is refused by validation, but masking must not leak a part of it either.
    assert mask_url_credentials("redis://:p@ss:w/rd@redis:6379/0") == "redis://***@redis:6379/0"


def test_redis_password_key_is_used_verbatim_and_masked() -> None:
    from worker.config import secret_values

    text = MINIMAL + "rate_limit: {redis_url: redis://redis:6379/0, redis_password: '${RP}'}\n"
    c = parse_config(text, environ={"RP": "p@ss:w/rd"})
    assert c.rate_limit.redis_password == "p@ss:w/rd"
    assert masked(c)["rate_limit"]["redis_password"] == "***"
    assert "p@ss:w/rd" in secret_values(c)
    assert parse_config(MINIMAL, environ={}).rate_limit.redis_password is None


def test_liveness_default_follows_the_drain_time() -> None:
    c = parse_config(MINIMAL + "kafka: {drain_timeout_s: 100}\n", environ={})
    assert c.http.liveness_timeout_s == 135.0  # drain + 35; no error about an untouched key
    assert masked(c)["http"]["liveness_timeout_s"] == 135.0
    explicit = "kafka: {drain_timeout_s: 100}\nhttp: {liveness_timeout_s: 111}\n"
    assert parse_config(MINIMAL + explicit, environ={}).http.liveness_timeout_s == 111.0


def test_a_sentinel_url_is_accepted_and_its_password_masked() -> None:
    config = parse_config(
        "rate_limit: {redis_url: 'redis+sentinel://:s3cret@s1:26379,s2:26379/mymaster/2'}\n"
        "destinations: [{name: a, pixel_code: P, access_token: t}]\n"
    )
    assert config.rate_limit.redis_url.startswith("redis+sentinel://")
    assert "s3cret" not in str(masked(config)["rate_limit"])
    from worker.config import secret_values

    assert "s3cret" in secret_values(config)  # scrubbed from logs too
