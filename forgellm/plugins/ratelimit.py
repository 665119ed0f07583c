"""The ``ratelimit`` plugin: generation requests and generated tokens per client, on the ``limits`` library.

What counts: generation requests (the guide's generate, /v1/completions, /v1/chat/completions, and the
dialect plugins' routes, Anthropic's count_tokens included: rendering a prompt is work too), checked in
``before_generate`` before the prompt is even tokenized, so a refused client costs
next to nothing, and a request refused afterwards (a prompt over the limit, say) has counted.
Status polls, model lists, loads and health probes do not count: the guide's clients poll
status every second while a model loads, and loading needs the ``models:load`` scope anyway.

Tokens are reserved at admission and settled at the end: a request reserves its max_tokens,
lowered to what the client's budget has left after the reservations of its other requests in
flight (on every replica: the reservations live in the same storage), and generates at most
that; at the end its real count is charged and the reservation freed. So a burst of concurrent
requests cannot spend one budget many times over.

The strategy is limits' sliding-window counter: one counter per window (O(1) storage and a
single round trip to Redis, whatever the token count, unlike the moving window, which stores
one entry per token), weighted with the previous window so a client cannot double its budget
across a window boundary as it could with a fixed window.

The client is the authenticated subject when an auth plugin identified one, else the client
address (an IPv6 client's /64), the real one behind a proxy listed in --trusted-proxies
(``forgellm.core.clients``). An identity's claims may override the limits:
``claims["rate_limit"]`` and ``claims["token_limit"]``; a claim that is not such a string is
ignored with a warning.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import click
from limits import RateLimitItem, parse_many
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import ConfigurationError, StorageError
from limits.storage import storage_from_string

from forgellm import (
    ApiError,
    Caller,
    GenerationJob,
    Identity,
    Option,
    Server,
    Settings,
    Usage,
    hookimpl,
    service_unavailable,
)

logger = logging.getLogger("forgellm.ratelimit")

PLUGIN = "ratelimit"
DEFAULT_STORAGE = "memory://"
REQUESTS = "requests"
TOKENS = "tokens"
# Redis answers in well under a millisecond; a storage that does not answer in this time is down.
STORAGE_TIMEOUT_SECONDS = 2.0


class LimitString(click.ParamType):
    """A limits rate string such as ``60/minute`` or ``10/second;300/hour``, checked when parsed."""

    name = "N/PERIOD"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        try:
            parse_limits(value)
        except ValueError:
            self.fail(f"{value!r} is not a rate such as 60/minute or 10/second;300/hour", param, ctx)
        return value


@functools.lru_cache(maxsize=1024)
def parse_limits(text: str) -> tuple[RateLimitItem, ...]:
    return tuple(parse_many(text))


@hookimpl
def register_options(register: Callable[[Option], None]) -> None:
    register(
        Option(
            "rate_limit",
            "Generation requests each client may make, e.g. 60/minute (several: 10/second;300/hour).",
            type=LimitString(),
        )
    )
    register(
        Option(
            "token_limit",
            "Tokens each client may have generated (and sent to embed), e.g. 20000/minute; counted from real usage.",
            type=LimitString(),
        )
    )
    register(
        Option(
            "rate_limit_storage",
            "Where the counts live: memory:// (this process; the default) or redis://HOST:PORT/DB "
            "(shared by replicas).",
            secret=True,  # a Redis URL may hold a password
        )
    )


def _async_storage_uri(uri: str) -> str:
    """limits' asyncio storages use the same URIs with an ``async+`` prefix."""
    return uri if uri.startswith("async+") else "async+" + uri


def _storage_options(uri: str) -> dict[str, Any]:
    scheme = urllib.parse.urlparse(uri).scheme
    if "redis" in scheme:
        # redis-py (a dependency already) rather than limits' default async client, coredis.
        return {
            "implementation": "redispy",
            "socket_timeout": STORAGE_TIMEOUT_SECONDS,
            "socket_connect_timeout": STORAGE_TIMEOUT_SECONDS,
        }
    return {}


def redacted(uri: str) -> str:
    """The storage URI without its password, fit for a log line."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urllib.parse.urlunsplit(parts._replace(netloc=user + netloc))


class Budgets:
    """Request and token budgets per client, in one limits storage."""

    def __init__(self, settings: Settings) -> None:
        configured = settings.rate_limit_storage or DEFAULT_STORAGE
        self.settings = settings
        self.storage_name = redacted(configured)
        uri = _async_storage_uri(configured)
        try:
            # An async+ URI always makes one of limits' asyncio storages.
            self.storage: Any = storage_from_string(uri, wrap_exceptions=True, **_storage_options(uri))
        except ConfigurationError as exc:
            reason = str(exc).replace(uri, self.storage_name)  # limits' message quotes the URI, password and all
            raise ValueError(f"--rate-limit-storage {self.storage_name}: {reason}") from None
        self.limiter = SlidingWindowCounterRateLimiter(self.storage)
        self.request_limits = parse_limits(settings.rate_limit) if settings.rate_limit else ()
        self.token_limits = parse_limits(settings.token_limit) if settings.token_limit else ()
        # A reservation outlives its request only if the process died holding it: then until this expires.
        timeout = settings.request_timeout or 0
        self.reservation_expiry = int(timeout) + 60 if timeout > 0 else 86400
        # id(job) -> (client key, tokens reserved, the token limits they count against)
        self._reservations: dict[int, tuple[str, int, tuple[RateLimitItem, ...]]] = {}

    def limits_for(
        self, identity: Identity | None, claim: str, default: tuple[RateLimitItem, ...]
    ) -> tuple[RateLimitItem, ...]:
        """The identity's own limit (a key's override, a JWT claim), else the server's; a malformed claim is
        ignored with a warning."""
        if identity is None:
            return default
        override = identity.claims.get(claim)
        if override is None or override == "":
            return default
        try:
            if not isinstance(override, str):
                raise ValueError(override)
            return parse_limits(override)
        except ValueError:
            logger.warning("ignoring %s=%r of %s: not a rate such as 60/minute", claim, override, identity.subject)
            return default

    async def admit(self, identity: Identity | None, client_key: str, job: GenerationJob) -> None:
        """Reserve the job's tokens and spend one request; refuse (429) when either budget is spent.

        Tokens are reserved up to job.max_tokens (lowered to what the budget has left) before anything is
        queued, and settled at the end, so concurrent requests cannot spend the same tokens twice."""
        key = client_key
        token_limits = self.limits_for(identity, "token_limit", self.token_limits)
        try:
            if token_limits and job.max_tokens > 0:  # a job of 0 tokens only counts a prompt's tokens
                job.max_tokens = await self._reserve(key, token_limits, job.max_tokens)
                self._reservations[id(job)] = (key, job.max_tokens, token_limits)
            elif token_limits and job.embeds:  # its input tokens are charged at its end: the budget must have room
                self._reservations[id(job)] = (key, await self._reserve(key, token_limits, 1), token_limits)
            for limit in self.limits_for(identity, "rate_limit", self.request_limits):
                if not await self.limiter.hit(limit, REQUESTS, key):
                    await self.settle(job, 0)
                    raise await self._refusal(
                        limit, REQUESTS, key, f"Too many requests: {_describe(limit, 'requests')}"
                    )
        except StorageError as exc:
            logger.error("rate-limit storage %s failed: %s", self.storage_name, exc)
            raise service_unavailable("Rate-limit storage is unavailable; retry shortly", retry_after=5) from None

    async def _reserve(self, key: str, limits: tuple[RateLimitItem, ...], wanted: int) -> int:
        """Reserve up to wanted tokens under every limit; return how many (at least one), or refuse with a 429."""
        reserved_key = f"{PLUGIN}/reserved/{key}"
        reserved = await self.storage.incr(reserved_key, self.reservation_expiry, amount=wanted)
        others = reserved - wanted  # held by this client's other generations in flight, on any replica
        # The limit with the least room decides.
        room, tightest = min(
            [((await self.limiter.get_window_stats(limit, TOKENS, key)).remaining - others, limit) for limit in limits],
            key=lambda pair: pair[0],
        )
        granted = min(wanted, room)
        if granted < 1:
            await self.storage.incr(reserved_key, self.reservation_expiry, amount=-wanted)
            limit = tightest
            raise await self._refusal(limit, TOKENS, key, f"Token budget spent: {_describe(limit, 'tokens')}")
        if granted < wanted:
            await self.storage.incr(reserved_key, self.reservation_expiry, amount=granted - wanted)
        return granted

    async def settle(self, job: GenerationJob, tokens: int) -> None:
        """Charge the tokens a job generated and free the rest of its reservation."""
        reservation = self._reservations.pop(id(job), None)
        if reservation is None:
            return
        key, reserved, limits = reservation
        try:
            await self.storage.incr(f"{PLUGIN}/reserved/{key}", self.reservation_expiry, amount=-reserved)
            if tokens > 0:
                for limit in limits:
                    await self._charge(limit, key, tokens)
        except StorageError as exc:  # the response is sent: all that is left to do is say so
            logger.error("rate-limit storage %s failed; %d tokens not counted: %s", self.storage_name, tokens, exc)

    async def _charge(self, limit: RateLimitItem, key: str, tokens: int) -> None:
        if await self.limiter.hit(limit, TOKENS, key, cost=tokens):
            return
        # Only at a window's edge can more be generated than the weighted window has left: use up the rest.
        remaining = (await self.limiter.get_window_stats(limit, TOKENS, key)).remaining
        if remaining > 0:
            await self.limiter.hit(limit, TOKENS, key, cost=min(tokens, remaining))

    async def _refusal(self, limit: RateLimitItem, kind: str, key: str, message: str) -> ApiError:
        stats = await self.limiter.get_window_stats(limit, kind, key)
        reset = max(1, math.ceil(stats.reset_time - time.time()))
        return ApiError(
            429,
            f"{message}; retry in {reset}s",
            code="rate_limit_exceeded",
            headers={
                "Retry-After": str(reset),
                # draft-ietf-httpapi-ratelimit-headers: the limit, what is left, seconds until more is allowed.
                "RateLimit-Limit": str(limit.amount),
                "RateLimit-Remaining": str(stats.remaining),
                "RateLimit-Reset": str(reset),
                "RateLimit-Policy": f"{limit.amount};w={limit.get_expiry()}",
            },
        )


def _describe(limit: RateLimitItem, unit: str) -> str:
    period = limit.GRANULARITY.name if limit.multiples == 1 else f"{limit.multiples} {limit.GRANULARITY.name}s"
    return f"the limit is {limit.amount} {unit} per {period}"


def budgets_of(server: Server) -> Budgets:
    budgets: Budgets = server.plugin_state[PLUGIN]
    return budgets


@hookimpl
async def startup(server: Server) -> None:
    budgets = Budgets(server.settings)
    if not await budgets.storage.check():
        raise RuntimeError(f"rate-limit storage {budgets.storage_name} is unreachable")
    if not (budgets.request_limits or budgets.token_limits):
        logger.warning("ratelimit plugin on without --rate-limit or --token-limit: only per-key limits apply")
    server.plugin_state[PLUGIN] = budgets


@hookimpl
async def before_generate(identity: Identity | None, job: GenerationJob, caller: Caller, server: Server) -> None:
    await budgets_of(server).admit(identity, caller.client_key, job)


@hookimpl
async def after_generate(job: GenerationJob, usage: Usage, server: Server) -> None:
    await budgets_of(server).settle(job, usage.prompt_tokens if job.embeds else usage.completion_tokens)


@hookimpl
def register_cors_headers(expose: Callable[[str], None]) -> None:
    for name in ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset", "RateLimit-Policy"):
        expose(name)
