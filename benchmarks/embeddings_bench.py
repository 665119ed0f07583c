"""Embeddings per second: ForgeLLM's /v1/embeddings over HTTP at concurrency 1 and 8 (each request a batch of
16 sentences), against sentence-transformers' encode() in-process on the same CPU, same model, same run.

    python benchmarks/embeddings_bench.py [--forgellm PATH] [--requests 48]

It runs `forgellm run --model all-minilm-l6-v2` (PATH: the forgellm command, by default the one on PATH),
and sentence-transformers from the Python running this script (which needs it, and torch, installed; the
server's environment does not). Requests use the standard library only. Issue 26's target: at least 0.8
times sentence-transformers at concurrency 8.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

MODEL = "all-minilm-l6-v2"
BATCH = 16
SUBJECTS = ["The cat", "A small dog", "The committee", "My neighbour", "The old train", "A quiet village", "The market"]
VERBS = ["walked slowly past", "argued about", "wrote a long letter to", "painted", "quietly watched", "forgot about"]
OBJECTS = ["the river at dawn", "the new budget proposal", "a forgotten garden", "the stock prices", "the harbour"]


def sentences(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}, number {rng.randint(1, 999)}."
            for _ in range(count)]  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def serve(forgellm: str, port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([forgellm, "run", "--model", MODEL, "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/model/status", timeout=2) as response:
                if json.loads(response.read()).get("loaded"):
                    return process
        except OSError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not load the model within 120 s")


def http_rate(url: str, batches: list[list[str]], concurrency: int) -> float:
    post(url, {"model": MODEL, "input": batches[0]})  # warm-up
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(lambda batch: post(url, {"model": MODEL, "input": batch}), batches))
    elapsed = time.perf_counter() - started
    assert all(len(answer["data"]) == BATCH for answer in answers)
    return len(batches) * BATCH / elapsed


def sentence_transformers_rate(model_dir: str, batches: list[list[str]]) -> float:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir, device="cpu")
    model.encode(batches[0], batch_size=BATCH)
    started = time.perf_counter()
    for batch in batches:
        model.encode(batch, batch_size=BATCH)
    return len(batches) * BATCH / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forgellm", default=shutil.which("forgellm") or "forgellm")
    parser.add_argument("--requests", type=int, default=48, help="requests (batches of 16) per measurement")
    args = parser.parse_args()
    model_dir = subprocess.run([args.forgellm, "pull", MODEL], capture_output=True, text=True, check=True).stdout
    batches = [sentences(BATCH, seed) for seed in range(args.requests)]
    port = free_port()
    server = serve(args.forgellm, port)
    try:
        url = f"http://127.0.0.1:{port}/v1/embeddings"
        rates = {concurrency: http_rate(url, batches, concurrency) for concurrency in (1, 8)}
    finally:
        server.terminate()
        server.wait(timeout=30)
    reference = sentence_transformers_rate(model_dir.strip(), batches)
    print(f"{os.cpu_count()} CPUs, {args.requests} requests of {BATCH} sentences; python {sys.version.split()[0]}")
    print(f"sentence-transformers encode(), in-process: {reference:8.1f} embeddings/s")
    for concurrency, rate in rates.items():
        print(f"ForgeLLM /v1/embeddings, concurrency {concurrency}: {rate:8.1f} embeddings/s "
              f"({rate / reference:.2f}x sentence-transformers)")  # fmt: skip


if __name__ == "__main__":
    main()
