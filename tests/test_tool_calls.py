"""Tool calls through the official ``openai`` client: each tool_choice, streamed calls, a conversation's history.

On the random-weight model only a forced call (``required`` or a named function) can be relied on: it
is generated under the call's JSON grammar, so it is a valid call whatever the weights. Free choice
(``auto``) is tested on the real model (test_real_model.py) and the parsing of free text in
test_assistant_turn.py.
"""

from __future__ import annotations

import importlib
import json

import jsonschema
import openai
import pytest
from wire import sse_data

from forgellm.testing import build_tiny_model, test_client

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}/[A-Z][a-z]{1,8}$"}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]


@pytest.fixture(scope="module")
def oai(client):
    return openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="unused", http_client=client, max_retries=0)


def create(oai, **fields):
    return oai.chat.completions.create(model=None, messages=ASK, **{"max_tokens": 200, **fields})  # type: ignore[arg-type]


def assert_valid_calls(message) -> None:
    assert message.tool_calls
    for call in message.tool_calls:
        assert call.type == "function"
        assert call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])
    assert len({call.id for call in message.tool_calls}) == len(message.tool_calls)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_named_function_is_called_with_valid_arguments(oai, temperature):
    choice = create(
        oai, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}}, temperature=temperature
    ).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert [call.function.name for call in choice.message.tool_calls] == ["get_time"]
    assert_valid_calls(choice.message)


def test_required_without_parallel_calls_makes_exactly_one_call(oai):
    choice = create(oai, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=1.0).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls) == 1
    assert_valid_calls(choice.message)


@pytest.mark.parametrize("seed", range(3))
def test_required_makes_one_or_more_valid_calls(oai, seed):
    choice = create(oai, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert_valid_calls(choice.message)


def test_tool_choice_none_answers_in_text(oai):
    choice = create(oai, tools=TOOLS, tool_choice="none", max_tokens=8).choices[0]
    assert choice.message.tool_calls is None
    assert choice.message.content
    assert choice.finish_reason == "length"


def test_tools_are_described_to_a_model_whose_template_does_not_render_them(oai):
    plain = create(oai, max_tokens=1).usage.prompt_tokens
    assert create(oai, tools=TOOLS, max_tokens=1).usage.prompt_tokens > plain
    assert create(oai, tools=TOOLS, tool_choice="none", max_tokens=1).usage.prompt_tokens == plain


def test_the_client_reassembles_a_streamed_call_into_the_plain_one(oai):
    request = dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0)
    plain = create(oai, **request).choices[0].message.tool_calls[0]
    with oai.chat.completions.stream(model=None, messages=ASK, max_tokens=200, **request) as stream:  # type: ignore[arg-type]
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    (streamed,) = final.message.tool_calls
    assert (streamed.function.name, streamed.function.arguments) == (plain.function.name, plain.function.arguments)
    assert json.loads(streamed.function.arguments) == json.loads(plain.function.arguments)


def test_streamed_calls_follow_openais_delta_shape(client):
    body = {"messages": ASK, "tools": TOOLS, "tool_choice": "required", "temperature": 1.0, "seed": 7, "stream": True}
    events = sse_data(client.post("/v1/chat/completions", json=body))
    assert events[-1] == "[DONE]"
    deltas = [json.loads(data)["choices"][0] for data in events[:-1]]
    calls = [call for delta in deltas for call in delta["delta"].get("tool_calls", [])]
    openings = [call for call in calls if "id" in call]
    assert openings, "no call was streamed"
    for number, opening in enumerate(openings):
        # The first delta of a call carries its index, id, type and name; the rest only argument fragments.
        assert opening["index"] == number
        assert opening["type"] == "function"
        assert opening["function"]["name"] in PARAMETERS
        fragments = [call for call in calls if call["index"] == number and "id" not in call]
        assert all(set(fragment) == {"index", "function"} for fragment in fragments)
        assert all(set(fragment["function"]) == {"arguments"} for fragment in fragments)
        arguments = opening["function"].get("arguments", "") + "".join(f["function"]["arguments"] for f in fragments)
        jsonschema.validate(json.loads(arguments), PARAMETERS[opening["function"]["name"]])
    assert deltas[-1]["finish_reason"] == "tool_calls"


# A template that renders tools, an assistant's calls (arguments as an object) and tool results, as the templates
# of tool-using models do; and enable_thinking, as Qwen3's does.
TOOL_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>\nTools:{% for tool in tools %} {{ tool.function.name }}{% endfor %}</s>\n{% endif %}"
    "{% for message in messages %}<|{{ message.role }}|>\n"
    "{% if message.tool_calls %}{% for call in message.tool_calls %}"
    "call {{ call.function.name }}({{ call.function.arguments.city }}) as {{ call.id }}"
    "{% endfor %}{% else %}{{ message.content }}{% endif %}"
    "{% if message.tool_call_id %} for {{ message.tool_call_id }}{% endif %}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% if enable_thinking %}Let me think.{% endif %}{% endif %}"
)
HISTORY = [
    *ASK,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
]
RENDERED_HISTORY = (
    "<s><|system|>\nTools: get_weather get_time</s>\n"
    "<|user|>\nWhat's the weather in Paris?</s>\n"
    "<|assistant|>\ncall get_weather(Paris) as call_1</s>\n"
    "<|tool|>\n18 degrees and sunny for call_1</s>\n"
    "<|assistant|>\n"
)


@pytest.fixture(scope="module")
def tool_template_client(tmp_path_factory):
    with test_client(build_tiny_model(tmp_path_factory.mktemp("models") / "tools", chat_template=TOOL_TEMPLATE)) as c:
        yield c


def prompt_tokens_of(client, **body) -> int:
    response = client.post("/v1/chat/completions", json={"max_tokens": 1, **body})
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens"]


def test_a_tool_call_history_renders_through_the_template(tool_template_client):
    tokenizer = tool_template_client.app.state.server.default_model.model.tokenizer
    expected = len(tokenizer.encode(RENDERED_HISTORY, add_special_tokens=False))
    assert prompt_tokens_of(tool_template_client, messages=HISTORY, tools=TOOLS) == expected


def test_chat_template_kwargs_reach_the_template(tool_template_client):
    plain = prompt_tokens_of(tool_template_client, messages=ASK)
    thinking = prompt_tokens_of(tool_template_client, messages=ASK, chat_template_kwargs={"enable_thinking": True})
    assert thinking > plain


def test_the_openai_client_sends_a_history_it_received(oai):
    """A call the server made goes back in the next request as the client builds it."""
    first = create(oai, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=0).choices[0]
    call = first.message.tool_calls[0]
    messages = [
        *ASK,
        first.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18C"},
    ]
    answer = oai.chat.completions.create(model=None, messages=messages, tools=TOOLS, max_tokens=4)  # type: ignore[arg-type]
    assert answer.usage.completion_tokens == 4


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}
                ]
            },
            "image_url part; only text content",
        ),
        ({"messages": ASK, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
        ({"messages": ASK, "tool_choice": "required"}, "needs tools"),
        (
            {"messages": ASK, "tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "cannot both apply",
        ),
        (
            {
                "messages": [
                    *HISTORY[:1],
                    {
                        **HISTORY[1],
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": "{not json"},
                            }
                        ],
                    },
                ]
            },
            "arguments are not JSON",
        ),  # fmt: skip
        ({"messages": ASK, "tools": [{"type": "function", "function": {"name": "has spaces"}}]}, "name"),
        ({"messages": ASK, "functions": [WEATHER["function"]]}, "functions is not supported"),
    ],
)
def test_bad_tool_requests_are_400s_naming_the_problem(client, body, message):
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]


def test_tool_parser_option_overrides_the_one_the_template_implies(tiny_model):
    qwen3_coder = importlib.import_module("mlx_lm.tool_parsers.qwen3_coder")
    with test_client(tiny_model, tool_parser="qwen3_coder") as overridden:
        output_format = overridden.app.state.server.default_model.model.output_format
    assert output_format.parse_tool_call is qwen3_coder.parse_tool_call
    assert output_format.tool_call == (qwen3_coder.tool_call_start, qwen3_coder.tool_call_end)
