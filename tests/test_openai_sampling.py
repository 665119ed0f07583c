"""Logprobs and the sampling set, checked against a direct forward pass of the same model.

The reference here is the model itself, loaded by mlx-lm and run on the whole sequence at each step
without any of the server's machinery (batching, prompt cache, chunked prefill): the logprobs the
server reports, and the tokens it picks under penalties and logit_bias, must be what that pass gives.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable

import mlx.core as mx
import openai
import pytest
from mlx_lm import load as mlx_load
from wire import sse_data

from forgellm.testing import test_client

PROMPT = "Once upon a time"
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def oai(client):
    return openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="unused", http_client=client, max_retries=0)


@pytest.fixture(scope="module")
def direct(tiny_model):
    model, tokenizer = mlx_load(str(tiny_model))
    return model, tokenizer


Adjust = Callable[[mx.array, list[int]], mx.array]


def greedy_reference(direct, prompt: list[int], steps: int, adjust: Adjust | None = None, top: int = 5):
    """Each step's (token, its logprob, the top logprobs) under greedy decoding, from full forward passes."""
    model, _ = direct
    tokens, generated, steps_seen = list(prompt), [], []
    for _ in range(steps):
        logits = model(mx.array([tokens]))[0, -1].astype(mx.float32)
        if adjust is not None:
            logits = adjust(logits, generated)
        logprobs = logits - mx.logsumexp(logits)
        token = int(mx.argmax(logprobs).item())
        best = sorted(logprobs.tolist(), reverse=True)[:top]
        steps_seen.append((token, logprobs[token].item(), best))
        tokens.append(token)
        generated.append(token)
    return steps_seen


def texts(direct, steps) -> list[str]:
    _, tokenizer = direct
    return [tokenizer.decode([token]) for token, _, _ in steps]


def prompt_ids(direct) -> list[int]:
    return list(direct[1].encode(PROMPT))


def complete(oai, direct, **fields):
    return oai.completions.create(model=None, prompt=prompt_ids(direct), temperature=0, **fields)  # type: ignore[arg-type]


def test_completion_logprobs_are_the_models_own(oai, direct):
    reference = greedy_reference(direct, prompt_ids(direct), 6)
    choice = complete(oai, direct, max_tokens=6, logprobs=5).choices[0]
    logprobs = choice.logprobs
    assert logprobs.tokens == texts(direct, reference)
    assert "".join(logprobs.tokens) == choice.text  # a leading space included: the text continues the prompt
    for (_, value, best), sampled, top in zip(reference, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert sampled == pytest.approx(value, abs=TOLERANCE)
        assert sorted(top.values(), reverse=True) == pytest.approx(best, abs=TOLERANCE)
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(6)]


def test_chat_logprobs_in_openais_shape(oai, direct):
    choice = oai.chat.completions.create(
        model=None,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    ).choices[0]
    entries = choice.logprobs.content
    assert "".join(entry.token for entry in entries) == choice.message.content
    for entry in entries:
        assert bytes(entry.bytes).decode() == entry.token
        values = [alternative.logprob for alternative in entry.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        # Greedy: the sampled token is the most likely one, and its entry is the first alternative's.
        assert (entry.token, entry.logprob) == (entry.top_logprobs[0].token, pytest.approx(values[0]))
        assert all(v <= 0 for v in values) and math.fsum(math.exp(v) for v in values) <= 1 + 1e-6


def test_logprobs_without_alternatives(oai):
    choice = oai.chat.completions.create(
        model=None,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        logprobs=True,  # type: ignore[arg-type]
    ).choices[0]
    assert len(choice.logprobs.content) == 3
    assert all(entry.top_logprobs == [] for entry in choice.logprobs.content)


def test_streamed_logprobs_are_the_plain_ones(oai):
    request = dict(
        model=None,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    plain = oai.chat.completions.create(**request).choices[0].logprobs.content
    chunks = list(oai.chat.completions.create(**request, stream=True))
    streamed = [
        entry
        for chunk in chunks
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in plain]


def test_logit_bias_bans_and_forces_tokens(oai, direct):
    first = greedy_reference(direct, prompt_ids(direct), 1)[0][0]
    banned = complete(oai, direct, max_tokens=4, logit_bias={str(first): -100}, logprobs=0).choices[0]
    reference = greedy_reference(direct, prompt_ids(direct), 4, lambda logits, _: logits.at[first].add(-100))
    assert banned.logprobs.tokens == texts(direct, reference)
    assert first not in [token for token, _, _ in reference]

    chosen = direct[1].encode("x", add_special_tokens=False)[-1]
    forced = complete(oai, direct, max_tokens=5, logit_bias={str(chosen): 100}).choices[0].text
    assert forced == direct[1].decode([chosen] * 5)


@pytest.mark.parametrize(("presence", "frequency"), [(1.5, 0.0), (0.0, 1.2), (0.8, 0.6), (-1.0, 0.0)])
def test_presence_and_frequency_penalties_follow_openais_formula(oai, direct, presence, frequency):
    """logit -= presence * (token generated before) + frequency * (how often it was)."""

    def penalised(logits: mx.array, generated: list[int]) -> mx.array:
        for token, count in Counter(generated).items():
            logits = logits.at[token].add(-(presence + frequency * count))
        return logits

    reference = greedy_reference(direct, prompt_ids(direct), 12, penalised)
    choice = complete(
        oai, direct, max_tokens=12, presence_penalty=presence, frequency_penalty=frequency, logprobs=1
    ).choices[0]
    assert choice.logprobs.tokens == texts(direct, reference)
    assert choice.logprobs.token_logprobs == pytest.approx([value for _, value, _ in reference], abs=TOLERANCE)


def test_n_choices_are_decoded_together_each_with_its_index(oai, client):
    steps_before = client.app.state.server.default_model.scheduler.steps
    request = dict(
        model=None, messages=[{"role": "user", "content": PROMPT}], max_tokens=20, temperature=1.0, seed=5, n=4
    )
    response = oai.chat.completions.create(**request)
    assert client.app.state.server.default_model.scheduler.steps - steps_before < 2 * 20  # one batch, not four in a row
    assert [choice.index for choice in response.choices] == [0, 1, 2, 3]
    contents = [choice.message.content for choice in response.choices]
    assert len(set(contents)) > 1  # each choice samples for itself
    assert response.usage.completion_tokens == 4 * 20
    again = oai.chat.completions.create(**request)
    assert [choice.message.content for choice in again.choices] == contents  # and the seed makes them reproducible
    streamed: dict[int, str] = {}
    for chunk in oai.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert [streamed[index] for index in range(4)] == contents


def test_the_four_prompt_forms_of_completions(oai, direct):
    prompts = ["Once upon a time", "The town by the sea"]
    ids = [list(direct[1].encode(prompt)) for prompt in prompts]

    def texts_of(prompt):
        response = oai.completions.create(model=None, prompt=prompt, max_tokens=6, temperature=0)  # type: ignore[arg-type]
        assert [choice.index for choice in response.choices] == list(range(len(response.choices)))
        return [choice.text for choice in response.choices]

    alone = [texts_of(prompt)[0] for prompt in prompts]
    assert texts_of(prompts) == alone
    assert texts_of(ids[0]) == alone[:1]
    assert texts_of(ids) == alone


def test_echo_puts_the_prompt_before_the_completion(oai):
    plain = oai.completions.create(model=None, prompt=PROMPT, max_tokens=5, temperature=0).choices[0].text  # type: ignore[arg-type]
    echoed = oai.completions.create(model=None, prompt=PROMPT, max_tokens=5, temperature=0, echo=True)  # type: ignore[arg-type]
    assert echoed.choices[0].text == PROMPT + plain


def test_extensions_top_k_min_p_and_repetition_penalty_are_taken(client):
    body = {"prompt": PROMPT, "max_tokens": 4, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.3}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 4


def test_top_k_of_one_is_greedy(oai):
    greedy = oai.completions.create(model=None, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text  # type: ignore[arg-type]
    sampled = (
        oai.completions.create(
            model=None,
            prompt=PROMPT,
            max_tokens=8,
            temperature=1.5,
            extra_body={"top_k": 1},  # type: ignore[arg-type]
        )
        .choices[0]
        .text
    )
    assert sampled == greedy


def test_an_omitted_max_tokens_runs_until_the_cap(tiny_model):
    """OpenAI's chat has no default length: the SDKs omit max_tokens and mean "until the model stops"."""
    with test_client(tiny_model, max_tokens_cap=150) as capped:
        response = capped.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": PROMPT}]})
        assert response.json()["usage"]["completion_tokens"] == 150
        assert response.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs needs logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/completions", {"logprobs": 6}, "logprobs"),
        ("/v1/completions", {"logit_bias": {"abc": 1}}, "logit_bias keys are token ids"),
        ("/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
        ("/v1/completions", {"logit_bias": {"99999999": 1}}, "99999999"),
        ("/v1/completions", {"presence_penalty": 2.5}, "presence_penalty"),
        ("/v1/completions", {"prompt": [99999999]}, "99999999"),
        ("/v1/completions", {"prompt": ["a"] * 5, "n": 4}, "At most 16 choices"),
        ("/v1/completions", {"echo": True, "logprobs": 1}, "echo"),
        ("/v1/completions", {"best_of": 2}, "best_of"),
        ("/v1/completions", {"suffix": "end"}, "suffix"),
    ],
)
def test_bad_sampling_fields_are_400s_naming_them(client, path, body, message):
    if path.endswith("chat/completions"):
        body = {"messages": [{"role": "user", "content": "x"}], **body}
    else:
        body = {"prompt": "x", **body}
    response = client.post(path, json=body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_completion_streams_its_logprobs(client):
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 2, "stream": True}
    events = [json.loads(data) for data in sse_data(client.post("/v1/completions", json=body))[:-1]]
    tokens = [
        t for event in events for choice in event["choices"] if choice["logprobs"] for t in choice["logprobs"]["tokens"]
    ]
    plain = client.post("/v1/completions", json={**body, "stream": False}).json()["choices"][0]["logprobs"]["tokens"]
    assert tokens == plain


def test_an_answer_that_ends_has_logprobs_for_its_text_only(oai):
    """The end token closes the answer but is not part of it: no logprob entry for it."""
    choice = oai.chat.completions.create(
        model=None,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": PROMPT}],
        response_format={"type": "json_object"},
        max_tokens=50,
        temperature=0,
        logprobs=True,
    ).choices[0]
    assert choice.finish_reason == "stop"
    assert "".join(entry.token for entry in choice.logprobs.content) == choice.message.content
