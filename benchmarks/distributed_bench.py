"""Serving over ranks: tokens per second and memory per rank for 1 and 3 ranks of the built-in SmolLM2 (tensor
parallel), ForgeLLM against mlx_lm.server in the same run, both spawned as mlx.launch spawns them (MLX_RANK and
MLX_HOSTFILE, ring backend, loopback).

One command, from the repository root with the venv active (about five minutes on 2 CPU cores):

    python benchmarks/distributed_bench.py

For each server and rank count: one stream of 32 tokens (ms per token: the lockstep's cost per step), then 3
streams at once (batched tokens/s), every answer run to 32 tokens (end of text banned) at temperature 0; each
rank's resident memory (VmRSS) and peak (VmHWM) after them; each rank's CPU use over 5 idle seconds. On one
2-core machine the ranks share the cores, so 3 ranks are slower than 1: the figures show the overhead of
lockstep per step, not what 3 machines give.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from forgellm.backends.mlx import ModelSources
from forgellm.backends.mlx.sources.builtin_models import DEFAULT_MODEL
from forgellm.testing import free_port

TOKENS = 32
PROMPTS = ["Once upon a time", "The best way to learn a language is", "Here is a recipe for bread:"]
IDLE_SECONDS = 5.0


@dataclass
class Group:
    name: str
    url: str
    processes: list[subprocess.Popen[bytes]]

    def proc_field(self, rank: int, field: str) -> int:
        for line in Path(f"/proc/{self.processes[rank].pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        return 0

    def cpu_seconds(self, rank: int) -> float:
        fields = Path(f"/proc/{self.processes[rank].pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_command(kind: str, path: Path, port: int) -> list[str]:
    if kind == "forgellm":
        return [sys.executable, "-m", "forgellm", "run", "--host", "127.0.0.1", "--port", str(port),
                "--model", str(path), "--log-level", "WARNING"]  # fmt: skip
    return [sys.executable, "-m", "mlx_lm", "server", "--model", str(path), "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "WARNING"]  # fmt: skip


@contextlib.contextmanager
def group_of(kind: str, ranks: int, path: Path) -> Iterator[Group]:
    """The server's ranks, spawned with the environment mlx.launch gives them; ready when rank 0 answers."""
    directory = Path(tempfile.mkdtemp(prefix="distributed-bench-"))
    hostfile = directory / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(ranks)]))
    port = free_port()
    processes = []
    for rank in range(ranks):
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if ranks > 1:
            env |= {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}
        log = open(directory / f"rank{rank}.log", "wb")
        processes.append(subprocess.Popen(server_command(kind, path, port), env=env, stdout=log, stderr=log))
    group = Group(f"{kind}, {ranks} rank{'s' if ranks > 1 else ''}", f"http://127.0.0.1:{port}", processes)
    try:
        ready = "/readyz" if kind == "forgellm" else "/health"
        deadline = time.monotonic() + 300
        while not _answers(group.url + ready):
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                raise RuntimeError(f"{group.name} did not start; logs in {directory}")
            time.sleep(0.5)
        yield group
    finally:
        # ForgeLLM's rank 0 ends its group; mlx_lm.server's ranks are each stopped.
        for process in processes[: 1 if kind == "forgellm" else None]:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


async def complete_all(url: str, prompts: list[str], banned: dict) -> tuple[list[str], float]:
    async with httpx.AsyncClient(timeout=3600) as http:

        async def one(prompt: str) -> str:
            body = {"prompt": prompt, "max_tokens": TOKENS, "temperature": 0, **banned}
            reply = await http.post(url + "/v1/completions", json=body)
            reply.raise_for_status()
            return str(reply.json()["choices"][0]["text"])

        started = time.perf_counter()
        texts = await asyncio.gather(*(one(prompt) for prompt in prompts))
        return list(texts), time.perf_counter() - started


def measure(group: Group, banned: dict) -> dict:
    asyncio.run(complete_all(group.url, ["Hello"], banned))  # warm
    single, single_wall = asyncio.run(complete_all(group.url, PROMPTS[:1], banned))
    batched, batched_wall = asyncio.run(complete_all(group.url, PROMPTS, banned))
    ranks = range(len(group.processes))
    rss = [group.proc_field(rank, "VmRSS") for rank in ranks]
    peak = [group.proc_field(rank, "VmHWM") for rank in ranks]
    before = [group.cpu_seconds(rank) for rank in ranks]
    time.sleep(IDLE_SECONDS)
    idle_cpu = [(group.cpu_seconds(rank) - old) / IDLE_SECONDS for rank, old in zip(ranks, before, strict=True)]
    return {
        "ms_per_token": single_wall * 1000 / TOKENS,
        "batched_tokens_per_s": len(PROMPTS) * TOKENS / batched_wall,
        "rss": rss,
        "peak": peak,
        "idle_cpu": idle_cpu,
        "texts": single + batched,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,3", help="rank counts to run, comma-separated (default 1,3)")
    args = parser.parse_args()
    path = Path(ModelSources().resolve(DEFAULT_MODEL, lambda text: print(f"{DEFAULT_MODEL}: {text}")))
    config = json.loads((path / "config.json").read_text())
    eos = config.get("eos_token_id")
    banned = {"logit_bias": {str(token): -100 for token in (eos if isinstance(eos, list) else [eos])}}
    print(f"model: {path.name}; {TOKENS} tokens an answer; CPU cores: {os.cpu_count()}", flush=True)
    results: dict[tuple[str, int], dict] = {}
    for ranks in map(int, args.ranks.split(",")):
        for kind in ("forgellm", "mlx_lm.server"):
            with group_of(kind, ranks, path) as group:
                result = measure(group, banned)
            results[kind, ranks] = result
            mib = [
                f"{rss / 2**20:.0f}/{peak / 2**20:.0f}" for rss, peak in zip(result["rss"], result["peak"], strict=True)
            ]
            print(f"{group.name:>24}: {result['ms_per_token']:7.1f} ms/token alone, "
                  f"{result['batched_tokens_per_s']:5.1f} tok/s for {len(PROMPTS)} at once; "
                  f"MiB per rank (now/peak) {' '.join(mib)}; idle CPU per rank "
                  f"{' '.join(f'{cpu:.0%}' for cpu in result['idle_cpu'])}", flush=True)  # fmt: skip
        ours, theirs = results["forgellm", ranks], results["mlx_lm.server", ranks]
        # mlx_lm.server drops the space a completion's first token starts with: compare the words.
        same = (
            "the same"
            if [t.lstrip() for t in ours["texts"]] == [t.lstrip() for t in theirs["texts"]]
            else "NOT the same"
        )
        print(f"  {ranks} ranks, ForgeLLM over mlx_lm.server: {theirs['ms_per_token'] / ours['ms_per_token']:.2f}x "
              f"per token alone, {ours['batched_tokens_per_s'] / theirs['batched_tokens_per_s']:.2f}x batched; "
              f"greedy answers {same}", flush=True)  # fmt: skip
    counts = sorted({ranks for _, ranks in results})
    if len(counts) > 1:
        one, many = results["forgellm", counts[0]], results["forgellm", counts[-1]]
        same = "the same" if one["texts"] == many["texts"] else "NOT the same"
        print(f"  ForgeLLM greedy answers over {counts[-1]} ranks and {counts[0]}: {same}")


if __name__ == "__main__":
    main()
