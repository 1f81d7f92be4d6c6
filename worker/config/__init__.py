"""The configuration file: its schema, `${VAR}` interpolation, validation and masking."""

from worker.config.schema import (
    CircuitConfig,
    Config,
    HttpConfig,
    KafkaConfig,
    KafkaSecurityConfig,
    LoggingConfig,
    RateLimitConfig,
    RetryConfig,
    TikTokConfig,
    librdkafka_error,
    liveness_timeout_s,
    load_config,
    masked,
    parse_config,
    secret_values,
)
from worker.mapping.spec import DestinationConfig, LiteralValue, SubscriptionConfig

__all__ = [
    "CircuitConfig",
    "Config",
    "DestinationConfig",
    "HttpConfig",
    "KafkaConfig",
    "KafkaSecurityConfig",
    "LiteralValue",
    "LoggingConfig",
    "RateLimitConfig",
    "RetryConfig",
    "SubscriptionConfig",
    "TikTokConfig",
    "librdkafka_error",
    "liveness_timeout_s",
    "load_config",
    "masked",
    "parse_config",
    "secret_values",
]
