"""The ollama plugin (issue 26) through Ollama's own client (PyPI ``ollama``): chat, streamed chat, generate,
format, tools, embed, list, show, ps, pull, keep_alive, and errors in Ollama's shape, on SmolLM2-135M-Instruct
and all-MiniLM-L6-v2.
"""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import ollama
import pytest
from live_server import serving, wait_for

from forgellm import AssistantTurn, OutputFormat, TurnSplitter
from forgellm.backends.mlx import ModelSources
from forgellm.plugins.ollama.generation import keep_alive_seconds, tool_calls
from forgellm.plugins.ollama.protocol import Reply

CHAT_MODEL = "smollm2-135m-instruct"
EMBEDDER = "all-minilm-l6-v2"
GREEDY = {"temperature": 0, "num_predict": 24}
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def client():
    for name in (CHAT_MODEL, EMBEDDER):
        ModelSources().resolve(name, print)
    with serving([CHAT_MODEL], plugins="ollama", allow_model=(EMBEDDER, CHAT_MODEL)) as live:
        yield ollama.Client(host=live.url)


@pytest.mark.real_model
def test_chat_answers_with_ollamas_statistics(client):
    answer = client.chat(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], options=GREEDY
    )
    assert "Paris" in answer.message.content and answer.message.role == "assistant"
    assert answer.done and answer.done_reason in ("stop", "length")
    assert answer.prompt_eval_count > 5 and 0 < answer.eval_count <= 24
    assert answer.total_duration >= answer.eval_duration > 0


@pytest.mark.real_model
def test_streamed_chat_is_the_whole_answer_in_pieces(client):
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat(model=CHAT_MODEL, messages=ask, options=GREEDY).message.content
    parts = list(client.chat(model=CHAT_MODEL, messages=ask, options=GREEDY, stream=True))
    assert len(parts) > 3 and all(not part.done for part in parts[:-1]) and parts[-1].done
    assert "".join(part.message.content for part in parts) == whole
    assert parts[-1].eval_count >= len(parts) - 1  # a line per step that adds text; the end token adds none


@pytest.mark.real_model
def test_generate_continues_a_raw_prompt_and_answers_a_templated_one(client):
    raw = client.generate(model=CHAT_MODEL, prompt="The capital of France is", raw=True, options=GREEDY)
    assert raw.done and raw.response
    templated = client.generate(model=CHAT_MODEL, prompt="What is the capital of France?", options=GREEDY)
    assert "Paris" in templated.response
    streamed = list(
        client.generate(model=CHAT_MODEL, prompt="What is the capital of France?", options=GREEDY, stream=True)
    )
    assert "".join(part.response for part in streamed) == templated.response


@pytest.mark.real_model
@pytest.mark.parametrize("format_", [PERSON, "json"])
def test_format_constrains_the_answer_to_json(client, format_):
    answer = client.chat(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Describe Ann, who is 30, as JSON with name and age."}],
        format=format_,
        options={"temperature": 0, "num_predict": 60},
    )
    value = json.loads(answer.message.content)
    assert isinstance(value, dict)
    if format_ is PERSON:
        assert set(value) == {"name", "age"} and isinstance(value["age"], int)


@pytest.mark.real_model
def test_tools_and_a_tool_call_history_reach_the_template(client):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    plain = client.chat(model=CHAT_MODEL, messages=ask, options=GREEDY)
    with_tools = client.chat(model=CHAT_MODEL, messages=ask, tools=[WEATHER], options=GREEDY)
    assert with_tools.prompt_eval_count > plain.prompt_eval_count + 20  # the tool is described in the prompt
    history = [
        *ask,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "rainy, 12 degrees", "tool_name": "get_weather"},
    ]
    answered = client.chat(model=CHAT_MODEL, messages=history, tools=[WEATHER], options=GREEDY)
    assert answered.done and answered.prompt_eval_count > with_tools.prompt_eval_count


def test_a_models_tool_call_is_sent_as_ollamas_tool_calls():
    # SmolLM2 calls tools only when forced, which Ollama's API cannot ask; its marked call, as the model
    # writes it, is read by the pipeline's splitter and sent in the shape the ollama client decodes.
    splitter = TurnSplitter(OutputFormat(tool_call=("<tool_call>", "</tool_call>")), tools=[WEATHER])
    turn = AssistantTurn()
    turn.add(splitter.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'))
    turn.add(splitter.finish())
    wire = json.loads(json.dumps({"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": c.function.name, "arguments": c.function.arguments}} for c in tool_calls(turn) or ()
    ]}))  # fmt: skip
    message = ollama.Message(**wire)
    assert Reply("assistant", "", None, tool_calls(turn)).tool_calls is not None
    (call,) = message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}


@pytest.mark.real_model
def test_embed_gives_the_openai_routes_vectors(client):
    sentences = ["The cat sits on the mat.", "A feline is resting on a rug.", "Stock markets fell sharply."]
    answer = client.embed(model=EMBEDDER, input=sentences)
    assert len(answer.embeddings) == 3 and len(answer.embeddings[0]) == 384
    vectors = np.array(answer.embeddings)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3
    assert answer.prompt_eval_count > 10
    # Ollama cuts an input past the model's window by default; truncate=False refuses it.
    assert len(client.embed(model=EMBEDDER, input="word " * 300).embeddings) == 1
    with pytest.raises(ollama.ResponseError) as refused:
        client.embed(model=EMBEDDER, input="word " * 300, truncate=False)
    assert refused.value.status_code == 400 and "256" in refused.value.error


@pytest.mark.real_model
def test_list_show_ps_version_and_pull(client):
    client.embed(model=EMBEDDER, input="loaded on demand")
    listed = {model.model for model in client.list().models}
    assert {CHAT_MODEL, EMBEDDER} <= listed
    running = {model.model: model for model in client.ps().models}
    assert running[CHAT_MODEL].expires_at.year == 9999  # the operator's model: pinned
    assert running[EMBEDDER].size > 80_000_000
    shown = client.show(CHAT_MODEL)
    assert "completion" in shown.capabilities and shown.modelinfo["general.context_length"] == 8192
    assert client.show(EMBEDDER).capabilities == ["embedding"]
    assert httpx.get(f"{client._client.base_url}/api/version").json()["version"]
    assert client.pull(EMBEDDER).status == "success"
    statuses = [status.status for status in client.pull(CHAT_MODEL, stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"


@pytest.mark.real_model
def test_keep_alive_zero_unloads_the_model_after_the_request(client):
    client.embed(model=EMBEDDER, input="once", keep_alive=0)
    wait_for(lambda: EMBEDDER not in {m.model for m in client.ps().models}, "the model to unload", timeout=10)
    # A request with no prompt only loads; keep_alive 0 with it unloads at once.
    assert client.generate(model=EMBEDDER).done_reason == "load"
    assert EMBEDDER in {m.model for m in client.ps().models}
    assert client.generate(model=EMBEDDER, keep_alive="0s").done_reason == "unload"
    assert EMBEDDER not in {m.model for m in client.ps().models}
    # The operator's model stays, whatever a request asks.
    client.chat(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], options=GREEDY, keep_alive=0)
    time.sleep(1.5)
    assert CHAT_MODEL in {m.model for m in client.ps().models}


@pytest.mark.real_model
@pytest.mark.parametrize(
    ("call", "status", "message"),
    [
        (lambda c: c.chat(model="nope", messages=[{"role": "user", "content": "hi"}]), 404, "is not loaded"),
        (
            lambda c: c.chat(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], options={"mirostat": 2}),
            400,
            "mirostat",
        ),
        (
            lambda c: c.chat(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], options={"colour": 1}),
            400,
            "colour",
        ),
        (lambda c: c.generate(model=CHAT_MODEL, prompt="hi", context=[1, 2]), 400, "context"),
        (lambda c: c.embed(model=CHAT_MODEL, input="hi"), 400, "not an embedding model"),
        (lambda c: c.chat(model=EMBEDDER, messages=[{"role": "user", "content": "hi"}]), 400, "embedding model"),
        (
            lambda c: c.chat(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], keep_alive="soon"),
            400,
            "keep_alive",
        ),
        (lambda c: c.pull("llama3.2"), 404, "not a built-in model"),
    ],
)
def test_errors_are_in_ollamas_shape(client, call, status, message):
    with pytest.raises(ollama.ResponseError) as raised:
        call(client)
    assert raised.value.status_code == status and message in raised.value.error


def test_keep_alive_durations():
    assert keep_alive_seconds("5m") == 300 and keep_alive_seconds("1h30m") == 5400
    assert keep_alive_seconds(-1) == -1 and keep_alive_seconds("0") == 0 and keep_alive_seconds(None) is None
