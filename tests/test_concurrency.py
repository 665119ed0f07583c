"""Continuous batching, proven by counting engine steps rather than timing them, and bursts of clients.

An engine step advances every sequence in the batch by one token, so requests that are
batched finish in about as many steps as one of them takes alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

import httpx
import pytest

from forgellm.backends.mlx import EngineTuning, MlxModel
from forgellm.core.engine.generation import GenerationJob
from forgellm.testing import ServerProcess, test_client

PROMPTS = [
    "Once upon a time",
    "The quick brown fox",
    "Servers load models",
    "Good software is tested",
    "In winter the wind was cold",
    "Language models predict",
    "Children ran along the beach",
    "A tokenizer splits text",
]


def steps_of(client) -> int:
    return client.app.state.server.default_model.scheduler.steps


def complete(client, prompt: str, max_tokens: int) -> str:
    response = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == max_tokens
    return response.json()["choices"][0]["text"]


def complete_all_at_once(client, prompts: list[str], max_tokens: int) -> list[str]:
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda prompt: complete(client, prompt, max_tokens), prompts))


@pytest.fixture(scope="module")
def one_token_a_step(tiny_model):
    """Speculation off: every step decodes exactly one token per sequence, so steps count tokens."""
    with test_client(tiny_model, speculation="off") as client:
        yield client


def test_concurrent_requests_share_engine_steps(one_token_a_step):
    client = one_token_a_step
    max_tokens = 48
    before = steps_of(client)
    for prompt in PROMPTS:
        complete(client, prompt, max_tokens)
    in_a_row = steps_of(client) - before

    before = steps_of(client)
    complete_all_at_once(client, PROMPTS, max_tokens)
    together = steps_of(client) - before

    assert in_a_row >= len(PROMPTS) * max_tokens  # one token per step each
    assert together < 2 * max_tokens  # all eight advanced in the same steps


def test_greedy_text_is_the_same_alone_and_batched(client):
    alone = [complete(client, prompt, 24) for prompt in PROMPTS]
    assert complete_all_at_once(client, PROMPTS, 24) == alone
    assert len(set(alone)) == len(PROMPTS)  # different prompts, different texts: a real comparison


def steps_to_first_tokens(engine, prompts: list[list[int]]) -> list[int]:
    """Add the prompts to the engine at once and step it; the step at which each sequence gave its first token."""
    for seq_id, prompt in enumerate(prompts):
        engine.add(seq_id, GenerationJob(prompt_tokens=prompt, max_tokens=4))
    first_step: dict[int, int] = {}
    step = 0
    while len(first_step) < len(prompts):
        step += 1
        for output in engine.step():
            first_step.setdefault(output.seq_id, step)
    return [first_step[seq_id] for seq_id in range(len(prompts))]


@pytest.mark.parametrize("prefill_batch_size", [1, 2, 4])
def test_prefill_batch_size_is_how_many_prompts_start_together(tiny_model, prefill_batch_size):
    model = MlxModel(str(tiny_model), None, EngineTuning(prefill_batch_size=prefill_batch_size))
    prompts = [model.encode(prompt) for prompt in PROMPTS[:4]]
    first_steps = steps_to_first_tokens(model.create_engine(max_batch_size=8), prompts)
    # Prompts that share a prefill pass give their first tokens in the same step; each later pass, one step on.
    groups = [first_steps[i : i + prefill_batch_size] for i in range(0, len(prompts), prefill_batch_size)]
    assert all(len(set(group)) == 1 for group in groups)
    assert [group[0] for group in groups] == sorted(set(first_steps))
    assert len(set(first_steps)) == len(groups)


@pytest.mark.parametrize("prefill_batch_size", [1, 8])
def test_greedy_text_does_not_depend_on_the_prefill_batch_size(tiny_model, client, prefill_batch_size):
    alone = [complete(client, prompt, 16) for prompt in PROMPTS]
    with test_client(tiny_model, prefill_batch_size=prefill_batch_size) as tuned:
        assert complete_all_at_once(tuned, PROMPTS, 16) == alone


@pytest.fixture(scope="module")
def small_server(tiny_model):
    """A real process with room for 32 requests: 8 generating and 24 waiting."""
    with ServerProcess(["--model", str(tiny_model), "--max-concurrency", "8", "--max-queue", "24"]) as server:
        yield server


async def burst(url: str, clients: int) -> list:
    """clients requests released at the same instant, each on its own connection; their responses or errors."""
    gate = asyncio.Event()

    async def one(n: int):
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            await gate.wait()
            return await http.post("/v1/completions", json={"prompt": f"Client {n} says", "max_tokens": 16})

    tasks = [asyncio.create_task(one(n)) for n in range(clients)]
    await asyncio.sleep(0.2)  # every client is waiting at the gate
    gate.set()
    return await asyncio.gather(*tasks, return_exceptions=True)


def test_64_clients_at_once_are_all_answered(small_server):
    outcomes = asyncio.run(burst(small_server.url, 64))
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert errors == []  # no connection reset, refused or dropped
    statuses = [o.status_code for o in outcomes]
    assert set(statuses) <= {200, 503}
    assert statuses.count(200) >= 32  # everything that fit in the batch and queue was served
    for response in outcomes:
        if response.status_code == 200:
            assert response.json()["usage"]["completion_tokens"] == 16
        else:
            assert response.headers["retry-after"]
            assert response.json()["error"]["type"] == "server_overloaded"
