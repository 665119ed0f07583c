"""Serving benchmark: ForgeLLM against mlx_lm.server on the same model, under the same load.

One command, from the repository root with the venv active (about three minutes on 2 CPU cores):

    python benchmarks/serve_bench.py

It builds a random-weight Llama (``--model-size small``: hidden 256, 4 layers; ``medium``:
hidden 512, 8 layers; or bring one with ``--model PATH``), starts ``python -m forgellm run``
and ``python -m mlx_lm server`` on it, and drives both with the same closed-loop load: at
each concurrency C (``--concurrency 1,4,8,16``), C clients share ``--requests`` (32)
streamed ``/v1/completions`` requests, each sending its share back to back (temperature 0, fixed ``--max-tokens``;
the test-kit models never emit EOS, and the benchmark checks that every completion has
exactly max_tokens tokens). For each C it prints aggregate generated tokens/s, p50/p95
request latency, p50 time to first token, the CPU time each server process spent per token
(steadier than wall time on a shared machine), and ours/theirs; and the in-process ceiling,
mlx-lm's ``batch_generate`` doing the same work (the same prompts, batch size C), so the
server's own overhead is visible. The runs of one concurrency are interleaved (``--rounds``
repeats them), so a machine that gets busier affects all of them alike.

    python benchmarks/serve_bench.py --burst 64

instead sends 64 requests at the same instant to each server (a new connection each) and
counts how many were answered (200), refused as intended (503 with Retry-After), got another
status, or failed at the connection (reset, refused, timed out).

``--plugins auth,...`` passes through to ``forgellm run``, with ``--forgellm-arg`` for their
flags and ``--header`` for what our requests must carry, so a plugin's cost shows on the
same load::

    python benchmarks/serve_bench.py --plugins auth,metrics,logging \
        --forgellm-arg="--api-key sk-bench-0123456789abcdef" \
        --header "Authorization: Bearer sk-bench-0123456789abcdef"

Timings are wall-clock and noisy on a shared machine: run it on a quiet one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from forgellm.backends.mlx import ModelSources
from forgellm.backends.mlx.cpu_blas import selected_blas
from forgellm.testing import build_tiny_model, free_port

# Llama shapes for --model-size; "tiny" is the test suite's model (overhead-bound, not meaningful alone).
MODEL_SIZES = {
    "tiny": {},
    "small": {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "intermediate_size": 688,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    },
    "medium": {
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "intermediate_size": 1376,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    },
}

# Each prompt starts with its own number, and no number is sent twice to a server: mlx_lm.server keeps the
# KV caches of recent prompts (its LRU prompt cache) and would skip the prefill of a prompt it has seen.
PROMPT = "Request {n}: the quick brown fox jumps over the lazy dog, and a small model writes words."

SERVER_START_TIMEOUT = 120.0
REQUEST_TIMEOUT = 600.0


# -- the model ----------------------------------------------------------------------------------


def model_path(args) -> Path:
    if args.model:
        # A built-in name or GGUF file becomes the converted MLX directory, which both servers load.
        return Path(ModelSources().resolve(args.model, lambda text: print(f"{args.model}: {text}", flush=True)))
    path = Path(args.cache_dir) / f"bench-llama-{args.model_size}"
    if not (path / "model.safetensors").exists():
        print(f"building the {args.model_size} model in {path} ...", flush=True)
        build_tiny_model(path, config_overrides=MODEL_SIZES[args.model_size])
    return path


def describe_model(path: Path) -> str:
    config = json.loads((path / "config.json").read_text())
    return (
        f"{path} (hidden {config.get('hidden_size')}, {config.get('num_hidden_layers')} layers, "
        f"vocab {config.get('vocab_size')})"
    )


# -- the servers --------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    url: str
    pid: int
    headers: dict[str, str] = field(default_factory=dict)

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far, all its threads together (Linux /proc)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@contextlib.contextmanager
def running(
    name: str,
    command: list[str],
    port: int,
    ready_path: str,
    headers: dict[str, str],
    env: dict[str, str] | None = None,
) -> Iterator[Server]:
    """Start a server process, wait until ready_path answers 200, and stop it (by its pid) at the end."""
    log = tempfile.NamedTemporaryFile("w+", prefix=f"serve-bench-{name}-", suffix=".log", delete=False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = Server(name, f"http://127.0.0.1:{port}", process.pid, headers)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}; its log: {log.name}")
            try:
                if httpx.get(server.url + ready_path, headers=headers, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} was not ready after {SERVER_START_TIMEOUT:.0f}s; its log: {log.name}")
            time.sleep(0.2)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        os.unlink(log.name)


def forgellm_run(port: int, *options: str) -> list[str]:
    """``forgellm run`` on 127.0.0.1:port, quiet but for warnings, with these options."""
    return [sys.executable, "-m", "forgellm", "run", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning", *options]  # fmt: skip


def forgellm_command(args, path: Path, port: int) -> list[str]:
    options = ["--model", str(path), "--max-concurrency", str(args.decode_concurrency)]
    if args.plugins:
        options += ["--plugins", args.plugins]
    for extra in args.forgellm_arg:
        options += shlex.split(extra)
    return forgellm_run(port, *options)


def mlx_lm_command(args, path: Path, port: int) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "mlx_lm",
        "server",
        "--model",
        str(path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--decode-concurrency",
        str(args.decode_concurrency),
        "--log-level",
        "WARNING",
    ]
    for extra in args.mlx_lm_arg:
        command += shlex.split(extra)
    return command


def mlx_lm_env(args) -> dict[str, str]:
    """mlx_lm.server's environment: with --mlx-lm-blas same, the BLAS ForgeLLM's MLX uses, preloaded."""
    blas = selected_blas()
    if args.mlx_lm_blas == "same" and blas:
        return {"LD_PRELOAD": " ".join(filter(None, [blas, os.environ.get("LD_PRELOAD")]))}
    return {}


def parse_headers(pairs: list[str]) -> dict[str, str]:
    headers = {}
    for pair in pairs:
        name, sep, value = pair.partition(":")
        if not sep:
            raise SystemExit(f"--header takes NAME:VALUE, got {pair!r}")
        headers[name.strip()] = value.strip()
    return headers


# -- one request --------------------------------------------------------------------------------


@dataclass
class Result:
    prompt_number: int
    latency: float
    ttft: float | None
    completion_tokens: int
    text: str


class StreamFailed(Exception):
    """The server answered, but not with a complete stream: a status other than 200, or an in-band error."""


def failure_kind(exc: BaseException) -> str:
    if isinstance(exc, (httpx.ReadError, httpx.WriteError, httpx.ConnectError, httpx.RemoteProtocolError)):
        return "reset"
    if isinstance(exc, httpx.TimeoutException):
        return "timed_out"
    if isinstance(exc, StreamFailed):
        return "failed"
    return "error"


async def streamed_completion(client: httpx.AsyncClient, server: Server, n: int, max_tokens: int) -> Result:
    """One streamed /v1/completions request for prompt number n, timed from sending to [DONE]."""
    body = {
        "prompt": PROMPT.format(n=n),
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    ttft = None
    text = []
    completion_tokens = None
    async with client.stream("POST", server.url + "/v1/completions", json=body, headers=server.headers) as response:
        if response.status_code != 200:
            raise StreamFailed(f"{server.name} answered {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[len("data: ") :]
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            if "error" in chunk:
                raise StreamFailed(f"{server.name} failed mid-stream: {chunk['error']}")
            for choice in chunk.get("choices") or ():
                if choice.get("text"):
                    if ttft is None:
                        ttft = time.perf_counter() - started
                    text.append(choice["text"])
            if chunk.get("usage"):
                completion_tokens = chunk["usage"]["completion_tokens"]
    if completion_tokens is None:
        raise StreamFailed(f"{server.name} sent no usage chunk")
    return Result(n, time.perf_counter() - started, ttft, completion_tokens, "".join(text))


# -- closed-loop load ---------------------------------------------------------------------------


@dataclass
class LoadRun:
    """One or more closed-loop runs of one server at one concurrency, pooled."""

    server: str
    concurrency: int
    wall: float = 0.0
    cpu: float = 0.0  # server CPU seconds used during the runs
    results: list[Result] = field(default_factory=list)
    failures: Counter = field(default_factory=Counter)
    first_failure: str | None = None

    def add(self, other: LoadRun) -> None:
        self.wall += other.wall
        self.cpu += other.cpu
        self.results += other.results
        self.failures += other.failures
        self.first_failure = self.first_failure or other.first_failure

    @property
    def tokens(self) -> int:
        return sum(r.completion_tokens for r in self.results)

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / self.wall

    @property
    def cpu_ms_per_token(self) -> float:
        return self.cpu * 1000 / max(self.tokens, 1)

    def latency(self, q: float) -> float:
        return quantile([r.latency for r in self.results], q)

    def ttft(self, q: float) -> float:
        return quantile([r.ttft for r in self.results if r.ttft is not None], q)


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


async def closed_loop(
    server: Server, concurrency: int, requests_per_client: int, max_tokens: int, first_prompt: int
) -> LoadRun:
    """concurrency clients, each sending its requests back to back, with prompt numbers from first_prompt on."""
    run = LoadRun(server.name, concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT, limits=limits) as client:

        async def one_client(index: int) -> None:
            for k in range(requests_per_client):
                try:
                    n = first_prompt + index * requests_per_client + k
                    result = await streamed_completion(client, server, n, max_tokens)
                except Exception as exc:  # count it and go on, as a client would
                    run.failures[failure_kind(exc)] += 1
                    run.first_failure = run.first_failure or f"{type(exc).__name__}: {exc}"
                else:
                    run.results.append(result)

        cpu_before = server.cpu_seconds()
        started = time.perf_counter()
        await asyncio.gather(*(one_client(i) for i in range(concurrency)))
        run.wall = time.perf_counter() - started
        run.cpu = server.cpu_seconds() - cpu_before
    return run


def check_run(run: LoadRun, max_tokens: int, exact: bool) -> None:
    """Every request must have been answered; with a random model (exact), each with max_tokens tokens.

    A real model may end a completion at its end token: both servers decode greedily, so they end the same
    completions alike (the sweep counts texts that differ), and tok/s counts the tokens really generated."""
    if not run.results:
        raise SystemExit(f"every request to {run.server} failed; the first: {run.first_failure}")
    wrong = [
        r for r in run.results if r.completion_tokens > max_tokens or (exact and r.completion_tokens != max_tokens)
    ]
    if wrong:
        raise SystemExit(
            f"{run.server} at concurrency {run.concurrency}: {len(wrong)} completions did not have "
            f"{max_tokens} tokens (the model emitted EOS?); token counts would not be comparable"
        )


# -- the in-process ceiling ---------------------------------------------------------------------


@dataclass
class CeilingRun:
    tokens: int = 0
    wall: float = 0.0
    cpu: float = 0.0

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / self.wall

    @property
    def cpu_ms_per_token(self) -> float:
        return self.cpu * 1000 / self.tokens


class Ceiling:
    """mlx-lm's batch_generate in this process: the same prompts and max_tokens, batch size C."""

    def __init__(self, path: Path) -> None:
        from mlx_lm import load

        self.model, self.tokenizer = load(str(path))
        self.run(CeilingRun(), 2, 1, 4, 0)  # warm up

    def run(
        self, into: CeilingRun, concurrency: int, requests_per_client: int, max_tokens: int, first_prompt: int
    ) -> None:
        from mlx_lm.generate import batch_generate

        count = concurrency * requests_per_client
        prompts = [self.tokenizer.encode(PROMPT.format(n=n)) for n in range(first_prompt, first_prompt + count)]
        cpu_before = time.process_time()
        started = time.perf_counter()
        response = batch_generate(
            self.model,
            self.tokenizer,
            prompts,
            max_tokens=max_tokens,
            completion_batch_size=concurrency,
            prefill_batch_size=min(8, concurrency),
            return_token_ids=True,
        )
        into.wall += time.perf_counter() - started
        into.cpu += time.process_time() - cpu_before
        into.tokens += sum(len(ids) for ids in response.token_ids)


# -- burst --------------------------------------------------------------------------------------


async def burst(server: Server, clients: int, max_tokens: int, first_prompt: int) -> Counter:
    """clients requests at the same instant, each on its own new connection; count how each ended."""
    gate = asyncio.Event()
    outcomes: Counter = Counter()

    async def one(n: int) -> None:
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT) as client:
            await gate.wait()
            try:
                response = await client.post(
                    server.url + "/v1/completions",
                    headers=server.headers,
                    json={"prompt": PROMPT.format(n=first_prompt + n), "max_tokens": max_tokens, "temperature": 0},
                )
            except Exception as exc:
                outcomes[failure_kind(exc)] += 1
            else:
                if response.status_code == 200:
                    outcomes["answered"] += 1
                elif response.status_code == 503 and "retry-after" in response.headers:
                    outcomes["refused_503"] += 1
                else:
                    outcomes[f"status_{response.status_code}"] += 1

    tasks = [asyncio.create_task(one(n)) for n in range(clients)]
    await asyncio.sleep(0.5)  # every client is waiting at the gate
    gate.set()
    await asyncio.gather(*tasks)
    return outcomes


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--model",
        help="An MLX model directory, a GGUF file or a built-in name such as smollm2-135m-instruct "
        "(instead of building a random one).",
    )
    parser.add_argument(
        "--model-size",
        choices=sorted(MODEL_SIZES),
        default="small",
        help="The random Llama to build when --model is not given.",
    )
    parser.add_argument(
        "--cache-dir",
        default=os.path.join(tempfile.gettempdir(), "forgellm-bench"),
        help="Where built models are kept between runs.",
    )
    parser.add_argument("--concurrency", default="1,4,8,16", help="Comma-separated client counts.")
    parser.add_argument(
        "--requests",
        type=int,
        default=32,
        help="Requests per server at each concurrency C, shared by the C clients (rounded up to a "
        "multiple of C), so that every level measures about the same number of tokens.",
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="Repeat each concurrency this many times (interleaved) and pool the results.",
    )
    parser.add_argument(
        "--decode-concurrency",
        type=int,
        default=32,
        help="Both servers' decode batch size (--max-concurrency / --decode-concurrency).",
    )
    parser.add_argument("--plugins", default="", help="Passed to forgellm run --plugins.")
    parser.add_argument(
        "--forgellm-arg",
        action="append",
        default=[],
        help="Extra forgellm run arguments, e.g. --forgellm-arg='--api-key k' (repeatable).",
    )
    parser.add_argument(
        "--mlx-lm-arg",
        action="append",
        default=[],
        help="Extra mlx_lm server arguments, e.g. --mlx-lm-arg='--prompt-concurrency 2' (repeatable).",
    )
    parser.add_argument(
        "--mlx-lm-blas",
        choices=("same", "bundled"),
        default="same",
        help="same: mlx_lm.server's MLX multiplies on the BLAS ForgeLLM's does (the system OpenBLAS, "
        "preloaded), so the servers are compared on equal terms; bundled: on MLX's own.",
    )
    parser.add_argument(
        "--header", action="append", default=[], help="NAME:VALUE sent with every request to forgellm (repeatable)."
    )
    parser.add_argument("--no-ceiling", action="store_true", help="Skip the in-process batch_generate ceiling.")
    parser.add_argument(
        "--burst",
        type=int,
        metavar="N",
        help="Burst mode: N requests at once to each server, then report how each ended.",
    )
    return parser.parse_args(argv)


_SERVER_COLUMNS = "   tok/s   p50s   p95s ttft50ms cpu/tok err "
HEADER = (
    f"     |     ceiling     |{'forgellm':^44}|{'mlx_lm':^44}| ours/theirs | ours/\n"
    f"conc |   tok/s cpu/tok |{_SERVER_COLUMNS}|{_SERVER_COLUMNS}| tok/s  ttft | ceiling"
)


def print_sweep_row(concurrency: int, ceiling: CeilingRun | None, ours: LoadRun, theirs: LoadRun) -> None:
    def server(run: LoadRun) -> str:
        return (
            f"{run.tokens_per_sec:7.1f} {run.latency(0.5):6.2f} {run.latency(0.95):6.2f} "
            f"{run.ttft(0.5) * 1000:8.0f} {run.cpu_ms_per_token:7.2f} {sum(run.failures.values()):3d}"
        )

    top = f"{ceiling.tokens_per_sec:7.1f} {ceiling.cpu_ms_per_token:7.2f}" if ceiling else f"{'-':>7} {'-':>7}"
    ratio = f"{ours.tokens_per_sec / ceiling.tokens_per_sec:7.1%}" if ceiling else f"{'-':>7}"
    print(
        f"{concurrency:>4} | {top} | {server(ours)} | {server(theirs)} | "
        f"{ours.tokens_per_sec / theirs.tokens_per_sec:5.2f} {ours.ttft(0.5) / theirs.ttft(0.5):5.2f} | {ratio}",
        flush=True,
    )


def sweep(args, path: Path, ours: Server, theirs: Server) -> None:
    levels = [int(c) for c in args.concurrency.split(",")]
    ceiling = None if args.no_ceiling else Ceiling(path)
    for server in (ours, theirs):  # warm both up: first requests pay one-off costs
        asyncio.run(closed_loop(server, 2, 1, 4, first_prompt=0))
    next_prompt = 2
    print(
        f"\nclosed loop: about {args.requests} requests per concurrency, max_tokens {args.max_tokens}, "
        f"{args.rounds} round(s), streamed /v1/completions, temperature 0.\n"
        f"cpu/tok: CPU ms the server process (for the ceiling, this process) used per generated token; "
        f"err: requests that failed (reset, timed out, error status)"
    )
    print(HEADER)
    failures: Counter = Counter()
    mismatched = compared = 0
    for concurrency in levels:
        runs = {server.name: LoadRun(server.name, concurrency) for server in (ours, theirs)}
        top = CeilingRun() if ceiling else None
        per_client = math.ceil(args.requests / concurrency)
        for round_number in range(args.rounds):
            order = (ours, theirs) if (concurrency + round_number) % 2 else (theirs, ours)  # alternate who goes first
            first = next_prompt
            next_prompt += concurrency * per_client
            for server in order:
                run = asyncio.run(closed_loop(server, concurrency, per_client, args.max_tokens, first))
                check_run(run, args.max_tokens, exact=not args.model)
                runs[server.name].add(run)
                failures.update({f"{server.name} {kind}": count for kind, count in run.failures.items()})
            if ceiling:
                ceiling.run(top, concurrency, per_client, args.max_tokens, first)
        print_sweep_row(concurrency, top, runs[ours.name], runs[theirs.name])
        theirs_text = {r.prompt_number: r.text for r in runs[theirs.name].results}
        for result in runs[ours.name].results:
            if result.prompt_number in theirs_text:
                compared += 1
                mismatched += result.text != theirs_text[result.prompt_number]
    ended_early = sum(r.completion_tokens < args.max_tokens for r in runs[ours.name].results)
    print(
        f"\n{ended_early} completions ended before {args.max_tokens} tokens (at the model's end token) at the last "
        f"concurrency; {mismatched} of {compared} greedy completions differed in text between the servers"
    )
    if failures:
        print("failed requests: " + ", ".join(f"{k} {v}" for k, v in sorted(failures.items())))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    path = model_path(args)
    print(
        f"model: {describe_model(path)}; {os.cpu_count()} CPUs; BLAS: {selected_blas() or 'MLX bundled'} "
        f"(mlx_lm: {'same' if mlx_lm_env(args) else 'MLX bundled'})",
        flush=True,
    )
    ours_port, theirs_port = free_port(), free_port()
    headers = parse_headers(args.header)
    with (
        running("forgellm", forgellm_command(args, path, ours_port), ours_port, "/readyz", headers) as ours,
        running(
            "mlx_lm", mlx_lm_command(args, path, theirs_port), theirs_port, "/health", {}, mlx_lm_env(args)
        ) as theirs,
    ):
        if args.burst:
            for server in (ours, theirs):  # mlx_lm.server loads its model on the first request
                asyncio.run(closed_loop(server, 1, 1, 4, first_prompt=0))
            print(f"\nburst: {args.burst} requests at once, each on a new connection, max_tokens {args.max_tokens}")
            for server in (ours, theirs):
                outcomes = asyncio.run(burst(server, args.burst, args.max_tokens, first_prompt=1))
                print(f"{server.name:>9}: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())), flush=True)
        else:
            sweep(args, path, ours, theirs)


if __name__ == "__main__":
    main()
