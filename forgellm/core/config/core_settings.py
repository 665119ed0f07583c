"""The core's settings, typed: one frozen object built once from the effective settings, so the core reads
``config.max_queue`` as an int, not an untyped attribute. Every default lives in its ``Option``
(``settings.py``); this only gives each a type. Plugins read their own options from ``Settings``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from forgellm.core.config.settings import Settings


@dataclass(frozen=True)
class CoreSettings:
    host: str
    port: int
    ssl_certfile: str | None
    ssl_keyfile: str | None
    trusted_proxies: str | None
    root_path: str
    allow_model: tuple[str, ...]
    allowed_hosts: tuple[str, ...]
    cors_origin: tuple[str, ...]
    model: tuple[str, ...]
    memory_budget: str | None
    max_models: int
    keep_alive: float
    pin_models: bool
    model_load_wait: float
    no_model: bool
    adapter: str | None
    model_sampling: tuple[str, ...]
    load_timeout: float
    backend: str
    plugins: str
    log_level: str
    max_tokens_cap: int
    default_max_tokens: int
    max_concurrency: int
    max_rows_per_client: int
    max_request_tokens: int
    max_queue: int
    max_inflight_per_client: int
    ipv6_client_prefix: int
    max_prompt_tokens: int
    max_embedding_tokens: int
    template_timeout: float
    request_timeout: float
    max_body_size: int
    max_header_size: int
    header_timeout: float
    body_timeout: float
    max_connections: int
    drain_timeout: float

    @classmethod
    def of(cls, settings: Settings) -> CoreSettings:
        values: dict[str, Any] = {field.name: settings[field.name] for field in dataclasses.fields(cls)}
        for field in dataclasses.fields(cls):
            if field.type == "tuple[str, ...]":
                values[field.name] = tuple(values[field.name] or ())
        return cls(**values)
