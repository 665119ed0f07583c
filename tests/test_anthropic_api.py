"""The ``anthropic`` plugin through the official ``anthropic`` client: Anthropic's Messages API at /v1/messages.

The client speaks over a real socket (it brings its own HTTP stack), to the app served by uvicorn in
this process. Every generation is greedy, so /v1/messages and /v1/chat/completions must give the same
text for the same conversation: that shows system prompts, tool_use and tool_result blocks reach the
model as the chat template renders them. The random-weight model never ends a turn itself, so a plain
answer stops at max_tokens; a forced call completes under its grammar.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import pytest
from faulty_backend import ROW_FAULT, ROW_FAULT_MESSAGE, Faults
from live_server import idle, serving, wait_for
from wire import sse

from forgellm.testing import test_client

CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER = {"name": "get_weather", "description": "The weather now", "input_schema": CITY_SCHEMA}
GREEDY = {"temperature": 0}  # sent as extra_body: the anthropic SDK 2.x has no temperature argument


@pytest.fixture(scope="module")
def live(tiny_model):
    with serving(tiny_model, plugins="anthropic") as server:
        yield server


@pytest.fixture(scope="module")
def claude(live):
    return anthropic.Anthropic(base_url=live.url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model_name(live):
    return httpx.get(f"{live.url}/v1/models").json()["data"][0]["id"]


def chat(live, messages, max_tokens, **fields) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, **GREEDY, **fields}
    response = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def prompt_tokens(message) -> int:
    """The whole prompt: Anthropic counts the tokens read from the prompt cache apart from input_tokens."""
    return message.usage.input_tokens + message.usage.cache_read_input_tokens


def test_a_message_answers_as_chat_completions_does(claude, live, model_name):
    message = claude.messages.create(
        model=model_name,
        max_tokens=8,
        system="Answer briefly",
        messages=[{"role": "user", "content": "Hello there"}],
        extra_body=GREEDY,
    )
    same = chat(live, [{"role": "system", "content": "Answer briefly"}, {"role": "user", "content": "Hello there"}], 8)
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.model == model_name
    [block] = message.content
    assert block.type == "text" and block.text == same["choices"][0]["message"]["content"]
    assert message.stop_reason == "max_tokens" and message.stop_sequence is None
    assert prompt_tokens(message) == same["usage"]["prompt_tokens"] and message.usage.output_tokens == 8


def test_system_blocks_and_text_blocks(claude, live, model_name):
    message = claude.messages.create(
        model=model_name,
        max_tokens=6,
        system=[{"type": "text", "text": "Be terse", "cache_control": {"type": "ephemeral"}}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {
                "role": "assistant",
                "content": [{"type": "thinking", "thinking": "hm", "signature": ""}, {"type": "text", "text": "Hello"}],
            },
            {"role": "user", "content": "And now?"},
        ],
        extra_body=GREEDY,
    )
    messages = [
        {"role": "system", "content": "Be terse"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "And now?"},
    ]
    same = chat(live, messages, 6)
    assert message.content[0].text == same["choices"][0]["message"]["content"]
    assert prompt_tokens(message) == same["usage"]["prompt_tokens"]


def test_a_stream_sends_anthropics_events_in_order(claude, model_name):
    plain = claude.messages.create(
        model=model_name, max_tokens=7, messages=[{"role": "user", "content": "Tell me"}], extra_body=GREEDY
    )
    with claude.messages.stream(
        model=model_name, max_tokens=7, messages=[{"role": "user", "content": "Tell me"}], extra_body=GREEDY
    ) as stream:
        events = [event for event in stream if event.type not in ("text",)]  # "text" is the SDK's own helper event
        final = stream.get_final_message()
    kinds = [event.type for event in events]
    deltas = kinds.count("content_block_delta")
    assert kinds == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * deltas,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[0].message.usage.input_tokens == prompt_tokens(plain) == prompt_tokens(final)
    assert final.content[0].text == plain.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 7


def test_the_stream_opens_with_a_ping_after_message_start(live, model_name):
    body = {"model": model_name, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}], "stream": True}
    with httpx.stream("POST", f"{live.url}/v1/messages", json=body, timeout=60) as response:
        text = response.read().decode()
    names = [line[len("event: ") :] for line in text.splitlines() if line.startswith("event: ")]
    assert names[:2] == ["message_start", "ping"] and names[-1] == "message_stop"
    datas = [json.loads(line[len("data: ") :]) for line in text.splitlines() if line.startswith("data: ")]
    assert names == [data["type"] for data in datas]


def test_stop_sequences_end_the_message_and_are_named(claude, model_name):
    prompt = [{"role": "user", "content": "Say things"}]
    free = claude.messages.create(model=model_name, max_tokens=30, messages=prompt, extra_body=GREEDY).content[0].text
    stop = free.strip()[3:5]  # two characters from inside the free answer, so the stopped one ends before them
    stopped = claude.messages.create(
        model=model_name, max_tokens=30, messages=prompt, stop_sequences=[stop], extra_body=GREEDY
    )
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    assert free.startswith(stopped.content[0].text) and stop not in stopped.content[0].text


def test_tool_choice_any_is_a_tool_use_block(claude, model_name):
    message = claude.messages.create(
        model=model_name,
        max_tokens=60,
        tools=[WEATHER],
        tool_choice={"type": "any"},
        messages=[{"role": "user", "content": "Weather?"}],
        extra_body=GREEDY,  # sampled, a list of calls may now and then run past max_tokens
    )
    assert message.stop_reason == "tool_use"
    uses = [block for block in message.content if block.type == "tool_use"]
    assert uses and all(use.name == "get_weather" and use.id.startswith("toolu_") for use in uses)
    for use in uses:
        jsonschema.validate(use.input, CITY_SCHEMA)


def test_a_named_tool_streams_input_json_deltas(claude, model_name):
    with claude.messages.stream(
        model=model_name,
        max_tokens=60,
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "Weather?"}],
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    partial = "".join(
        event.delta.partial_json
        for event in events
        if event.type == "content_block_delta" and event.delta.type == "input_json_delta"
    )
    [use] = final.content
    assert use.type == "tool_use" and use.input == json.loads(partial)
    assert final.stop_reason == "tool_use"
    jsonschema.validate(use.input, CITY_SCHEMA)


def test_a_tool_result_round_trip(claude, live, model_name):
    question = {"role": "user", "content": "Weather in Paris?"}
    first = claude.messages.create(
        model=model_name,
        max_tokens=60,
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        messages=[question],
    )
    [use] = first.content
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "clear sky"}]}
    second = claude.messages.create(
        model=model_name,
        max_tokens=5,
        tools=[WEATHER],
        extra_body=GREEDY,
        messages=[question, {"role": "assistant", "content": first.content}, result],
    )
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": use.id, "type": "function", "function": {"name": use.name, "arguments": json.dumps(use.input)}}
            ],
        },
        {"role": "tool", "tool_call_id": use.id, "content": "clear sky"},
    ]
    tools = [
        {
            "type": "function",
            "function": {"name": "get_weather", "description": "The weather now", "parameters": CITY_SCHEMA},
        }
    ]
    same = chat(live, messages, 5, tools=tools)
    assert prompt_tokens(second) == same["usage"]["prompt_tokens"]
    assert second.content[0].text == same["choices"][0]["message"]["content"]


def test_count_tokens_is_what_a_message_would_use(claude, model_name):
    request = {
        "model": model_name,
        "system": "Be brief",
        "tools": [WEATHER],
        "messages": [{"role": "user", "content": "Weather in Rome?"}],
    }
    counted = claude.messages.count_tokens(**request)
    used = claude.messages.create(max_tokens=1, **request).usage
    assert counted.input_tokens == used.input_tokens + used.cache_read_input_tokens > 0


def test_tool_choice_none_leaves_the_tools_out(claude, model_name):
    ask = {"model": model_name, "max_tokens": 1, "messages": [{"role": "user", "content": "Weather?"}]}
    without = claude.messages.count_tokens(model=model_name, messages=ask["messages"])
    counted = claude.messages.count_tokens(
        model=model_name, messages=ask["messages"], tools=[WEATHER], tool_choice={"type": "none"}
    )
    assert counted.input_tokens == without.input_tokens


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"temperature": 1.5}, "temperature"),
        ({"messages": []}, "messages"),
        ({"tool_choice": {"type": "any"}}, "needs tools"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "x"}}]}]},
            "image block",
        ),
        ({"mcp_servers": [{"type": "url"}]}, "mcp_servers is not supported"),
        ({"max_tokenz": 3}, "max_tokenz"),
    ],
)
def test_bad_requests_are_400s_in_anthropics_error_shape(claude, model_name, fields, message):
    body = {"model": model_name, "max_tokens": 3, "messages": [{"role": "user", "content": "x"}], **fields}
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.post("/v1/messages", cast_to=object, body=body)
    assert caught.value.status_code == 400 and message in caught.value.message
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": caught.value.body["error"]["message"]},
    }


def test_max_tokens_is_required(live, model_name):
    response = httpx.post(
        f"{live.url}/v1/messages", json={"model": model_name, "messages": [{"role": "user", "content": "x"}]}
    )
    assert response.status_code == 400
    assert response.json()["type"] == "error" and "max_tokens" in response.json()["error"]["message"]


def test_an_unknown_model_is_a_404(claude):
    with pytest.raises(anthropic.NotFoundError) as caught:
        claude.messages.create(model="claude-opus-4", max_tokens=2, messages=[{"role": "user", "content": "x"}])
    assert caught.value.body["error"]["type"] == "not_found_error"


def test_auth_takes_anthropics_x_api_key(tiny_model):
    with serving(tiny_model, plugins="auth,anthropic", api_key=("the-key",)) as server:
        name = httpx.get(f"{server.url}/v1/models", headers={"x-api-key": "the-key"}).json()["data"][0]["id"]
        ask = {"model": name, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
        good = anthropic.Anthropic(base_url=server.url, api_key="the-key", max_retries=0)
        assert good.messages.create(**ask).usage.output_tokens == 2
        assert good.messages.count_tokens(model=name, messages=ask["messages"]).input_tokens > 0
        with pytest.raises(anthropic.AuthenticationError) as caught:
            anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(**ask)
        assert caught.value.body["error"]["type"] == "authentication_error"


def test_rate_limits_apply(tiny_model):
    with serving(tiny_model, plugins="ratelimit,anthropic", rate_limit="1/minute") as server:
        claude = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
        name = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
        ask = {"model": name, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
        claude.messages.create(**ask)
        with pytest.raises(anthropic.RateLimitError) as caught:
            claude.messages.create(**ask)
        assert caught.value.body["error"]["type"] == "rate_limit_error"


def test_a_client_that_leaves_a_stream_frees_its_slot(live, model_name):
    body = {"model": model_name, "max_tokens": 4000, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    with httpx.stream("POST", f"{live.url}/v1/messages", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if "content_block_delta" in line:
                break  # leave mid-stream
    wait_for(lambda: idle(live.scheduler), "the abandoned generation to leave the batch")


def test_a_failure_mid_stream_is_an_error_event(tiny_model):
    faults = Faults(step_fault=False)
    faults.row_fault.set()
    with test_client(tiny_model, plugins="anthropic", backend=faults.backend) as server:
        ask = [{"role": "user", "content": f"x {ROW_FAULT}"}]
        response = server.post("/v1/messages", json={"max_tokens": 4000, "stream": True, "messages": ask})
    last = sse(response)[-1]
    assert last["type"] == "error" and last["error"]["type"] == "api_error"
    assert ROW_FAULT_MESSAGE in last["error"]["message"]


def test_the_request_timeout_keeps_the_text_as_max_tokens(tiny_model):
    with test_client(tiny_model, plugins="anthropic", request_timeout=0.5) as server:
        ask = {"max_tokens": 4000, "messages": [{"role": "user", "content": "x"}]}
        whole = server.post("/v1/messages", json=ask).json()
        streamed = sse(server.post("/v1/messages", json={**ask, "stream": True}))
    assert whole["stop_reason"] == "max_tokens" and whole["content"][0]["text"]
    assert whole["usage"]["output_tokens"] > 0
    stops = [event["delta"]["stop_reason"] for event in streamed if event["type"] == "message_delta"]
    assert stops == ["max_tokens"] and streamed[-1]["type"] == "message_stop"


def test_responses_match_the_openapi_schema(tiny_model):
    # The in-process client checks every body and event against the server's own schema (conftest).
    with test_client(tiny_model, plugins="anthropic") as server:
        ask = {"max_tokens": 3, "messages": [{"role": "user", "content": "x"}]}
        assert server.post("/v1/messages", json=ask).status_code == 200
        assert server.post("/v1/messages", json={**ask, "stream": True}).status_code == 200
        tools = {"tools": [WEATHER], "tool_choice": {"type": "any"}, "max_tokens": 60}
        assert server.post("/v1/messages", json={**ask, **tools, "stream": True}).status_code == 200
        assert server.post("/v1/messages/count_tokens", json={"messages": ask["messages"]}).status_code == 200
        assert server.post("/v1/messages", json={"messages": []}).status_code == 400
