"""The OpenAI-compatible API, driven by the official ``openai`` client as users drive it.

The client talks to the in-process server through Litestar's TestClient, which is an
httpx.Client, so every request goes through the real app, scheduler and MLX engine.
"""

from __future__ import annotations

import json

import openai
import pytest
from wire import sse_data

from forgellm.testing import test_client


@pytest.fixture(scope="module")
def oai(client):
    return openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="unused", http_client=client, max_retries=0)


@pytest.fixture(scope="module")
def model_id(oai):
    return oai.models.list().data[0].id


def test_model_list_names_the_loaded_model(oai, tiny_model):
    models = oai.models.list().data
    assert [m.id for m in models] == [str(tiny_model)]
    assert models[0].object == "model"


def test_chat_completion(oai, model_id):
    response = oai.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=6, temperature=0
    )
    choice = response.choices[0]
    assert response.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"  # the test model never emits EOS
    assert response.usage.completion_tokens == 6
    assert response.usage.total_tokens == response.usage.prompt_tokens + 6


def test_system_and_developer_messages_are_accepted(oai, model_id):
    response = oai.chat.completions.create(
        model=model_id,
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
        ],
        max_tokens=3,
    )
    assert response.usage.completion_tokens == 3


def test_streamed_chat_matches_the_plain_answer(oai, model_id):
    request = dict(
        model=model_id, messages=[{"role": "user", "content": "Once upon a time"}], max_tokens=12, temperature=0
    )
    plain = oai.chat.completions.create(**request).choices[0].message.content
    chunks = list(oai.chat.completions.create(**request, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain
    finish_reasons = [c.choices[0].finish_reason for c in chunks]
    assert finish_reasons[-1] == "length"
    assert finish_reasons[:-1] == [None] * (len(chunks) - 1)
    assert all(c.usage is None for c in chunks)


def test_stream_is_server_sent_events_ending_in_done(client):
    response = client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_data(response)
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"][0]["finish_reason"] == "length"
    assert all(json.loads(e)["choices"][0]["finish_reason"] is None for e in events[:-2])


def test_text_completion_plain_and_streamed(oai, model_id):
    plain = oai.completions.create(model=model_id, prompt="The town by the sea", max_tokens=10, temperature=0)
    assert plain.object == "text_completion"
    assert plain.choices[0].finish_reason == "length"
    assert plain.usage.completion_tokens == 10
    chunks = list(
        oai.completions.create(model=model_id, prompt="The town by the sea", max_tokens=10, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completion_without_max_tokens_uses_openai_default_of_16(oai, model_id):
    assert oai.completions.create(model=model_id, prompt="Hello").usage.completion_tokens == 16


def test_stream_options_include_usage_adds_a_usage_chunk(oai, model_id):
    request = dict(model=model_id, messages=[{"role": "user", "content": "Count"}], max_tokens=5)
    plain_usage = oai.chat.completions.create(**request).usage
    chunks = list(oai.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == 5
    assert usage_chunk.usage.prompt_tokens == plain_usage.prompt_tokens
    assert usage_chunk.usage.total_tokens == plain_usage.prompt_tokens + 5
    assert chunks[-2].choices[0].finish_reason == "length"


def test_usage_counts_the_prompt_tokens(oai, model_id, client):
    prompt = "Good software is tested."
    expected = len(client.app.state.server.default_model.model.encode(prompt))
    usage = oai.completions.create(model=model_id, prompt=prompt, max_tokens=2).usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (expected, 2, expected + 2)


def test_max_completion_tokens_limits_the_answer(oai, model_id):
    response = oai.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=4
    )
    assert response.usage.completion_tokens == 4
    response = oai.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=7)
    assert response.usage.completion_tokens == 7


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_ends_the_text_before_it(oai, model_id, stream):
    request = dict(model=model_id, prompt="Children ran along the beach", max_tokens=24, temperature=0)
    full = oai.completions.create(**request).choices[0].text
    stop = full[8:11]  # a string the greedy answer is known to contain
    expected = full[: full.index(stop)]
    if stream:
        chunks = list(oai.completions.create(**request, stop=[stop, "never appears"], stream=True))
        text = "".join(c.choices[0].text for c in chunks)
        finish_reason = chunks[-1].choices[0].finish_reason
    else:
        choice = oai.completions.create(**request, stop=stop).choices[0]
        text, finish_reason = choice.text, choice.finish_reason
    assert (text, finish_reason) == (expected, "stop")


def test_repeated_prompt_reuses_its_cached_prefix_and_gives_the_same_text(oai, model_id):
    request = dict(model=model_id, prompt="Every request has a prompt and a limit", max_tokens=8, temperature=0)
    first = oai.completions.create(**request)
    again = oai.completions.create(**request)
    # All but the last prompt token, which must run again to give the first logits; the first time,
    # at most what it shares with earlier tests' prompts (the BOS token).
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert first.usage.prompt_tokens_details.cached_tokens <= 1
    assert again.choices[0].text == first.choices[0].text


def test_next_turn_of_a_conversation_reuses_the_earlier_turns(oai, model_id):
    conversation = [{"role": "user", "content": "Tell me about the little town by the sea"}]
    first = oai.chat.completions.create(model=model_id, messages=conversation, max_tokens=6, temperature=0)
    conversation += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And in winter?"},
    ]
    second = oai.chat.completions.create(model=model_id, messages=conversation, max_tokens=6, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_cached_prefix_changes_no_text(oai, model_id, tiny_model):
    prompts = ["Good software is tested", "Good software is tested. Tests build small examples"]
    with_cache = [
        oai.completions.create(model=model_id, prompt=p, max_tokens=10, temperature=0).choices[0].text for p in prompts
    ]
    with test_client(tiny_model, prompt_cache_size=0) as uncached_client:
        uncached = openai.OpenAI(
            base_url=f"{uncached_client.base_url}/v1", api_key="unused", http_client=uncached_client, max_retries=0
        )
        responses = [
            uncached.completions.create(prompt=p, max_tokens=10, temperature=0, model=model_id) for p in prompts
        ]
    assert [r.usage.prompt_tokens_details.cached_tokens for r in responses] == [0, 0]
    assert [r.choices[0].text for r in responses] == with_cache


def test_seed_makes_sampling_reproducible(oai, model_id):
    request = dict(model=model_id, prompt="In winter the wind", max_tokens=12, temperature=1.0, seed=1234)
    assert oai.completions.create(**request).choices[0].text == oai.completions.create(**request).choices[0].text


def test_model_may_be_omitted(client):
    response = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 2


def test_more_choices_than_the_limit_is_a_bad_request(oai, model_id):
    with pytest.raises(openai.BadRequestError) as raised:
        oai.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}], n=17)
    assert raised.value.status_code == 400
    assert raised.value.type == "invalid_request_error"
    assert "n" in raised.value.message


def test_unknown_model_is_not_found(oai):
    with pytest.raises(openai.NotFoundError) as raised:
        oai.completions.create(model="no-such-model", prompt="hi")
    assert raised.value.code == "model_not_found"
    assert "no-such-model" in raised.value.message


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/chat/completions", {}, "messages"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": "hi"}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "role"),
        ("/v1/completions", {}, "prompt"),
        ("/v1/completions", {"prompt": ["one", 2]}, "prompt must be"),
        ("/v1/completions", {"prompt": "x", "max_tokenz": 5}, "max_tokenz"),  # a misspelt field is not ignored
        ("/v1/completions", {"prompt": "x", "temperature": 3}, "temperature"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 10**6}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": "10"}, "max_tokens"),  # no lenient coercion
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": "true"}, "stream"),
        ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ("/v1/completions", {"prompt": "x", "stop": ["s"] * 17}, "stop"),
    ],
)
def test_bad_input_is_a_400_in_openai_error_shape(client, path, body, message):
    response = client.post(path, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert message in error["message"]
    assert set(error) >= {"message", "type", "code"}


def test_malformed_json_is_a_400_in_openai_error_shape(client):
    response = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_openai_client_reads_our_error_message(oai, model_id):
    with pytest.raises(openai.BadRequestError) as raised:
        oai.completions.create(model=model_id, prompt="hi", max_tokens=10**6)
    assert "max_tokens must be at most" in raised.value.message
