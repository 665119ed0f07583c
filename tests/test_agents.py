"""Agents on a small local model (issue 21): tool calls that parse, sampling that fits the model, the names
clients see, and mlx_lm.server's request fields, through the clients agents use (openai, anthropic,
LangChain).
"""

from __future__ import annotations

import json
import shutil
import time

import anthropic
import httpx
import openai
import pydantic
import pytest
from langchain_openai import ChatOpenAI
from live_server import serving
from wire import sse

from forgellm.backends.mlx import ModelSources
from forgellm.backends.mlx.sources.builtin_models import DEFAULT_MODEL
from forgellm.testing import ServerProcess, test_client

# Two properties, and no additionalProperties: plain JSON Schema would let the model add keys of its own.
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 24}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER_PARAMETERS},
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"temperature": 0}


def oai_for(client) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="unused", http_client=client, max_retries=0)


# -- SmolLM2: forced calls that parse, through the openai client and LangChain ----------------------


@pytest.fixture(scope="module")
def smollm2():
    ModelSources().resolve(DEFAULT_MODEL, print)
    with test_client(DEFAULT_MODEL) as client:
        yield client


@pytest.mark.real_model
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_call_on_smollm2_parses_with_exactly_the_schemas_keys(smollm2, tool_choice):
    # Before: "required" answered raw JSON as content, the model inventing keys until max_tokens.
    oai = oai_for(smollm2)
    answer = oai.chat.completions.create(
        model=DEFAULT_MODEL, messages=ASK, tools=[WEATHER], tool_choice=tool_choice, max_tokens=80, **GREEDY
    )
    (choice,) = answer.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and all(call.function.name == "get_weather" for call in calls)
    for call in calls:
        assert set(json.loads(call.function.arguments)) == {"city", "unit"}

    stream = oai.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=ASK,
        tools=[WEATHER],
        tool_choice=tool_choice,
        max_tokens=80,
        stream=True,
        **GREEDY,
    )
    streamed: dict[int, dict[str, str]] = {}
    for chunk in stream:
        for delta in chunk.choices[0].delta.tool_calls or ():
            call = streamed.setdefault(delta.index, {"name": "", "arguments": ""})
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        (call["name"], call["arguments"]) for _, call in sorted(streamed.items())
    ]


class Weather(pydantic.BaseModel):
    """The weather in a city."""

    city: str = pydantic.Field(max_length=24)
    unit: str = pydantic.Field(pattern="^(celsius|fahrenheit)$")


@pytest.mark.real_model
@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_langchain_structured_output_on_smollm2_returns_the_object(smollm2, method):
    # Before: with function_calling, an empty content and no tool call.
    chat = ChatOpenAI(
        model=DEFAULT_MODEL,
        base_url=f"{smollm2.base_url}/v1",
        api_key="unused",
        http_client=smollm2,
        temperature=0,
        max_tokens=80,
        max_retries=0,
    )
    weather = chat.with_structured_output(Weather, method=method).invoke("What is the weather in Paris?")
    assert isinstance(weather, Weather)


# -- a forced call cut at max_tokens is a call in every dialect ------------------------------------


@pytest.fixture(scope="module")
def dialects(tiny_model):
    """On a socket: the anthropic SDK takes no httpx client."""
    with serving([f"tiny={tiny_model}"], plugins="anthropic,responses") as live:
        yield live


def oai_at(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def claude_at(live) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=live.url, api_key="unused", max_retries=0)


# Tokens: the call's opening, {"name":"get_weather","arguments":, is 25 with the tiny model's tokenizer, so its
# arguments have begun; they cannot end in time (a city, then a unit).
CUT = 30


def test_a_forced_call_cut_short_is_a_tool_call_in_openais_shape(dialects):
    oai = oai_at(dialects)
    choice = {"type": "function", "function": {"name": "get_weather"}}
    answer = oai.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], tool_choice=choice, max_tokens=CUT, **GREEDY
    )
    (cut,) = answer.choices
    assert cut.finish_reason == "length" and not cut.message.content
    (call,) = cut.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments.startswith('{"')
    # Cut inside the call's name: still the call, the one tool that name can be, with no arguments yet.
    early = oai.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], tool_choice=choice, max_tokens=4, **GREEDY
    )
    assert early.choices[0].finish_reason == "length"
    assert [(c.function.name, c.function.arguments) for c in early.choices[0].message.tool_calls] == [
        ("get_weather", "")
    ]

    stream = oai.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=CUT, stream=True, **GREEDY
    )
    chunks = list(stream)
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert not "".join(delta.content or "" for delta in deltas)
    assert [call.function.name for d in deltas for call in d.tool_calls or () if call.function.name]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_forced_call_cut_short_is_a_function_call_item_in_an_incomplete_response(dialects):
    oai = oai_at(dialects)
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMETERS}
    answer = oai.responses.create(
        input="Weather in Paris?", tools=[tool], tool_choice="required", max_output_tokens=CUT, **GREEDY
    )
    assert answer.status == "incomplete" and answer.incomplete_details.reason == "max_output_tokens"
    assert [item.type for item in answer.output] == ["function_call"]
    assert answer.output[0].name == "get_weather"


def test_a_forced_call_cut_short_is_a_tool_use_block_with_stop_reason_max_tokens(dialects):
    claude = claude_at(dialects)
    tool = {"name": "get_weather", "description": "The weather", "input_schema": WEATHER_PARAMETERS}
    message = claude.messages.create(
        model="tiny",
        max_tokens=CUT,
        tools=[tool],
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=ASK,
        extra_body=GREEDY,
    )
    assert message.stop_reason == "max_tokens"
    assert [block.type for block in message.content] == ["tool_use"]
    assert message.content[0].name == "get_weather" and isinstance(message.content[0].input, dict)
    streamed = sse(
        httpx.post(
            f"{dialects.url}/v1/messages",
            json={
                "model": "tiny",
                "max_tokens": CUT,
                "tools": [tool],
                "tool_choice": {"type": "any"},
                "messages": ASK,
                "stream": True,
                **GREEDY,
            },
            timeout=60,
        )
    )
    starts = [event["content_block"]["type"] for event in streamed if event["type"] == "content_block_start"]
    assert starts == ["tool_use"]
    assert [e["delta"]["stop_reason"] for e in streamed if e["type"] == "message_delta"] == ["max_tokens"]


# -- sampling defaults in layers -------------------------------------------------------------------


@pytest.fixture()
def model_with_config(tiny_model, tmp_path):
    def make(config: dict) -> str:
        copy = tmp_path / f"tiny-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny_model, copy)
        (copy / "generation_config.json").write_text(json.dumps(config))
        return str(copy)

    return make


def _anthropic_text(live, **extra) -> str:
    body = {"model": "tiny", "max_tokens": 30, "messages": ASK, **extra}
    answer = httpx.post(f"{live.url}/v1/messages", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["content"][0]["text"]


def _greedy_chat_text(live) -> str:
    body = {"model": "tiny", "messages": ASK, "max_tokens": 30, "temperature": 0}
    answer = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=60)
    return answer.json()["choices"][0]["message"]["content"]


def test_the_models_generation_config_fills_what_a_request_leaves_out(model_with_config):
    with serving([f"tiny={model_with_config({'temperature': 0.0})}"], plugins="anthropic") as live:
        # The anthropic SDK 2.x sends no temperature at all: Anthropic's default would be 1.0.
        message = claude_at(live).messages.create(model="tiny", max_tokens=30, messages=ASK)
        assert message.content[0].text == _greedy_chat_text(live)
        # A request's own value still wins.
        sampled = {_anthropic_text(live, temperature=1.0) for _ in range(3)}
        assert sampled != {_greedy_chat_text(live)}
        listing = httpx.get(f"{live.url}/api/models").json()["models"][0]
        assert listing["sampling_defaults"] == {"temperature": 0.0}


def test_the_operators_defaults_win_over_the_models_own(model_with_config):
    path = model_with_config({"temperature": 1.5, "top_k": 40})
    with serving([f"tiny={path}"], plugins="anthropic", model_sampling=("tiny:temperature=0",)) as live:
        assert _anthropic_text(live) == _greedy_chat_text(live)
        listing = httpx.get(f"{live.url}/api/models").json()["models"][0]
        assert listing["sampling_defaults"] == {"temperature": 0.0, "top_k": 40}


def test_per_model_defaults_come_from_the_config_file_too(model_with_config, tmp_path):
    path = model_with_config({"temperature": 1.5})
    config = tmp_path / "forgellm.toml"
    config.write_text("[models.tiny]\ntemperature = 0\n")
    with ServerProcess(["--config", str(config), "--model", f"tiny={path}", "--plugins", "anthropic"]) as server:
        listing = httpx.get(f"{server.url}/api/models").json()["models"][0]
        assert listing["sampling_defaults"] == {"temperature": 0.0}
    bad = tmp_path / "bad.toml"
    bad.write_text('[models.tiny]\ntemperature = "hot"\n')
    with pytest.raises(RuntimeError, match=r"\[models.tiny\]: temperature must be a number"):
        with ServerProcess(["--config", str(bad), "--model", f"tiny={path}"]):
            pass


# -- the names clients see --------------------------------------------------------------------------


def test_models_are_listed_and_answered_under_their_served_names(tiny_model, tiny_model_without_template):
    with test_client([f"alpha={tiny_model}", f"beta={tiny_model_without_template}"]) as client:
        oai = oai_for(client)
        for _ in range(100):
            if len(oai.models.list().data) == 2:
                break
            time.sleep(0.05)
        assert [card.id for card in oai.models.list().data] == ["alpha", "beta"]
        assert oai.models.retrieve("beta").id == "beta"
        with pytest.raises(openai.NotFoundError):
            oai.models.retrieve("gamma")
        for name in ("alpha", "beta"):
            answer = oai.chat.completions.create(model=name, messages=ASK, max_tokens=3)
            assert answer.model == name


# -- mlx_lm.server's request fields ---------------------------------------------------------------


def test_mlx_lm_servers_own_request_shape_is_served(client):
    # mlx-lm's HTTP test suite sends this body; repetition_context_size was a 400 here.
    body = {
        "model": "default_model",
        "prompt": "Once upon a time",
        "max_tokens": 10,
        "temperature": 0.5,
        "top_p": 0.9,
        "repetition_penalty": 1.1,
        "repetition_context_size": 20,
        "seed": 999,
        "stop": "stop sequence",
    }
    first = client.post("/v1/completions", json=body)
    assert first.status_code == 200, first.text
    assert first.json()["choices"][0]["text"] == client.post("/v1/completions", json=body).json()["choices"][0]["text"]


def test_mlx_lm_servers_penalty_windows_and_xtc_change_the_output(client):
    base = {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "repetition_penalty": 3.0}

    def text(**fields) -> str:
        answer = client.post("/v1/completions", json={**base, **fields})
        assert answer.status_code == 200, answer.text
        return answer.json()["choices"][0]["text"]

    assert text(repetition_context_size=1) != text(repetition_context_size=64)
    windowed = {"repetition_penalty": None, "presence_penalty": 2.0}
    assert text(**windowed, presence_context_size=1) != text(**windowed, presence_context_size=64)
    seeded = {"temperature": 1.0, "seed": 7, "repetition_penalty": None}
    assert text(**seeded, xtc_probability=1.0, xtc_threshold=0.01) != text(**seeded)
    assert text(**seeded, xtc_probability=1.0, xtc_threshold=0.01) == text(
        **seeded, xtc_probability=1.0, xtc_threshold=0.01
    )


@pytest.mark.parametrize(
    ("fields", "named"),
    [({"draft_model": "other"}, "draft_model"), ({"adapters": "/a"}, "adapters"), ({"role_mapping": {}}, "role")],
)
def test_mlx_lm_servers_fields_this_server_cannot_honour_are_refused_saying_why(client, fields, named):
    answer = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, **fields})
    assert answer.status_code == 400 and named in answer.json()["error"]["message"]
    assert client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "num_draft_tokens": 3}).is_success
