"""The ``logging`` plugin: one access-log line per HTTP request, JSON by default.

A line says who asked (client address, authenticated subject), what (method, path, request
id), and what it cost (status, latency, prompt and completion tokens, time to first token). It never holds
credentials, headers, query strings or prompt text: the fields come from the request's
record, which carries none of them.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from collections.abc import Callable
from datetime import UTC, datetime

import click

from forgellm import Option, RequestRecord, Server, Settings, hookimpl

PLUGIN = "logging"


@hookimpl
def register_options(register: Callable[[Option], None]) -> None:
    register(
        Option(
            "log_format",
            "Access-log format: json (one object a line) or text.",
            type=click.Choice(["json", "text"], case_sensitive=False),
            default="json",
        )
    )
    register(
        Option(
            "access_log_file",
            "Append the access log to this file (reopened when logrotate moves it) instead of stderr.",
            type=click.Path(dir_okay=False, writable=True),
        )
    )


def json_line(entry: RequestRecord, timestamp: str) -> str:
    identity = entry.identity
    return json.dumps(
        {
            "ts": timestamp,
            "request_id": entry.request_id,
            "client": entry.client,
            "identity": getattr(identity, "subject", None),
            "auth": getattr(identity, "method", None),
            "method": entry.method,
            "path": entry.path,
            "model": entry.model,
            "status": entry.status,
            "latency_ms": round(entry.latency_ms, 2) if entry.latency_ms is not None else None,
            "prompt_tokens": entry.prompt_tokens,
            "completion_tokens": entry.completion_tokens,
            "accepted_draft_tokens": entry.accepted_draft_tokens,
            "ttft_ms": round(entry.time_to_first_token_ms, 2) if entry.time_to_first_token_ms is not None else None,
        }
    )


def text_line(entry: RequestRecord, timestamp: str) -> str:
    """Common-log-like: ``TS CLIENT SUBJECT "METHOD PATH" STATUS LATENCYms id=ID tokens=PROMPT/COMPLETION``, then
    ``model=NAME`` and ``drafted=N`` (generated tokens speculative decoding drafted and the model kept) where
    they apply."""
    latency = f"{entry.latency_ms:.1f}ms" if entry.latency_ms is not None else "-"
    tokens = f"{_or_dash(entry.prompt_tokens)}/{_or_dash(entry.completion_tokens)}"
    return (
        f"{timestamp} {_field(entry.client)} {_field(entry.subject)} {json.dumps(f'{entry.method} {entry.path}')} "
        f"{entry.status} {latency} id={entry.request_id} tokens={tokens}"
        + (f" model={_field(entry.model)}" if entry.model is not None else "")
        + (f" drafted={entry.accepted_draft_tokens}" if entry.accepted_draft_tokens else "")
    )


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


def _field(value: object) -> str:
    """A value as one space-free token; anything unusual is quoted and escaped, so no line can be forged."""
    if value is None or value == "":
        return "-"
    text = str(value)
    if text.isascii() and text.isprintable() and " " not in text and '"' not in text:
        return text
    return json.dumps(text)


FORMATS = {"json": json_line, "text": text_line}


class AccessLog:
    """Where this server's access log goes; a logger of its own, so two servers in one process never mix."""

    def __init__(self, settings: Settings) -> None:
        self.format = FORMATS[settings.log_format.lower()]
        path = settings.access_log_file
        self.handler = logging.handlers.WatchedFileHandler(path) if path else logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(logging.Formatter("%(message)s"))
        self.logger = logging.Logger("forgellm.access", logging.INFO)  # unregistered: never reaches the root logger
        self.logger.addHandler(self.handler)

    def write(self, entry: RequestRecord) -> None:
        timestamp = datetime.now(UTC).isoformat(timespec="milliseconds")
        self.logger.info(self.format(entry, timestamp))

    def close(self) -> None:
        self.handler.close()


@hookimpl
def startup(server: Server) -> None:
    server.plugin_state[PLUGIN] = AccessLog(server.settings)


@hookimpl
def shutdown(server: Server) -> None:
    # The state stays: a line written after this reopens the file rather than failing the request.
    server.plugin_state[PLUGIN].close()


@hookimpl
def access_log(entry: RequestRecord, server: Server) -> None:
    server.plugin_state[PLUGIN].write(entry)
