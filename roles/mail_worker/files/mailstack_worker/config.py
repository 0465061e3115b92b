"""The worker's configuration: one JSON file the role writes (it holds passwords: mode 0640)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .sender import SmtpSettings


@dataclasses.dataclass
class AmqpSettings:
    urls: list                      # one per node: amqp://user:password@host:5672/%2Fmail
    queue: str = "mail.send"
    retry_exchange: str = "mail.retry"
    retry_routing_key: str = "send"
    dead_exchange: str = "mail.dead"
    dead_routing_key: str = "dead"
    prefetch: int = 10
    heartbeat: int = 30


@dataclasses.dataclass
class RedisSettings:
    url: str = ""                   # redis://user:password@host:6379/0, or Sentinel below
    sentinels: list = dataclasses.field(default_factory=list)   # [[host, port], ...]
    master: str = ""
    username: str = ""
    password: str = ""
    sentinel_password: str = ""
    timeout: float = 2.0


@dataclasses.dataclass
class RetrySettings:
    budget: int = 8                 # attempts in all, the first included
    base_seconds: int = 60          # wait before the second attempt; doubled each time after
    max_seconds: int = 3600

    def delay_ms(self, attempt: int) -> int:
        """How long a job waits in the retry queue after its `attempt`-th attempt failed."""
        return int(min(self.base_seconds * 2 ** (attempt - 1), self.max_seconds) * 1000)


@dataclasses.dataclass
class Config:
    amqp: AmqpSettings
    redis: RedisSettings
    smtp: SmtpSettings
    retry: RetrySettings
    message_id_domain: str
    templates_directory: str = "/etc/mailstack-worker/templates"
    template_ttl_seconds: int = 3600
    template_rescan_seconds: float = 5.0
    concurrency: int = 4
    idempotency_ttl_seconds: int = 7 * 86400
    suppression_ttl_seconds: int = 0
    redis_retry_seconds: float = 1.0
    metrics_address: str = "127.0.0.1"
    metrics_port: int = 0


def load(path: str | Path) -> Config:
    data = {k: v for k, v in json.loads(Path(path).read_text()).items() if not k.startswith("_")}
    return Config(amqp=AmqpSettings(**data.pop("amqp")), redis=RedisSettings(**data.pop("redis")),
                  smtp=SmtpSettings(**data.pop("smtp")), retry=RetrySettings(**data.pop("retry", {})), **data)


def redis_client(settings: RedisSettings):
    import redis
    from redis.sentinel import Sentinel

    common = {"socket_timeout": settings.timeout, "socket_connect_timeout": settings.timeout}
    if settings.sentinels:
        sentinel = Sentinel([tuple(s) for s in settings.sentinels],
                            sentinel_kwargs={"password": settings.sentinel_password or None, **common}, **common)
        return sentinel.master_for(settings.master, username=settings.username or None,
                                   password=settings.password or None)
    return redis.Redis.from_url(settings.url, **common)
