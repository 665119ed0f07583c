"""How long one long prompt stalls everyone else: a running stream's longest wait for a token, and a short
request's latency, while a long prompt is prefilled, at each --prefill-chunk-size.

    python benchmarks/prefill_stall.py                          # chunk sizes 2048 (mlx-lm's) and 256 (ours)
    python benchmarks/prefill_stall.py --chunk-sizes 64,256,2048 --prompt-tokens 4000 --model-size small

For each chunk size it starts its own ``forgellm run`` on 127.0.0.1, starts a stream that generates
until told to stop, sends the long prompt (non-streamed, a few tokens), and a little later a short
request; it prints the stream's longest gap between two tokens while the long prompt was in flight,
the short request's latency, and how long the long prompt took. Before chunked prefill a 4,000-token
prompt made another client's 8-token request wait 58 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import httpx
from serve_bench import MODEL_SIZES  # the same random models, beside this script

from forgellm.testing import ServerProcess, build_tiny_model


async def measure(url: str, prompt_tokens: int) -> dict:
    gaps: list[tuple[float, float]] = []  # (when a token arrived, the gap before it)
    long_window: dict[str, float] = {}

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def running_stream() -> None:
            body = {"prompt": "stream", "max_tokens": 100000, "streaming": True}
            async with client.stream("POST", "/api/model/generate", json=body) as response:
                last = None
                async for line in response.aiter_lines():
                    now = time.perf_counter()
                    if json.loads(line).get("type") != "chunk":
                        continue
                    if last is not None:
                        gaps.append((now, now - last))
                    last = now
                    if "end" in long_window and now > long_window["end"] + 0.5:
                        return

        async def long_prompt() -> None:
            await asyncio.sleep(1.0)  # the stream is decoding
            long_window["start"] = time.perf_counter()
            text = " ".join(["the"] * prompt_tokens)  # one token a word for the test tokenizer
            response = await client.post("/api/model/generate", json={"prompt": text, "max_tokens": 4})
            long_window["end"] = time.perf_counter()
            if response.status_code != 200:
                raise SystemExit(f"the long prompt was refused: {response.text}")
            long_window["prompt_tokens"] = response.json()["prompt_tokens"]

        async def short_request() -> None:
            await asyncio.sleep(1.2)  # just after the long prompt started
            started = time.perf_counter()
            await client.post("/api/model/generate", json={"prompt": "short", "max_tokens": 8})
            long_window["short_latency"] = time.perf_counter() - started

        await asyncio.gather(running_stream(), long_prompt(), short_request())
    during = [gap for at, gap in gaps if long_window["start"] <= at <= long_window["end"] + 0.1]
    return {
        "prompt_tokens": int(long_window["prompt_tokens"]),
        "long_prompt_s": long_window["end"] - long_window["start"],
        "max_gap_s": max(during, default=float("nan")),
        "tokens_during": len(during),
        "short_latency_s": long_window["short_latency"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunk-sizes", default="2048,256")
    parser.add_argument("--prompt-tokens", type=int, default=4000)
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="tiny")
    parser.add_argument("--cache-dir", default="/tmp/forgellm-bench")
    args = parser.parse_args()
    path = Path(args.cache_dir) / f"stall-llama-{args.model_size}"
    if not (path / "model.safetensors").exists():
        build_tiny_model(path, config_overrides=MODEL_SIZES[args.model_size])
    print(f"model: {path}; a running stream, then a {args.prompt_tokens}-word prompt, then an 8-token request")
    print("chunk | prompt tokens | long prompt s | stream's longest gap s | tokens meanwhile | short request s")
    for chunk in (int(c) for c in args.chunk_sizes.split(",")):
        server_args = [
            "--model",
            str(path),
            "--prefill-chunk-size",
            str(chunk),
            "--max-prompt-tokens",
            str(args.prompt_tokens * 2),
            "--max-tokens-cap",
            "100000",
        ]
        with ServerProcess(server_args) as server:
            result = asyncio.run(measure(server.url, args.prompt_tokens))
        print(
            f"{chunk:5d} | {result['prompt_tokens']:13d} | {result['long_prompt_s']:13.2f} | "
            f"{result['max_gap_s']:22.2f} | {result['tokens_during']:16d} | {result['short_latency_s']:15.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
