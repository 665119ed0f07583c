"""KV cache benchmark: quantized KV (its bytes, its quality, its throughput), admission by KV bytes under
--memory-budget, the prompt cache's disk tier, and agent turns against mlx_lm.server.

One command, from the repository root with the venv active (about twenty minutes on 2 CPU cores):

    python benchmarks/kv_bench.py

Sections (``--sections``, comma-separated, all by default), on the built-in model (``--model``):

- bytes: KV bytes per token at the model's dtype, 8 and 4 bits (``--kv-group-size`` at its defaults, 64 and
  32), measured in the batch's own cache.
- quality: perplexity of the real-model tests' paragraph decoded one token at a time through each cache, and
  the greedy agreement of the first 64 tokens of 32 chat prompts (one batch of 8 at a time) with the full
  precision cache.
- throughput: 8 clients, 16 ordinary questions of 160 tokens each (the end of text banned, so every answer has
  as many tokens), at temperature 0: ForgeLLM with
  ``--kv-bits`` off and 8, and mlx_lm.server with ``--kv-bits 8`` (which serves one request at a time).
- admission: a --memory-budget of the weights plus four 2,000-token sequences; 16 clients at once, each asking
  for 2,000 tokens, at full precision and at 4 bits. It polls /api/models for the sequences in the batch and
  the KV reserved, and reads the server's peak resident memory (VmHWM).
- disk: time to first token of a 3,000-token agent prompt: cold, again (memory tier), and after a restart
  (disk tier), with the greedy answers compared.
- agent: two sessions of five turns at once, a 1,650-token system prompt of tool descriptions, the whole
  history resent every turn, 48 tokens an answer: ForgeLLM and mlx_lm.server one after the other.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
from serve_bench import Server, forgellm_run, mlx_lm_env, running
from spec_bench import QUESTIONS

from forgellm.backends.mlx import ModelSources
from forgellm.backends.mlx.cpu_blas import selected_blas
from forgellm.testing import free_port

TOPICS = ["rivers", "volcanoes", "bread", "chess", "bees", "comets", "glass", "tides"]
MLX_LM_ARGS = ["--host", "127.0.0.1", "--log-level", "WARNING"]


def tool(index: int) -> dict:
    """One made-up tool in OpenAI's function format, about 55 tokens described."""
    topic = TOPICS[index % len(TOPICS)]
    return {
        "type": "function",
        "function": {
            "name": f"lookup_{topic}_{index}",
            "description": f"Look up facts about {topic} in the reference library, volume {index}; returns a "
            "short summary with sources.",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": "What to look up."},
                    "limit": {"type": "integer", "description": "How many results."},
                },
                "required": ["query"],
            },
        },
    }


def system_prompt(tools: int) -> str:
    lines = "\n".join(json.dumps(tool(i)) for i in range(tools))
    return f"You are an agent. You can call these tools by answering with a JSON object naming one:\n{lines}"


# -- in-process sections -------------------------------------------------------------------------------------------
def kv_forms() -> dict[str, object]:
    from forgellm.backends.mlx.quantized_kv import KvQuantization

    return {"model dtype": None, "8-bit": KvQuantization.chosen(8, None, 0), "4-bit": KvQuantization.chosen(4, None, 0)}


def section_bytes(path: Path) -> dict[str, int]:
    from mlx_lm import load

    from forgellm.backends.mlx.kv_footprint import kv_bytes_per_token

    model = load(str(path))[0]
    sizes = {name: kv_bytes_per_token(model, form) for name, form in kv_forms().items()}  # type: ignore[arg-type]
    print("\nKV bytes per token (all layers, keys and values)")
    for name, size in sizes.items():
        print(f"  {name:>11}: {size:>6,}  ({sizes['model dtype'] / size:.2f}x smaller than the model's dtype)")
    return sizes


def section_quality(path: Path) -> None:
    from forgellm import GenerationJob
    from forgellm.backends.mlx.batch_engine import EngineTuning
    from forgellm.backends.mlx.draft_policy import SpeculationSettings
    from forgellm.backends.mlx.kv_footprint import perplexity_through_cache
    from forgellm.backends.mlx.model import MlxModel

    paragraph = (
        "The quick brown fox jumps over the lazy dog. Paris is the capital and most populous city of France. "
        "It is located on the Seine River, in the north of the country. The city has been one of the world's "
        "major centres of finance, diplomacy, commerce, culture, fashion and gastronomy for centuries."
    )
    perplexities = {}
    for name, form in kv_forms().items():
        tuning = EngineTuning(kv_quantization=form)  # type: ignore[arg-type]
        served = MlxModel("bench", None, tuning, path=str(path))
        tokens = served.encode(paragraph)
        perplexities[name] = perplexity_through_cache(served.model, tokens, served.kv_layers)
    base = perplexities["model dtype"]
    print(f"\nperplexity of the paragraph ({len(tokens)} tokens), decoded one token at a time")
    for name, value in perplexities.items():
        print(f"  {name:>11}: {value:.4f}  ({100 * (value / base - 1):+.2f}%)")

    prompts = [f"{q} Answer for someone who likes {t}." for q in QUESTIONS for t in TOPICS[:4]]
    outputs = {}
    for name, form in kv_forms().items():
        tuning = EngineTuning(prompt_cache_size=0, speculation=SpeculationSettings(enabled=False), kv_quantization=form)
        served = MlxModel("bench", None, tuning, path=str(path))
        texts: dict[int, list[int]] = {}
        for start in range(0, len(prompts), 8):
            engine = served.create_engine(8)
            for seq_id in range(start, min(start + 8, len(prompts))):
                prompt = served.encode_chat([{"role": "user", "content": prompts[seq_id]}])
                engine.add(seq_id, GenerationJob(prompt_tokens=prompt, max_tokens=64))
                texts[seq_id] = []
            while len(engine):
                for output in engine.step():
                    texts[output.seq_id].append(output.text)
            engine.close()
        outputs[name] = ["".join(texts[i]) for i in range(len(prompts))]
    print(f"\ngreedy agreement, first 64 tokens of {len(prompts)} chat prompts, against the model's dtype")
    for name in ("8-bit", "4-bit"):
        same = sum(a == b for a, b in zip(outputs[name], outputs["model dtype"], strict=True))
        print(f"  {name:>11}: {same}/{len(prompts)} identical ({100 * same / len(prompts):.0f}%)")


# -- served sections -----------------------------------------------------------------------------------------------
async def closed_loop(
    url: str, prompts: list[str], concurrency: int, max_tokens: int, extra: dict | None = None
) -> tuple[int, float]:
    queue = list(prompts)
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while queue:
            content = queue.pop(0)
            body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0}
            response = await http.post(url + "/v1/chat/completions", json={**body, **(extra or {})})
            response.raise_for_status()
            tokens += response.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=3600) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return tokens, time.perf_counter() - started


def mlx_lm_server(path: Path, port: int, *extra: str) -> list[str]:
    return [__import__("sys").executable, "-m", "mlx_lm", "server", "--model", str(path), *MLX_LM_ARGS,
            "--port", str(port), *extra]  # fmt: skip


@contextlib.contextmanager
def serving(name: str, command: Callable[[int], list[str]]) -> Iterator[Server]:
    """A ForgeLLM or mlx_lm.server process on a free port (mlx_lm.server with ForgeLLM's BLAS preloaded)."""
    port = free_port()
    theirs = name.startswith("mlx_lm")
    env = mlx_lm_env(argparse.Namespace(mlx_lm_blas="same")) if theirs else None
    with running(name, command(port), port, "/health" if theirs else "/readyz", {}, env) as server:
        yield server


def end_of_text_banned(path: Path) -> dict:
    """A logit_bias that bans the model's end-of-text tokens, so every answer runs to max_tokens and both servers
    generate the same number of tokens whatever their greedy choices."""
    config = json.loads((path / "config.json").read_text())
    eos = config.get("eos_token_id")
    return {"logit_bias": {str(token): -100 for token in (eos if isinstance(eos, list) else [eos])}}


def section_throughput(path: Path) -> None:
    prompts = [f"Request {n}. {QUESTIONS[n % len(QUESTIONS)]}" for n in range(16)]
    banned = end_of_text_banned(path)
    warm = ["Say hello."]
    rates = {}
    for name, command in {
        "forgellm": lambda port: forgellm_run(port, "--model", str(path)),
        "forgellm --kv-bits 8": lambda port: forgellm_run(port, "--model", str(path), "--kv-bits", "8"),
        "mlx_lm.server --kv-bits 8": lambda port: mlx_lm_server(path, port, "--kv-bits", "8"),
    }.items():
        with serving(name, command) as server:
            asyncio.run(closed_loop(server.url, warm, 1, 8))
            tokens, wall = asyncio.run(closed_loop(server.url, prompts, 8, 160, banned))
        rates[name] = tokens / wall
        print(f"  {name:>26}: {tokens} tokens in {wall:.1f}s, {rates[name]:.1f} tok/s", flush=True)
    ours = rates["forgellm --kv-bits 8"]
    print(f"  8-bit over off: {ours / rates['forgellm']:.2f}x; over mlx_lm.server --kv-bits 8: "
          f"{ours / rates['mlx_lm.server --kv-bits 8']:.2f}x")  # fmt: skip


def memory_of(server: Server, field: str) -> int:
    """A field of the server process's /proc status, in bytes: VmRSS now, VmHWM the peak."""
    for line in Path(f"/proc/{server.pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


async def watched_burst(url: str, prompts: list[str], max_tokens: int) -> tuple[list[int], dict[str, int]]:
    """Send every prompt at once; meanwhile poll /api/models for the most sequences in the batch, the most KV
    reserved and the most memory counted."""
    peaks = {"active": 0, "reserved": 0, "in_use": 0}
    done = asyncio.Event()
    async with httpx.AsyncClient(timeout=3600) as http:

        async def watch() -> None:
            while not done.is_set():
                state = (await http.get(url + "/api/models")).json()
                model = state["models"][0]
                peaks["active"] = max(peaks["active"], model["active_sequences"])
                peaks["reserved"] = max(peaks["reserved"], model["kv_cache"]["reserved"])
                peaks["in_use"] = max(peaks["in_use"], state["memory_in_use"])
                await asyncio.sleep(0.05)

        async def one(content: str) -> int:
            body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0}
            return (await http.post(url + "/v1/chat/completions", json=body)).status_code

        watcher = asyncio.create_task(watch())
        statuses = await asyncio.gather(*(one(prompt) for prompt in prompts))
        done.set()
        await watcher
    return list(statuses), peaks


def section_admission(path: Path, sizes: dict[str, int]) -> None:
    weights = sum(file.stat().st_size for file in path.glob("*.safetensors"))
    sequence = 2304 * sizes["model dtype"]  # 2,000 tokens, its prompt and a step's drafts, in 256-position blocks
    budget = weights + 4 * sequence
    print(f"\nadmission: budget {budget:,} bytes = weights {weights:,} + 4 x {sequence:,} (a 2,000-token sequence)")
    prompts = [f"Request {n}. {QUESTIONS[n % len(QUESTIONS)]}" for n in range(16)]
    for label, extra in (("model dtype", []), ("4-bit", ["--kv-bits", "4"])):
        options = ["--model", str(path), "--memory-budget", str(budget), "--max-concurrency", "16",
                   "--prompt-cache-size", "0", *extra]  # fmt: skip
        with serving(label, lambda port, options=options: forgellm_run(port, *options)) as server:
            idle = memory_of(server, "VmRSS")
            started = time.perf_counter()
            statuses, peaks = asyncio.run(watched_burst(server.url, prompts, 2000))
            wall = time.perf_counter() - started
            peak = memory_of(server, "VmHWM")
        answered, refused = statuses.count(200), statuses.count(503)
        within = "within" if peaks["in_use"] <= budget else "PAST"
        print(f"  {label:>11}: {answered} answered, {refused} refused (503), {16 - answered - refused} other, in "
              f"{wall:.0f}s; at most {peaks['active']} in the batch; counted memory peak {peaks['in_use']:,} "
              f"({within} the budget); KV reserved peak {peaks['reserved']:,}; resident memory idle {idle:,}, "
              f"peak {peak:,} (+{peak - idle:,})", flush=True)  # fmt: skip


async def streamed_chat(
    http: httpx.AsyncClient, url: str, messages: list[dict], max_tokens: int, usage: list[dict] | None = None
) -> tuple[float, str]:
    """Time to first token and the text; the usage the server reports at the end is appended to usage."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    started = time.perf_counter()
    first = None
    text = []
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage") and usage is not None:
                usage.append(chunk["usage"])
            choices = chunk.get("choices") or [{}]
            piece = (choices[0].get("delta") or {}).get("content") or ""
            if piece and first is None:
                first = time.perf_counter() - started
            text.append(piece)
    return (first if first is not None else time.perf_counter() - started), "".join(text)


def section_disk(path: Path) -> None:
    messages = [{"role": "system", "content": system_prompt(28)}, {"role": "user", "content": "Find facts on bees."}]

    async def ask(url: str) -> tuple[float, str]:
        async with httpx.AsyncClient(timeout=3600) as http:
            return await streamed_chat(http, url, messages, 48)

    with tempfile.TemporaryDirectory(prefix="kv-bench-disk-") as folder:
        command = lambda port: forgellm_run(port, "--model", str(path), "--prompt-cache-dir", folder)  # noqa: E731
        with serving("first", command) as server:
            results = {"cold": asyncio.run(ask(server.url)), "memory": asyncio.run(ask(server.url))}
            body = {"messages": messages, "max_tokens": 1}
            prompt_tokens = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=600).json()["usage"]
        with serving("restarted", command) as server:  # the first wrote its prompt cache to disk as it stopped
            results["disk"] = asyncio.run(ask(server.url))
    cold = results["cold"][0]
    print(f"\ndisk tier: time to first token of a {prompt_tokens['prompt_tokens']:,}-token agent prompt")
    for phase, (ttft, text) in results.items():
        same = "same answer" if text == results["cold"][1] else "DIFFERENT answer"
        print(f"  {phase:>6}: {ttft:7.2f}s  ({cold / ttft:5.1f}x faster than cold; {same})")


async def agent_sessions(
    url: str, system: str, usage: list[dict], turns: int = 5, sessions: int = 2
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"first_ttft": [], "later_ttft": [], "later_turn": [], "all": []}

    async def session(http: httpx.AsyncClient, index: int) -> None:
        messages = [{"role": "system", "content": system}]
        for turn in range(turns):
            messages.append({"role": "user", "content": f"Session {index}, step {turn}: look up {TOPICS[turn]}."})
            started = time.perf_counter()
            ttft, text = await streamed_chat(http, url, messages, 48, usage if turn else None)
            took = time.perf_counter() - started
            times["first_ttft" if turn == 0 else "later_ttft"].append(ttft)
            if turn:
                times["later_turn"].append(took)
            messages.append({"role": "assistant", "content": text})

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=3600) as http:
        await asyncio.gather(*(session(http, i) for i in range(sessions)))
    times["all"].append(time.perf_counter() - started)
    return times


def section_agent(path: Path) -> None:
    system = system_prompt(15)
    print("\nagent turns: 2 sessions x 5 turns at once, 48 tokens an answer")
    for name, command in {
        "forgellm": lambda port: forgellm_run(port, "--model", str(path)),
        "mlx_lm.server": lambda port: mlx_lm_server(path, port),
    }.items():
        with serving(name, command) as server:
            asyncio.run(closed_loop(server.url, ["Say hello."], 1, 4))
            usage: list[dict] = []
            times = asyncio.run(agent_sessions(server.url, system, usage))
            body = {"messages": [{"role": "system", "content": system}], "max_tokens": 1}
            tokens = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=600).json()
        mean = {key: sum(values) / len(values) for key, values in times.items()}
        print(f"  {name:>14}: {mean['all']:.1f}s in all; first turn's time to first token {mean['first_ttft']:.2f}s "
              f"(system prompt {tokens['usage']['prompt_tokens']:,} tokens); later turns {mean['later_turn']:.2f}s "
              f"each (time to first token {mean['later_ttft']:.2f}s)", flush=True)  # fmt: skip
        cached = [u.get("prompt_tokens_details", {}).get("cached_tokens") for u in usage]
        if usage and None not in cached:
            prompt = sum(u["prompt_tokens"] for u in usage) / len(usage)
            reused = sum(cached) / len(cached)  # type: ignore[arg-type]
            print(f"{'':>18}later turns' prompts: {prompt:,.0f} tokens, {reused:,.0f} of them from the prompt cache, "
                  f"{prompt - reused:,.0f} prefilled")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="A built-in name, GGUF file or MLX dir.")
    parser.add_argument("--sections", default="bytes,quality,throughput,admission,disk,agent")
    args = parser.parse_args()
    path = Path(ModelSources().resolve(args.model, lambda text: print(f"{args.model}: {text}", flush=True)))
    print(f"model: {path}; BLAS: {selected_blas() or 'MLX bundled'}", flush=True)
    sections = args.sections.split(",")
    from forgellm.backends.mlx.bootstrap import prepare_process

    prepare_process()
    sizes = section_bytes(path)
    if "quality" in sections:
        section_quality(path)
    if "throughput" in sections:
        print("\nthroughput: 8 clients, 16 questions, 160 max tokens")
        section_throughput(path)
    if "admission" in sections:
        section_admission(path, sizes)
    if "disk" in sections:
        section_disk(path)
    if "agent" in sections:
        section_agent(path)


if __name__ == "__main__":
    main()
