"""Speculative decoding inside the batch: the output is the model's own, with drafts or without.

The tiny model's greedy output with speculation off is the reference. With it on, the same requests give the
same text token for token: with a prediction that is right (every draft accepted), one that is edited (drafts
rejected where it departs), alone and batched beside rows that do not speculate, under a grammar, with stop
strings, with logprobs, and after a prompt-cache hit. A sampled row keeps the target's distribution: measured
on the engine itself, over a vocabulary cut to three tokens.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import math
import shutil
from collections import Counter

import httpx
import mlx.core as mx
import openai
import pytest
from live_server import idle, serving, wait_for

from forgellm import GenerationJob, SamplingParams
from forgellm.backends.mlx.batch_engine import EngineTuning
from forgellm.backends.mlx.model import MlxModel
from forgellm.testing import test_client, wait_until_loaded

CHAT = "/v1/chat/completions"
MAX_TOKENS = 40
PROMPTS = ["Once upon a time", "The quick brown fox", "Tell me about the sea", "def main():"]


def chat(client, content: str | None = None, **extra) -> dict:
    messages = [{"role": "user", "content": content}] if content is not None else extra.pop("messages")
    body = {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}
    response = client.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def text(answer: dict) -> str:
    return answer["choices"][0]["message"]["content"]


def predicted(answer: dict) -> tuple[int, int]:
    details = answer["usage"]["completion_tokens_details"]
    return details["accepted_prediction_tokens"], details["rejected_prediction_tokens"]


@pytest.fixture(scope="module")
def speculating(tiny_model):
    with test_client(tiny_model, prompt_cache_size=0) as client:
        yield client


@pytest.fixture(scope="module")
def reference(tiny_model):
    """The greedy answers with speculation off."""
    with test_client(tiny_model, speculation="off", prompt_cache_size=0) as client:
        yield {prompt: chat(client, prompt) for prompt in PROMPTS}


def edited(original: str) -> str:
    """The text with its middle third replaced: a prediction the output departs from, then rejoins."""
    third = len(original) // 3
    return original[:third] + " something else entirely " + original[2 * third :]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_a_right_prediction_is_accepted_and_changes_nothing(speculating, reference, prompt):
    expected = reference[prompt]
    answer = chat(speculating, prompt, prediction={"type": "content", "content": text(expected)})
    assert text(answer) == text(expected)
    assert answer["usage"]["completion_tokens"] == expected["usage"]["completion_tokens"]
    accepted, _ = predicted(answer)
    assert accepted >= answer["usage"]["completion_tokens"] // 2


@pytest.mark.parametrize("prompt", PROMPTS)
def test_an_edited_prediction_is_rejected_where_it_departs_and_changes_nothing(speculating, reference, prompt):
    expected = text(reference[prompt])
    answer = chat(
        speculating, prompt, prediction={"type": "content", "content": [{"type": "text", "text": edited(expected)}]}
    )
    assert text(answer) == expected
    accepted, rejected = predicted(answer)
    assert accepted > 0 and rejected > 0


def test_without_a_prediction_usage_reports_none(speculating):
    assert predicted(chat(speculating, PROMPTS[0])) == (0, 0)


def test_with_stop_strings_the_text_ends_where_it_does_without_speculation(speculating, reference, tiny_model):
    expected = text(reference[PROMPTS[1]])
    stop = expected[len(expected) // 2 : len(expected) // 2 + 3]
    with test_client(tiny_model, speculation="off") as plain:
        without = chat(plain, PROMPTS[1], stop=[stop])
    answer = chat(speculating, PROMPTS[1], stop=[stop], prediction={"type": "content", "content": expected})
    assert text(answer) == text(without) and answer["choices"][0]["finish_reason"] == "stop"


def test_logprobs_are_the_targets_with_speculation(speculating, reference, tiny_model):
    with test_client(tiny_model, speculation="off") as plain:
        without = chat(plain, PROMPTS[2], logprobs=True, top_logprobs=2)
    prediction = {"type": "content", "content": text(reference[PROMPTS[2]])}
    answer = chat(speculating, PROMPTS[2], logprobs=True, top_logprobs=2, prediction=prediction)
    assert predicted(answer)[0] > 0
    ours, theirs = answer["choices"][0]["logprobs"]["content"], without["choices"][0]["logprobs"]["content"]
    assert [entry["token"] for entry in ours] == [entry["token"] for entry in theirs]
    for mine, other in zip(ours, theirs, strict=True):
        assert mine["logprob"] == pytest.approx(other["logprob"], abs=1e-3)
        assert [top["token"] for top in mine["top_logprobs"]] == [top["token"] for top in other["top_logprobs"]]


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}}}


def test_a_grammar_never_lets_a_forbidden_draft_through(speculating, tiny_model):
    format = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    with test_client(tiny_model, speculation="off") as plain:
        without = text(chat(plain, PROMPTS[3], response_format=format, max_tokens=60))
    # A prediction that breaks the grammar at once, then one that follows the output exactly.
    for prediction in ('{"nonsense": [1, 2, 3]} and more', without):
        answer = chat(speculating, PROMPTS[3], response_format=format, max_tokens=60,
                      prediction={"type": "content", "content": prediction})  # fmt: skip
        assert text(answer) == without
    assert predicted(answer)[0] > 0


def test_after_a_prompt_cache_hit_the_output_is_the_same(tiny_model, reference):
    expected = text(reference[PROMPTS[0]])
    with test_client(tiny_model) as cached:
        first = chat(cached, PROMPTS[0], prediction={"type": "content", "content": expected})
        second = chat(cached, PROMPTS[0], prediction={"type": "content", "content": expected})
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert text(first) == text(second) == expected
    assert predicted(second)[0] > 0


def test_rows_that_speculate_and_rows_that_do_not_share_the_batch(tiny_model, reference):
    """Each row accepts its own draft in the shared step: predictions, edited predictions, and rows that never
    speculate (with --speculation predictions, a row without a prediction has no draft source at all)."""
    jobs = []
    for prompt, variant in itertools.product(PROMPTS, ("right", "edited", "none")):
        expected = text(reference[prompt])
        extra = {"prediction": {"type": "content", "content": expected if variant == "right" else edited(expected)}}
        jobs.append((prompt, expected, extra if variant != "none" else {}))
    with serving(tiny_model, max_concurrency=8, prompt_cache_size=0, speculation="predictions") as live:

        def run(job: tuple[str, str, dict]) -> tuple[str, str, int]:
            prompt, expected, extra = job
            body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS, "temperature": 0}
            response = httpx.post(f"{live.url}{CHAT}", json={**body, **extra}, timeout=120)
            assert response.status_code == 200, response.text
            return text(response.json()), expected, predicted(response.json())[0]

        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(run, jobs))
    assert all(got == expected for got, expected, _ in results)
    accepted = [count for _, _, count in results]
    assert all(count > 0 for count in accepted[0::3]) and not any(accepted[2::3])  # right ones; none


def test_prediction_through_the_openai_client(speculating, reference):
    oai = openai.OpenAI(base_url=f"{speculating.base_url}/v1", api_key="unused", http_client=speculating, max_retries=0)
    expected = text(reference[PROMPTS[0]])
    completion = oai.chat.completions.create(
        model=oai.models.list().data[0].id,
        messages=[{"role": "user", "content": PROMPTS[0]}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        prediction={"type": "content", "content": expected},
    )
    assert completion.choices[0].message.content == expected
    details = completion.usage.completion_tokens_details
    # (The prediction is the text, tokenized anew: a few of its tokens may split the text otherwise than the output.)
    assert details.accepted_prediction_tokens >= completion.usage.completion_tokens // 2
    assert details.rejected_prediction_tokens < details.accepted_prediction_tokens


def test_a_bad_prediction_is_a_400(speculating):
    for prediction in ({"type": "image", "content": "x"}, {"type": "content"},
                       {"type": "content", "content": [{"type": "image_url", "image_url": "x"}]}):  # fmt: skip
        response = speculating.post(
            CHAT, json={"messages": [{"role": "user", "content": "x"}], "prediction": prediction}
        )
        assert response.status_code == 400, response.text
        assert "prediction" in response.json()["error"]["message"]


def test_cancelling_a_stream_mid_draft_frees_its_slot(tiny_model, reference):
    long_prediction = text(reference[PROMPTS[0]]) * 8

    async def hang_up(url: str) -> int:
        body = {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 2000, "temperature": 0,
                "stream": True, "prediction": {"type": "content", "content": long_prediction}}  # fmt: skip
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            async with http.stream("POST", CHAT, json=body) as response:
                async for _ in response.aiter_bytes():
                    break
                return response.status_code

    with serving(tiny_model, max_concurrency=1, max_tokens_cap=2000) as live:
        assert asyncio.run(hang_up(live.url)) == 200
        wait_for(lambda: idle(live.scheduler), "the cancelled sequence to leave the batch")
        after = httpx.post(f"{live.url}{CHAT}", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert after.status_code == 200


def test_metrics_and_the_access_log_count_accepted_drafts(tiny_model, reference, tmp_path):
    expected = text(reference[PROMPTS[0]])
    log = tmp_path / "access.log"
    with test_client(tiny_model, plugins="metrics,logging", log_format="json", access_log_file=str(log)) as client:
        accepted, _ = predicted(chat(client, PROMPTS[0], prediction={"type": "content", "content": expected}))
        exposition = client.get("/metrics").text
    model_label = next(line for line in exposition.splitlines() if line.startswith("forgellm_model_generations_total"))
    label = model_label[model_label.index("{") : model_label.index("}")]
    counted = f'forgellm_model_accepted_draft_tokens_total{label},source="prediction"}} {float(accepted)}'
    assert counted in exposition
    entry = json.loads(log.read_text().splitlines()[0])
    assert entry["accepted_draft_tokens"] == accepted > 0


# -- the sampling rule, on the engine ----------------------------------------------------------------


def test_sampled_output_keeps_the_targets_distribution(tiny_model):
    """Two tokens sampled at temperature 1 from the top 3, with a prediction drafting the second: the joint
    frequencies match the model's own probabilities (a rule that accepted drafts too often would not)."""
    model = MlxModel("tiny", None, EngineTuning(prompt_cache_size=0), path=str(tiny_model))
    prompt = model.encode("Once upon a time")
    sampling = SamplingParams(temperature=1.0, top_k=3)
    probabilities = _top3_joint(model, prompt)
    first = max({a for a, _ in probabilities}, key=lambda a: sum(p for (x, _), p in probabilities.items() if x == a))
    second = max((b for a, b in probabilities if a == first), key=lambda b: probabilities[first, b])
    engine = model.create_engine(16)
    counts: Counter[tuple[bytes, ...]] = Counter()
    rounds, drafted = 100, 0
    for batch in range(rounds):
        tokens: dict[int, list[bytes]] = {}
        for row in range(16):
            seq_id = batch * 16 + row
            job = GenerationJob(list(prompt), 2, sampling, logprobs=0, prediction=[first, second, second])
            engine.add(seq_id, job)
            tokens[seq_id] = []
        while any(len(t) < 2 for t in tokens.values()):
            for output in engine.step():
                assert output.logprob is not None
                tokens[output.seq_id].append(output.logprob.token_bytes)
                drafted += sum(count.drafted for count in output.drafts)
        counts.update(tuple(t) for t in tokens.values())
    assert drafted > 0
    total = rounds * 16
    as_bytes = {
        (model.decoding.token_text(a)[1], model.decoding.token_text(b)[1]): p for (a, b), p in probabilities.items()
    }
    chi_square = sum((counts[cell] - total * p) ** 2 / (total * p) for cell, p in as_bytes.items())
    assert sum(counts[cell] for cell in as_bytes) == total
    assert chi_square < 40, (chi_square, counts, probabilities)  # 8 degrees of freedom: p < 1e-5 beyond 40


def _top3_joint(model: MlxModel, prompt: list[int]) -> dict[tuple[int, int], float]:
    def top3(tokens: list[int]) -> dict[int, float]:
        logits = model.model(mx.array([tokens]))[0, -1]
        best: list[int] = mx.argsort(-logits)[:3].tolist()  # type: ignore[assignment]
        weights = [math.exp(logits[token].item()) for token in best]
        return {token: weight / sum(weights) for token, weight in zip(best, weights, strict=True)}

    return {(a, b): pa * pb for a, pa in top3(prompt).items() for b, pb in top3([*prompt, a]).items()}


# -- a draft model -------------------------------------------------------------------------------------------


def test_a_draft_model_drafts_and_the_output_is_the_same(tiny_model, reference, tmp_path):
    """The tiny model drafting for itself: its greedy drafts are the target's tokens, so nearly all are
    accepted, and the answers are the ones without speculation."""
    log = tmp_path / "access.log"
    with test_client(tiny_model, draft_model=str(tiny_model), speculation="predictions", prompt_cache_size=0,
                     plugins="metrics,logging", log_format="json", access_log_file=str(log)) as client:  # fmt: skip
        answers = [chat(client, prompt) for prompt in PROMPTS]
        exposition = client.get("/metrics").text
    assert [text(answer) for answer in answers] == [text(reference[prompt]) for prompt in PROMPTS]
    accepted = [json.loads(line)["accepted_draft_tokens"] for line in log.read_text().splitlines() if "chat" in line]
    assert all(count > 0 for count in accepted), accepted
    assert 'source="draft_model"' in exposition


def test_a_draft_model_beside_rows_with_predictions_in_one_batch(tiny_model, reference):
    """The draft model drafting for some rows while others follow their (edited) predictions, in one batch:
    every answer is the target's own."""
    with serving(tiny_model, max_concurrency=8, prompt_cache_size=0, draft_model=str(tiny_model)) as live:

        def run(job: tuple[str, dict]) -> str:
            prompt, extra = job
            body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS, "temperature": 0}
            response = httpx.post(f"{live.url}{CHAT}", json={**body, **extra}, timeout=120)
            assert response.status_code == 200, response.text
            return text(response.json())

        jobs = [(prompt, {}) for prompt in PROMPTS]
        jobs += [
            (prompt, {"prediction": {"type": "content", "content": edited(text(reference[prompt]))}})
            for prompt in PROMPTS
        ]
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(run, jobs))
    assert results == [text(reference[prompt]) for prompt, _ in jobs]


def test_a_draft_model_with_another_tokenizer_is_a_clean_load_error(tiny_model, tmp_path):
    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_model, other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    with test_client(tiny_model, draft_model=str(other), wait_for_model=False) as client:
        status = wait_until_loaded(client)
        assert status["loaded"] is False
        assert "another tokenizer" in status["error"] and "\n" not in status["error"]
        response = client.post("/api/model/generate", json={"prompt": "Hi", "max_tokens": 2})
        assert response.json() == {"success": False, "error": "No model loaded"}


def test_penalties_and_logit_bias_apply_to_every_kept_token(speculating, reference, tiny_model):
    """Penalties see the tokens before each verified position, as they would one step at a time."""
    fields = {"presence_penalty": 0.8, "frequency_penalty": 0.5, "repetition_penalty": 1.3, "logit_bias": {"5": -100}}
    with test_client(tiny_model, speculation="off") as plain:
        without = text(chat(plain, PROMPTS[0], **fields))
    for prediction in (without, text(reference[PROMPTS[0]])):
        answer = chat(speculating, PROMPTS[0], prediction={"type": "content", "content": prediction}, **fields)
        assert text(answer) == without
    assert predicted(chat(speculating, PROMPTS[0], prediction={"type": "content", "content": without}, **fields))[0] > 0


# -- the built-in model ---------------------------------------------------------------------------------------

MODULE = """class Counter:
    def __init__(self):
        self.count = 0

    def increment(self):
        self.count += 1
        return self.count

    def reset(self):
        self.count = 0
"""
EDIT = "Rename the method increment to step in this class. Reply with the whole class.\n\n" + MODULE
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", EDIT]


@pytest.mark.real_model
def test_smollm2_greedy_output_is_the_same_with_speculation_on_and_off():
    """SmolLM2 quoting a module (prompt lookup drafts most of it) and answering questions, alone and as one batch
    with a prediction, a JSON answer and rows that do not speculate."""
    from forgellm.backends.mlx.sources.builtin_models import DEFAULT_MODEL

    def answers(client) -> list[str]:
        return [text(chat(client, **body, max_tokens=120)) for body in _bodies()]

    with test_client(DEFAULT_MODEL, speculation="off", prompt_cache_size=0) as plain:
        expected = answers(plain)
    with serving(DEFAULT_MODEL, max_concurrency=8, prompt_cache_size=0) as live:
        client = httpx.Client(base_url=live.url, timeout=300)
        assert answers(client) == expected
        with concurrent.futures.ThreadPoolExecutor(len(expected)) as pool:
            batched = list(pool.map(lambda body: text(chat(client, **body, max_tokens=120)), _bodies()))
    assert batched == expected


def _bodies() -> list[dict]:
    bodies = [{"messages": [{"role": "user", "content": q}]} for q in QUESTIONS]
    bodies.append({**bodies[2], "prediction": {"type": "content", "content": MODULE}})
    bodies.append({**bodies[0], "response_format": {"type": "json_object"}})
    return bodies


def test_the_console_charts_the_share_of_drafts_accepted(tiny_model, reference):
    expected = text(reference[PROMPTS[1]])
    with test_client(tiny_model, plugins="console", speculation="predictions") as client:
        accepted, rejected = predicted(chat(client, PROMPTS[1], prediction={"type": "content", "content": expected}))
        series = client.get("/console/api/state").json()["series"]
    shares = [point["draft_acceptance"] for point in series if point["draft_acceptance"] is not None]
    assert shares == [pytest.approx(accepted / (accepted + rejected))]
