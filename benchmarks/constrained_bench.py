"""What constrained decoding costs: the same closed-loop load with half the requests under a JSON schema.

From the repository root with the venv active (about four minutes on 2 CPU cores):

    python benchmarks/constrained_bench.py

It serves the built-in SmolLM2-135M-Instruct (``--model`` for another; its 49,152-token vocabulary is
what a mask costs) with ``forgellm run`` and drives it with ``--concurrency`` (8) clients, each
sending chat completions back to back (temperature 0, ``--max-tokens`` 64), in two loads:

- free: no request is constrained;
- half: clients 0, 2, 4, ... send ``response_format: json_schema`` (a weather-report schema), the
  others the free load's requests.

The loads alternate for ``--rounds`` (3) rounds, so a machine that gets busier affects both alike.
It prints the aggregate completion tokens/s of each round, the medians, and half/free; then the
time one mask takes (llguidance's token mask applied to the logits, one call of the sequence's
logits processor), measured in-process over the tokens of a schema-valid answer.

    python benchmarks/constrained_bench.py --compare-rev 62b582c

also runs the free load on a server from that revision (a git worktree), interleaved with this
one's, to show what the constrained-decoding machinery costs requests that do not use it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from serve_bench import REQUEST_TIMEOUT, forgellm_run, running

from forgellm.backends.mlx import ModelSources
from forgellm.backends.mlx.sources.builtin_models import DEFAULT_MODEL
from forgellm.testing import free_port

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "day": {"type": "string"},
                    "high": {"type": "integer"},
                    "low": {"type": "integer"},
                    "summary": {"type": "string"},
                },
                "required": ["day", "high", "low", "summary"],
            },
        },
    },
    "required": ["city", "days"],
}
CITIES = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Quito", "Dakar"]


def request_body(number: int, constrained: bool, max_tokens: int) -> dict:
    city = CITIES[number % len(CITIES)]
    body: dict = {
        "messages": [{"role": "user", "content": f"Request {number}: give the weather in {city} for the week."}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER_SCHEMA}}
    return body


async def closed_loop(url: str, clients: int, per_client: int, half: bool, max_tokens: int, first: int) -> float:
    """Aggregate completion tokens/s of `clients` clients sending `per_client` requests each, back to back."""
    tokens = 0

    async def client_loop(client: httpx.AsyncClient, index: int) -> None:
        nonlocal tokens
        for request in range(per_client):
            number = first + index * per_client + request
            body = request_body(number, half and index % 2 == 0, max_tokens)
            response = await client.post(f"{url}/v1/chat/completions", json=body)
            response.raise_for_status()
            answer = response.json()
            if "response_format" in body and answer["choices"][0]["finish_reason"] == "stop":
                json.loads(answer["choices"][0]["message"]["content"])  # a finished constrained answer parses
            tokens += answer["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client, index) for index in range(clients)))
        return tokens / (time.perf_counter() - started)


def mask_times(model_dir: str, samples: int = 200) -> list[float]:
    """Milliseconds per call of a constrained sequence's logits processor, over a valid answer's tokens."""
    import mlx.core as mx
    from mlx_lm import load

    from forgellm import Constraint
    from forgellm.backends.mlx.constrained import ConstraintCompiler

    model, tokenizer = load(model_dir)
    vocab = model.args.vocab_size
    compiler = ConstraintCompiler(tokenizer._tokenizer, vocab, tokenizer.eos_token_ids)
    answer = {
        "city": "Paris",
        "days": [{"day": f"Day {n}", "high": 20 + n, "low": 10 + n, "summary": "Sunny and mild"} for n in range(7)],
    }
    text = json.dumps(answer, separators=(",", ":"))
    tokens = tokenizer.encode(text, add_special_tokens=False)[:samples]
    processor = compiler.processor(Constraint(WEATHER_SCHEMA))
    logits = mx.random.normal((1, vocab))
    times = []
    for position in range(len(tokens) + 1):
        history = mx.array(tokens[:position] or [0])
        started = time.perf_counter()
        mx.eval(processor(history, logits))
        times.append((time.perf_counter() - started) * 1000)
    return times


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="A built-in name, GGUF file or MLX directory.")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare-rev", help="Also run the free load on a server from this git revision.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model_dir = ModelSources().resolve(args.model, lambda text: print(f"{args.model}: {text}", flush=True))
    loads = [("free", False), ("half", True)]
    servers = [("this", Path.cwd())]
    worktree = None
    if args.compare_rev:
        worktree = tempfile.mkdtemp(prefix="constrained-bench-")
        subprocess.run(["git", "worktree", "add", "--detach", worktree, args.compare_rev], check=True)
        servers.append((args.compare_rev, Path(worktree)))
    results: dict[str, list[float]] = {}
    first = 0
    try:
        for round_number in range(args.rounds):
            for server_name, source in servers:
                port = free_port()
                command = forgellm_run(port, "--model", model_dir, "--max-concurrency", str(args.concurrency))
                env = {"PYTHONPATH": str(source)}
                with running(server_name, command, port, "/readyz", {}, env=env) as server:
                    for load_name, half in loads if server_name == "this" else loads[:1]:
                        key = f"{server_name}:{load_name}"
                        rate = asyncio.run(
                            closed_loop(
                                server.url, args.concurrency, args.requests_per_client, half, args.max_tokens, first
                            )
                        )
                        first += args.concurrency * args.requests_per_client
                        results.setdefault(key, []).append(rate)
                        print(f"round {round_number + 1} {key:>16}: {rate:7.1f} tok/s", flush=True)
    finally:
        if worktree is not None:
            subprocess.run(["git", "worktree", "remove", "--force", worktree], check=False)
    medians = {key: statistics.median(rates) for key, rates in results.items()}
    print()
    for key, median in medians.items():
        print(f"median {key:>16}: {median:7.1f} tok/s")
    print(f"half constrained / free: {medians['this:half'] / medians['this:free']:.3f}")
    if args.compare_rev:
        print(f"free, this / {args.compare_rev}: {medians['this:free'] / medians[f'{args.compare_rev}:free']:.3f}")
    times = mask_times(model_dir)
    quantiles = statistics.quantiles(times, n=20)
    print(
        f"mask per step ({len(times)} steps): median {statistics.median(times):.3f} ms, "
        f"p95 {quantiles[18]:.3f} ms, max {max(times):.3f} ms"
    )


if __name__ == "__main__":
    main()
