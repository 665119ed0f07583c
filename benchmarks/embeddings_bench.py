"""Embeddings per second: ForgeLLM's /v1/embeddings over HTTP at concurrency 1 and 8 (each request a batch of
16 sentences), against sentence-transformers' encode() in-process on the same CPU, same model, same run.

    python benchmarks/embeddings_bench.py [--forgellm PATH] [--requests 48] [--rounds 3]

It runs `forgellm run --model all-minilm-l6-v2` (PATH: the forgellm command, by default the one on PATH),
and sentence-transformers from the Python running this script (which needs it, and torch, installed; the
server's environment does not). Requests use the standard library only, and ask for base64 vectors as the
openai client does by default. The measurements alternate over
several rounds and each figure is the median of its rounds, as a shared machine's speed drifts by tens of
per cent within minutes. Issue 26's target: at least 0.8 times sentence-transformers at concurrency 8.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import os
import random
import shutil
import socket
import statistics
import struct
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


def embedded(url: str, batch: list[str]) -> list[tuple[float, ...]]:
    """The batch's vectors, sent as the openai client asks for them by default: base64 of float32."""
    answer = post(url, {"model": MODEL, "input": batch, "encoding_format": "base64"})
    vectors = [base64.b64decode(item["embedding"]) for item in answer["data"]]
    return [struct.unpack(f"<{len(vector) // 4}f", vector) for vector in vectors]


def http_rate(url: str, batches: list[list[str]], concurrency: int) -> float:
    embedded(url, batches[0])  # warm-up
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(lambda batch: embedded(url, batch), batches))
    elapsed = time.perf_counter() - started
    assert all(len(vectors) == BATCH and len(vectors[0]) == 384 for vectors in answers)
    return len(batches) * BATCH / elapsed


def sentence_transformers_rate(model: object, batches: list[list[str]]) -> float:
    model.encode(batches[0], batch_size=BATCH)  # type: ignore[attr-defined]
    started = time.perf_counter()
    for batch in batches:
        model.encode(batch, batch_size=BATCH)  # type: ignore[attr-defined]
    return len(batches) * BATCH / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forgellm", default=shutil.which("forgellm") or "forgellm")
    parser.add_argument("--requests", type=int, default=48, help="requests (batches of 16) per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; each figure is their median")
    args = parser.parse_args()
    from sentence_transformers import SentenceTransformer

    model_dir = subprocess.run([args.forgellm, "pull", MODEL], capture_output=True, text=True, check=True).stdout
    batches = [sentences(BATCH, seed) for seed in range(args.requests)]
    reference_model = SentenceTransformer(model_dir.strip(), device="cpu")
    port = free_port()
    server = serve(args.forgellm, port)
    measured: dict[str, list[float]] = {"reference": [], "1": [], "8": []}
    try:
        url = f"http://127.0.0.1:{port}/v1/embeddings"
        for _ in range(args.rounds):  # the server idles while sentence-transformers runs
            measured["reference"].append(sentence_transformers_rate(reference_model, batches))
            for concurrency in (1, 8):
                measured[str(concurrency)].append(http_rate(url, batches, concurrency))
    finally:
        server.terminate()
        server.wait(timeout=30)
    reference = statistics.median(measured["reference"])
    print(f"{os.cpu_count()} CPUs, {args.requests} requests of {BATCH} sentences, median of {args.rounds} rounds; "
          f"python {sys.version.split()[0]}")  # fmt: skip
    rounds = ", ".join(f"{rate:.0f}" for rate in measured["reference"])
    print(f"sentence-transformers encode(), in-process: {reference:8.1f} embeddings/s (rounds: {rounds})")
    for concurrency in (1, 8):
        rate = statistics.median(measured[str(concurrency)])
        rounds = ", ".join(f"{rate:.0f}" for rate in measured[str(concurrency)])
        print(f"ForgeLLM /v1/embeddings, concurrency {concurrency}: {rate:8.1f} embeddings/s "
              f"({rate / reference:.2f}x sentence-transformers; rounds: {rounds})")  # fmt: skip


if __name__ == "__main__":
    main()
