"""Speculative decoding benchmark: ForgeLLM with speculation on and off against mlx_lm.server, with and
without its --draft-model, on an edit workload and on ordinary prompts.

One command, from the repository root with the venv active (about fifteen minutes on 2 CPU cores):

    python benchmarks/spec_bench.py

Four servers run at once on the built-in model (``--model``, default smollm2-135m-instruct): ForgeLLM as it
starts by default (prompt-lookup speculation), ForgeLLM with ``--speculation off``, mlx_lm.server, and
mlx_lm.server with ``--draft-model`` (``--draft``, default the same model's 4-bit conversion; mlx_lm.server
then serves one request at a time, so it is measured at C=1 only). At each concurrency C (``--concurrency
1,4,8``), C clients send ``max(2C, --requests)`` non-streamed chat requests back to back, at temperature 0:

- edit: "rename this function" with a 15-line Python module in the prompt, 160 max tokens: the answer
  mostly quotes the prompt, which prompt lookup drafts from;
- ordinary: short questions (a capital, a haiku, a recipe), 160 max tokens: little to quote.

Every request starts with its own number, so no server answers one from a cached prompt. For each workload
and C it prints each server's generated tokens per second, and ForgeLLM on over off, and on over
mlx_lm.server; then how many greedy answers differ between ForgeLLM on and off (they must not).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from serve_bench import Server, forgellm_run, mlx_lm_env, running

from forgellm.backends.mlx import ModelSources
from forgellm.backends.mlx.cpu_blas import selected_blas
from forgellm.backends.mlx.sources import GGUF_KEEP_QUANTIZED
from forgellm.testing import free_port

MODULE = """import json
import os


def load_config(path):
    with open(path) as handle:
        return json.load(handle)


def save_config(path, config):
    with open(path, "w") as handle:
        json.dump(config, handle, indent=2)


def config_exists(path):
    return os.path.exists(path)
"""
EDIT = (
    "Request {n}. Rename the function load_config to read_config in this Python module. Reply with the whole "
    "module and nothing else.\n\n```python\n" + MODULE + "```"
)
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in two sentences.",
    "List three prime numbers and say why they are prime.",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
    "What is 12 times 7? Show your working.",
    "Tell me a joke about cats.",
]
WORKLOADS = {
    "edit": lambda n: EDIT.format(n=n),
    "ordinary": lambda n: f"Request {n}. {QUESTIONS[n % len(QUESTIONS)]}",
}
MAX_TOKENS = 160


@dataclass
class Run:
    tokens: int
    wall: float
    texts: dict[int, str]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.wall


async def closed_loop(server: Server, workload: str, concurrency: int, requests: int, first: int) -> Run:
    numbers = list(range(first, first + requests))
    texts: dict[int, str] = {}
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while numbers:
            n = numbers.pop(0)
            body = {
                "messages": [{"role": "user", "content": WORKLOADS[workload](n)}],
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
            }
            response = await http.post(server.url + "/v1/chat/completions", json=body)
            response.raise_for_status()
            answer = response.json()
            texts[n] = answer["choices"][0]["message"]["content"]
            tokens += answer["usage"]["completion_tokens"]

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=1800) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return Run(tokens, time.perf_counter() - started, texts)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="A built-in name, GGUF file or MLX dir.")
    parser.add_argument("--draft", help="mlx_lm.server's --draft-model (default: the model's 4-bit conversion).")
    parser.add_argument("--concurrency", default="1,4,8", help="Comma-separated client counts.")
    parser.add_argument("--requests", type=int, default=3, help="Requests per concurrency, at least 2C.")
    parser.add_argument("--workloads", default="edit,ordinary", help="Comma-separated: edit, ordinary.")
    return parser.parse_args()


def resolve(name: str, weights: str | None = None) -> Path:
    sources = ModelSources(gguf_weights=weights) if weights else ModelSources()
    return Path(sources.resolve(name, lambda text: print(f"{name}: {text}", flush=True)))


def main() -> None:
    args = parse_args()
    target = resolve(args.model)
    draft = Path(args.draft) if args.draft else resolve(args.model, GGUF_KEEP_QUANTIZED)
    print(f"model: {target}; draft for mlx_lm.server: {draft}; BLAS: {selected_blas() or 'MLX bundled'}", flush=True)
    ports = [free_port() for _ in range(4)]
    mlx_lm = ["--model", str(target), "--host", "127.0.0.1", "--log-level", "WARNING"]
    python = __import__("sys").executable
    with (
        running("on", forgellm_run(ports[0], "--model", str(target)), ports[0], "/readyz", {}) as on,
        running(
            "off", forgellm_run(ports[1], "--model", str(target), "--speculation", "off"), ports[1], "/readyz", {}
        ) as off,  # fmt: skip
        running(
            "mlx_lm",
            [python, "-m", "mlx_lm", "server", *mlx_lm, "--port", str(ports[2])],
            ports[2],
            "/health",
            {},
            mlx_lm_env(argparse.Namespace(mlx_lm_blas="same")),
        ) as theirs,  # fmt: skip
        running(
            "mlx_lm+draft",
            [python, "-m", "mlx_lm", "server", *mlx_lm, "--port", str(ports[3]), "--draft-model", str(draft)],
            ports[3],
            "/health",
            {},
            mlx_lm_env(argparse.Namespace(mlx_lm_blas="same")),
        ) as drafted,  # fmt: skip
    ):
        servers = [on, off, theirs, drafted]
        for server in servers:  # warm up: mlx_lm.server loads its model on the first request
            asyncio.run(closed_loop(server, "ordinary", 1, 1, first=0))
        first = 1
        header = f"{'workload':>9} {'C':>2} " + " ".join(f"{s.name:>13}" for s in servers)
        print(f"\ntokens/s (generated, all clients together)\n{header}  on/off  on/mlx_lm  diffs on/off", flush=True)
        for workload in args.workloads.split(","):
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                requests = max(2 * concurrency if concurrency > 1 else 1, args.requests)
                runs = []
                for server in servers:
                    runs.append(asyncio.run(closed_loop(server, workload, concurrency, requests, first)))
                first += requests
                diffs = sum(runs[0].texts[n] != runs[1].texts[n] for n in runs[0].texts)
                rates = [run.tokens_per_second for run in runs]
                print(
                    f"{workload:>9} {concurrency:>2} "
                    + " ".join(f"{rate:>13.1f}" for rate in rates)
                    + f"  {rates[0] / rates[1]:>6.2f}  {rates[0] / rates[2]:>9.2f}  {diffs:>5}/{requests}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
