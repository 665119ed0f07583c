"""Soak test: a `forgellm run` process under mixed, sustained load, with auth and rate limits on.

    python benchmarks/soak.py                   # 60 s against the test kit's tiny model
    python benchmarks/soak.py --duration 600 --clients 16 --model PATH

It starts its own server on 127.0.0.1 (it never targets another host) with the auth, ratelimit
and metrics plugins, and API keys from a keys file, one per identity: ``--identities`` steady ones
under the server's ``--rate-limit``, and one greedy key whose own limit (``--greedy-rate-limit``)
is low enough that it is refused with 429s. ``--clients`` clients, spread over the identities,
send requests back to back until ``--duration`` seconds or ``--max-requests`` requests: the
guide's generate and OpenAI's completions and chat completions, plain and streamed, and some
streams abandoned after their first chunk (``--abandon``), as impatient clients do.

It prints how every request ended (by route and outcome: ok, rate_limited, overloaded,
abandoned, or the unintended ones: another status, reset, timed_out, stream_error, incomplete),
latency percentiles, and the server's resident memory over time. It exits 1 when a request ended
in an unintended way, when resident memory grew more than ``--max-growth-mb`` after the warm-up,
when sequences were left in the engine after the load stopped, or when the server did not exit
0 on SIGTERM; ``--report PATH`` writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from forgellm.plugins.auth.keys_file import add_key
from forgellm.testing import ServerProcess, build_tiny_model

MAX_DURATION = 3600.0  # caps, so a typo cannot turn a soak into a siege
MAX_REQUESTS = 200_000
MAX_CLIENTS = 256
REQUEST_TIMEOUT = 60.0
MEMORY_SAMPLE_SECONDS = 0.5

INTENDED = ("ok", "rate_limited", "overloaded", "abandoned")
PROMPTS = [
    "Once upon a time",
    "The quick brown fox",
    "Servers load models",
    "Good software is tested",
    "In winter the wind was cold",
    "Language models predict",
    "A tokenizer splits text",
]


# -- the requests --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    name: str
    path: str
    streamed: bool

    def body(self, max_tokens: int) -> dict:
        prompt = f"{random.choice(PROMPTS)} {random.randint(0, 10**6)}"
        if self.path == "/api/model/generate":
            return {"prompt": prompt, "max_tokens": max_tokens, "streaming": self.streamed}
        if self.path == "/v1/chat/completions":
            body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
        else:
            body = {"prompt": prompt, "max_tokens": max_tokens}
        return {**body, "stream": True} if self.streamed else body


ROUTES = [
    Route(f"{name}{' stream' if streamed else ''}", path, streamed)
    for name, path in (
        ("guide", "/api/model/generate"),
        ("completions", "/v1/completions"),
        ("chat", "/v1/chat/completions"),
    )
    for streamed in (False, True)
]


@dataclass
class Outcome:
    kind: str
    latency: float | None = None
    ttft: float | None = None
    detail: str = ""


def refusal(response: httpx.Response) -> Outcome:
    """429 and 503 are intended when they say when to retry; anything else is not."""
    status = response.status_code
    if status in (429, 503) and response.headers.get("retry-after"):
        return Outcome("rate_limited" if status == 429 else "overloaded")
    return Outcome(f"status_{status}", detail=response.text[:200])


async def plain(http: httpx.AsyncClient, route: Route, max_tokens: int) -> Outcome:
    started = time.perf_counter()
    response = await http.post(route.path, json=route.body(max_tokens))
    if response.status_code != 200:
        return refusal(response)
    body = response.json()
    finished = body.get("finish_reason") if route.path == "/api/model/generate" else body["choices"][0]["finish_reason"]
    if not finished:
        return Outcome("incomplete", detail=response.text[:200])
    return Outcome("ok", time.perf_counter() - started)


def stream_item(route: Route, line: str):
    """One line of a stream as (payload, failed, finished); None for lines that carry nothing."""
    if route.path == "/api/model/generate":
        item = json.loads(line)
        return item, item["type"] == "error", item["type"] == "complete"
    if not line.startswith("data: "):
        return None
    data = line[len("data: ") :]
    if data == "[DONE]":
        return data, False, True
    item = json.loads(data)
    return item, "error" in item, False


async def streamed(http: httpx.AsyncClient, route: Route, max_tokens: int, abandon: bool) -> Outcome:
    started = time.perf_counter()
    ttft = None
    async with http.stream("POST", route.path, json=route.body(max_tokens)) as response:
        if response.status_code != 200:
            await response.aread()
            return refusal(response)
        async for line in response.aiter_lines():
            parsed = stream_item(route, line) if line else None
            if parsed is None:
                continue
            item, failed, finished = parsed
            if failed:
                return Outcome("stream_error", detail=json.dumps(item)[:200])
            if finished:
                return Outcome("ok", time.perf_counter() - started, ttft)
            if ttft is None:
                ttft = time.perf_counter() - started
                if abandon:  # hang up mid-stream: the connection closes as the block exits
                    return Outcome("abandoned")
    return Outcome("incomplete", detail="the stream ended without its last line")


def failure(exc: Exception) -> Outcome:
    if isinstance(exc, httpx.TimeoutException):
        return Outcome("timed_out", detail=repr(exc))
    if isinstance(exc, (httpx.ReadError, httpx.WriteError, httpx.ConnectError, httpx.RemoteProtocolError)):
        return Outcome("reset", detail=repr(exc))
    return Outcome(f"error_{type(exc).__name__}", detail=repr(exc))


# -- the load ------------------------------------------------------------------------------------


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)  # (route, kind) -> count
    by_identity: Counter = field(default_factory=Counter)  # (identity, kind) -> count
    latencies: dict = field(default_factory=lambda: defaultdict(list))  # plain / streamed -> seconds
    ttfts: list = field(default_factory=list)
    examples: dict = field(default_factory=dict)  # kind -> one detail, for the unintended kinds
    sent: int = 0

    def record(self, route: Route, identity: str, outcome: Outcome) -> None:
        self.outcomes[route.name, outcome.kind] += 1
        self.by_identity[identity, outcome.kind] += 1
        if outcome.latency is not None:
            self.latencies["streamed" if route.streamed else "plain"].append(outcome.latency)
        if outcome.ttft is not None:
            self.ttfts.append(outcome.ttft)
        if outcome.kind not in INTENDED:
            self.examples.setdefault(outcome.kind, f"{route.name}: {outcome.detail}")

    def kinds(self) -> Counter:
        totals: Counter = Counter()
        for (_, kind), count in self.outcomes.items():
            totals[kind] += count
        return totals

    def unintended(self) -> int:
        return sum(count for kind, count in self.kinds().items() if kind not in INTENDED)


async def client(url: str, identity: str, key: str, args, deadline: float, tally: Tally) -> None:
    async with httpx.AsyncClient(
        base_url=url, timeout=REQUEST_TIMEOUT, headers={"Authorization": f"Bearer {key}"}
    ) as http:
        while time.monotonic() < deadline and tally.sent < args.max_requests:
            tally.sent += 1
            route = random.choice(ROUTES)
            max_tokens = random.randint(1, args.max_tokens)
            try:
                if route.streamed:
                    outcome = await streamed(http, route, max_tokens, abandon=random.random() < args.abandon)
                else:
                    outcome = await plain(http, route, max_tokens)
            except Exception as exc:  # counted, and the client goes on as a real one would
                outcome = failure(exc)
            tally.record(route, identity, outcome)
            if outcome.kind in ("rate_limited", "overloaded"):
                await asyncio.sleep(args.backoff)  # a polite client waits a little; Retry-After is whole seconds


@dataclass
class MemorySample:
    seconds: float
    rss_mb: float
    requests: int


async def watch_memory(
    pid: int, started: float, tally: Tally, samples: list[MemorySample], stop: asyncio.Event
) -> None:
    process = psutil.Process(pid)
    while not stop.is_set():
        samples.append(MemorySample(time.monotonic() - started, process.memory_info().rss / 2**20, tally.sent))
        try:
            await asyncio.wait_for(stop.wait(), MEMORY_SAMPLE_SECONDS)
        except TimeoutError:
            pass


async def load(url: str, pid: int, identities: dict[str, str], args) -> tuple[Tally, list[MemorySample]]:
    tally = Tally()
    samples: list[MemorySample] = []
    stop = asyncio.Event()
    started = time.monotonic()
    watcher = asyncio.create_task(watch_memory(pid, started, tally, samples, stop))
    names = list(identities)
    clients = [
        client(url, names[i % len(names)], identities[names[i % len(names)]], args, started + args.duration, tally)
        for i in range(args.clients)
    ]
    await asyncio.gather(*clients)
    stop.set()
    await watcher
    return tally, samples


# -- the verdicts --------------------------------------------------------------------------------


def memory_growth(samples: list[MemorySample], warmup: float) -> float | None:
    """MB resident memory grew after the warm-up: the median of its last quarter minus that of its first."""
    settled = [s.rss_mb for s in samples if s.seconds >= warmup]
    if len(settled) < 8:
        return None
    quarter = len(settled) // 4
    return statistics.median(settled[-quarter:]) - statistics.median(settled[:quarter])


def scheduler_gauges(url: str, admin_key: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {admin_key}"}, timeout=10).text
    wanted = {"forgellm_queue_depth", "forgellm_active_sequences"}
    return {f.name: f.samples[0].value for f in text_string_to_metric_families(text) if f.name in wanted}


def settled_gauges(url: str, admin_key: str, timeout: float = 15.0) -> dict[str, float]:
    """The queue and batch gauges once they read zero, or as they stand after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        gauges = scheduler_gauges(url, admin_key)
        if not any(gauges.values()) or time.monotonic() > deadline:
            return gauges
        time.sleep(0.2)


def quantile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def print_report(tally: Tally, samples: list[MemorySample], growth: float | None, args, wall: float) -> None:
    kinds = tally.kinds()
    total = sum(kinds.values())
    print(f"\n{total} requests in {wall:.1f}s ({total / wall:.1f}/s), {args.clients} clients")
    print("\noutcomes by route:")
    columns = sorted(kinds, key=lambda kind: (kind not in INTENDED, kind))
    print(f"  {'route':<18}" + "".join(f"{kind:>14}" for kind in columns))
    for route in ROUTES:
        print(f"  {route.name:<18}" + "".join(f"{tally.outcomes[route.name, kind]:>14}" for kind in columns))
    print(f"  {'all':<18}" + "".join(f"{kinds[kind]:>14}" for kind in columns))
    print("\noutcomes by identity:")
    for identity in sorted({identity for identity, _ in tally.by_identity}):
        counts = {kind: count for (name, kind), count in tally.by_identity.items() if name == identity}
        print(f"  {identity:<18}" + ", ".join(f"{kind} {count}" for kind, count in sorted(counts.items())))
    print("\nlatency of completed requests (s):")
    for kind, values in sorted(tally.latencies.items()):
        print(
            f"  {kind:<9} n={len(values):<6} p50 {quantile(values, 0.5):6.3f}  p95 {quantile(values, 0.95):6.3f}"
            f"  p99 {quantile(values, 0.99):6.3f}  max {max(values):6.3f}"
        )
    if tally.ttfts:
        print(
            f"  {'ttft':<9} n={len(tally.ttfts):<6} p50 {quantile(tally.ttfts, 0.5):6.3f}"
            f"  p95 {quantile(tally.ttfts, 0.95):6.3f}  p99 {quantile(tally.ttfts, 0.99):6.3f}"
        )
    print("\nserver resident memory:")
    step = max(1, len(samples) // 12)
    for sample in samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else []):
        print(f"  t={sample.seconds:6.1f}s  rss {sample.rss_mb:8.1f} MB  requests sent {sample.requests}")
    print(
        f"  growth after the {args.warmup:.0f}s warm-up: "
        + ("too few samples" if growth is None else f"{growth:+.1f} MB (limit {args.max_growth_mb:g} MB)")
    )
    for kind, example in sorted(tally.examples.items()):
        print(f"\nfirst {kind}: {example}")


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", help="An MLX model directory (default: the test kit's tiny model, built here).")
    parser.add_argument("--duration", type=float, default=60.0, help=f"Seconds of load (at most {MAX_DURATION:g}).")
    parser.add_argument("--max-requests", type=int, default=20_000, help=f"At most this many (cap {MAX_REQUESTS}).")
    parser.add_argument("--clients", type=int, default=12, help=f"Concurrent clients (at most {MAX_CLIENTS}).")
    parser.add_argument("--identities", type=int, default=3, help="Steady API keys (one greedy key is added).")
    parser.add_argument("--rate-limit", default="40/second", help="The server's --rate-limit, for steady keys.")
    parser.add_argument("--greedy-rate-limit", default="2/second", help="The greedy key's own limit.")
    parser.add_argument("--max-tokens", type=int, default=24, help="Each request asks for 1 to this many tokens.")
    parser.add_argument("--abandon", type=float, default=0.1, help="Share of streams abandoned after one chunk.")
    parser.add_argument("--backoff", type=float, default=0.05, help="Seconds a client waits after a 429 or 503.")
    parser.add_argument("--max-concurrency", type=int, default=8, help="The server's decode batch size.")
    parser.add_argument("--max-queue", type=int, default=32, help="The server's queue; beyond it, 503.")
    parser.add_argument("--warmup", type=float, help="Seconds before memory must level off (default: a third).")
    parser.add_argument(
        "--max-growth-mb", type=float, default=64.0, help="Most resident memory may grow after the warm-up, in MB."
    )
    parser.add_argument("--report", help="Write the figures as JSON to this file.")
    args = parser.parse_args(argv)
    if not 0 < args.duration <= MAX_DURATION:
        parser.error(f"--duration must be in (0, {MAX_DURATION:g}]")
    if not 0 < args.max_requests <= MAX_REQUESTS:
        parser.error(f"--max-requests must be in (0, {MAX_REQUESTS}]")
    if not 0 < args.clients <= MAX_CLIENTS:
        parser.error(f"--clients must be in (0, {MAX_CLIENTS}]")
    if args.identities < 1:
        parser.error("--identities must be at least 1")
    if args.warmup is None:
        args.warmup = args.duration / 3
    return args


def make_identities(keys_file: Path, args) -> dict[str, str]:
    """Keys in a keys file, as `forgellm keys add` makes them: name -> key."""
    identities = {
        f"steady-{n}": add_key(keys_file, f"steady-{n}", ("generate",)) for n in range(1, args.identities + 1)
    }
    identities["greedy"] = add_key(keys_file, "greedy", ("generate",), rate_limit=args.greedy_rate_limit)
    return identities


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="forgellm-soak-") as scratch:
        model = Path(args.model) if args.model else build_tiny_model(Path(scratch) / "tiny")
        identities = make_identities(Path(scratch) / "keys.json", args)
        admin_key = f"soak-admin-{random.getrandbits(64):x}"  # for /metrics only
        server_args = [
            "--model",
            str(model),
            "--plugins",
            "auth,ratelimit,metrics",
            "--api-keys-file",
            str(Path(scratch) / "keys.json"),
            "--api-key",
            admin_key,
            "--rate-limit",
            args.rate_limit,
            "--max-concurrency",
            str(args.max_concurrency),
            "--max-queue",
            str(args.max_queue),
            "--max-tokens-cap",
            str(args.max_tokens),
            "--log-level",
            "warning",
        ]
        with ServerProcess(server_args) as server:
            print(
                f"soak: {args.duration:g}s, {args.clients} clients, identities {', '.join(identities)} "
                f"(rate limit {args.rate_limit}; greedy {args.greedy_rate_limit}), server pid {server.process.pid}",
                flush=True,
            )
            started = time.monotonic()
            tally, samples = asyncio.run(load(server.url, server.process.pid, identities, args))
            wall = time.monotonic() - started
            gauges = settled_gauges(server.url, admin_key)
            server_exit, output = server.stop()

    growth = memory_growth(samples, args.warmup)
    print_report(tally, samples, growth, args, wall)
    leaked = any(gauges.values())
    print(
        f"\nafter the load: {', '.join(f'{name} {value:g}' for name, value in gauges.items())}; "
        f"server exit code {server_exit}"
    )
    problems = []
    if tally.unintended():
        problems.append(f"{tally.unintended()} requests ended in an unintended way")
    if not tally.kinds()["ok"]:
        problems.append("no request completed")
    if growth is None or growth > args.max_growth_mb:
        problems.append("resident memory did not level off" if growth is not None else "too few memory samples")
    if leaked:
        problems.append("sequences were left in the engine after the load stopped")
    if server_exit != 0:
        problems.append(f"the server exited {server_exit} on SIGTERM:\n{output[-2000:]}")
    if args.report:
        Path(args.report).write_text(
            json.dumps(
                {
                    "requests": sum(tally.kinds().values()),
                    "seconds": wall,
                    "outcomes": dict(tally.kinds()),
                    "unintended": tally.unintended(),
                    "latency_p50": {kind: quantile(values, 0.5) for kind, values in tally.latencies.items()},
                    "latency_p95": {kind: quantile(values, 0.95) for kind, values in tally.latencies.items()},
                    "memory_mb": [[round(s.seconds, 2), round(s.rss_mb, 1)] for s in samples],
                    "memory_growth_mb": growth,
                    "gauges_after": gauges,
                    "server_exit": server_exit,
                    "problems": problems,
                },
                indent=2,
            )
        )
    print(
        "\n"
        + (
            "FAIL: " + "; ".join(problems)
            if problems
            else "PASS: every refusal was an intended 429/503, memory levelled off, nothing was left in the engine"
        )
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
