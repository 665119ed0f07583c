"""Two models at once: what each gets when both are busy, what a cold model costs, against mlx_lm.server.

From the repository root with the venv active (about five minutes on 2 CPU cores):

    python benchmarks/many_models_bench.py

Two resident copies of the built-in SmolLM2-135M-Instruct (``--model a=DIR --model b=DIR``), each
with its own batch, driven by ``--clients`` (4) closed-loop clients per model sending chat
completions back to back (temperature 0, ``--max-tokens`` 48):

- *a alone*, *b alone*: the clients of one model only;
- *both*: the clients of both at once. The aggregate completion tokens/s of both against each alone
  says how the models share the machine.

Then a request that names a model not yet resident (allowed by ``--allow-model``): the time until its
answer, loading included, against the same request once the model is resident.

Last, the same sequence of requests alternating between two models, one at a time, on ForgeLLM
(both resident) and on mlx_lm.server (which keeps one model and loads the other on each switch; its
MLX preloaded with the same BLAS as ForgeLLM's): the median latency of a request on each.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from serve_bench import REQUEST_TIMEOUT, forgellm_run, running

from forgellm.backends.mlx import ModelSources
from forgellm.backends.mlx.cpu_blas import selected_blas
from forgellm.backends.mlx.sources.builtin_models import DEFAULT_MODEL
from forgellm.testing import free_port

PROMPT = "Request {n}: describe a city you like in three sentences."


def chat_body(model: str, n: int, max_tokens: int) -> dict:
    content = PROMPT.format(n=n)
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


async def closed_loop(url: str, models: list[str], clients: int, requests: int, max_tokens: int, first: int) -> float:
    """Aggregate completion tokens/s of `clients` clients per model, each sending `requests` back to back."""
    tokens = 0

    async def client_loop(client: httpx.AsyncClient, model: str, index: int) -> None:
        nonlocal tokens
        for request in range(requests):
            body = chat_body(model, first + index * requests + request, max_tokens)
            response = await client.post(f"{url}/v1/chat/completions", json=body)
            response.raise_for_status()
            tokens += response.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT) as client:
        started = time.perf_counter()
        loops = [client_loop(client, model, m * clients + i) for m, model in enumerate(models) for i in range(clients)]
        await asyncio.gather(*loops)
        return tokens / (time.perf_counter() - started)


def timed_request(url: str, model: str, n: int, max_tokens: int) -> float:
    started = time.perf_counter()
    response = httpx.post(f"{url}/v1/chat/completions", json=chat_body(model, n, max_tokens), timeout=REQUEST_TIMEOUT)
    response.raise_for_status()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4, help="Closed-loop clients per model.")
    parser.add_argument("--requests", type=int, default=3, help="Requests per client.")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--switches", type=int, default=6, help="Alternating requests in the last part.")
    args = parser.parse_args()

    source = Path(ModelSources().resolve(DEFAULT_MODEL, lambda text: print(f"{DEFAULT_MODEL}: {text}")))
    with tempfile.TemporaryDirectory() as scratch:
        # Two paths to one model: mlx_lm.server tells models apart by path, and the on-demand load needs one
        # the server has not loaded.
        copies = []
        for name in ("first", "second", "cold"):
            copy = Path(scratch) / name
            os.symlink(source, copy)
            copies.append(copy)
        port = free_port()
        serve = forgellm_run(
            port,
            "--model",
            f"a={copies[0]}",
            "--model",
            f"b={copies[1]}",
            "--allow-model",
            f"{scratch}/*",
            "--max-concurrency",
            str(args.clients),
        )
        with running("forgellm", serve, port, "/readyz", {}) as server:
            while len(httpx.get(f"{server.url}/v1/models").json()["data"]) < 2:
                time.sleep(0.2)
            for model in ("a", "b"):  # warm both up: the first requests pay one-time costs
                timed_request(server.url, model, 999, 8)
            rates = {}
            for label, models in (("a alone", ["a"]), ("b alone", ["b"]), ("both", ["a", "b"])):
                rate = asyncio.run(
                    closed_loop(
                        server.url, models, args.clients, args.requests, args.max_tokens, first=len(rates) * 1000
                    )
                )
                rates[label] = rate
                print(f"{label:>8}: {rate:6.1f} tok/s", flush=True)
            alone = statistics.mean([rates["a alone"], rates["b alone"]])
            print(f"both / one alone: {rates['both'] / alone:.2f}")
            cold = timed_request(server.url, str(copies[2]), 5000, args.max_tokens)
            warm = statistics.median(
                timed_request(server.url, str(copies[2]), 5001 + n, args.max_tokens) for n in range(3)
            )
            print(f"a request whose model loads first: {cold:.2f} s; once resident: {warm:.2f} s")
            ours = [timed_request(server.url, "ab"[n % 2], 6000 + n, args.max_tokens) for n in range(args.switches)]
        theirs_port = free_port()
        theirs_command = [
            sys.executable,
            "-m",
            "mlx_lm",
            "server",
            "--model",
            str(copies[0]),
            "--host",
            "127.0.0.1",
            "--port",
            str(theirs_port),
            "--log-level",
            "WARNING",
        ]
        same_blas = {"LD_PRELOAD": blas} if (blas := selected_blas()) else {}  # the BLAS ForgeLLM's MLX uses
        with running("mlx_lm", theirs_command, theirs_port, "/v1/models", {}, env=same_blas) as theirs_server:
            theirs = [
                timed_request(theirs_server.url, str(copies[n % 2]), 6000 + n, args.max_tokens)
                for n in range(args.switches)
            ]
    ours_median, theirs_median = statistics.median(ours), statistics.median(theirs)
    print(
        f"alternating two models, median request: ForgeLLM {ours_median:.2f} s, "
        f"mlx_lm.server {theirs_median:.2f} s (ratio {theirs_median / ours_median:.1f}x)"
    )


if __name__ == "__main__":
    main()
