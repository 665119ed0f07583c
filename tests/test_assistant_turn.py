"""Reading a model's text as an assistant's turn: content, reasoning and tool calls, however the text is chunked.

The splitter is fed text the way the engine streams it, so each case is fed whole and in every
split into pieces of a few characters: a marker cut across pieces must be recognised all the same.
"""

from __future__ import annotations

import importlib
import json

import pytest

from forgellm.backends.mlx import TOOL_PARSERS, parse_json_tool_call
from forgellm.core.api.assistant_turn import AssistantTurn, TurnSplitter, forced_call_schema
from forgellm.core.engine.backend import OutputFormat

THINKING = OutputFormat(
    think=("<think>", "</think>"), tool_call=("<tool_call>", "</tool_call>"), parse_tool_call=parse_json_tool_call
)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def split(text: str, output_format: OutputFormat = THINKING, piece: int = 0, **options) -> AssistantTurn:
    splitter = TurnSplitter(output_format, **options)
    turn = AssistantTurn()
    pieces = [text] if not piece else [text[i : i + piece] for i in range(0, len(text), piece)]
    for part in pieces:
        turn.add(splitter.feed(part))
    turn.add(splitter.finish())
    return turn


PIECES = [0, 1, 2, 3, 5]


@pytest.mark.parametrize("piece", PIECES)
def test_thinking_goes_to_reasoning(piece):
    turn = split("<think>Paris is in France.</think>The capital is Paris.", piece=piece)
    assert (turn.reasoning, turn.content, turn.tool_calls) == ("Paris is in France.", "The capital is Paris.", [])


@pytest.mark.parametrize("piece", PIECES)
def test_a_prompt_that_opened_thinking_starts_the_answer_as_reasoning(piece):
    turn = split("Let me see.</think>Paris.", piece=piece, in_reasoning=True)
    assert (turn.reasoning, turn.content) == ("Let me see.", "Paris.")


@pytest.mark.parametrize("piece", PIECES)
def test_a_tool_call_is_parsed_and_the_text_around_it_kept(piece):
    text = 'Checking.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    turn = split(text, piece=piece, tools=TOOLS)
    assert turn.content == "Checking."
    assert [(call.name, json.loads(call.arguments)) for call in turn.tool_calls] == [("get_weather", {"city": "Paris"})]


@pytest.mark.parametrize("piece", PIECES)
def test_parallel_calls_get_their_own_ids(piece):
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "%s"}}</tool_call>'
    turn = split(call % "Paris" + "\n" + call % "Rome", piece=piece, tools=TOOLS)
    assert [json.loads(c.arguments)["city"] for c in turn.tool_calls] == ["Paris", "Rome"]
    assert len({c.id for c in turn.tool_calls}) == 2


def test_without_tools_call_markers_are_plain_text():
    text = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    assert split(text).content == text


def test_a_call_that_does_not_parse_is_the_models_own_words():
    assert split("<tool_call>not json</tool_call>", tools=TOOLS).content == "not json"


def test_a_call_cut_off_by_the_end_of_the_text_is_still_read():
    turn = split('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}', tools=TOOLS)
    assert [call.name for call in turn.tool_calls] == ["get_weather"]


def test_text_that_only_looks_like_the_start_of_a_marker_is_released():
    assert split("a < b and <thin ice", piece=1).content == "a < b and <thin ice"


@pytest.mark.parametrize("piece", PIECES)
def test_a_forced_call_streams_its_name_then_its_arguments(piece):
    text = '{"name":"get_weather","arguments":{"city":"Paris","days":[1,2]}}'
    turn = split(text, piece=piece, tools=TOOLS, forced=True)
    assert [(c.name, json.loads(c.arguments)) for c in turn.tool_calls] == [
        ("get_weather", {"city": "Paris", "days": [1, 2]})
    ]


def test_forced_parallel_calls_are_a_list():
    text = '[{"name":"get_weather","arguments":{"city":"Paris"}},{"name":"get_weather","arguments":{"city":"Rome"}}]'
    turn = split(text, tools=TOOLS, forced=True)
    assert [json.loads(c.arguments)["city"] for c in turn.tool_calls] == ["Paris", "Rome"]


def test_forced_call_schema_names_the_function():
    schema = forced_call_schema(TOOLS, "get_weather", parallel=True)
    assert schema["properties"]["name"] == {"const": "get_weather"}
    assert schema["required"] == ["name", "arguments"]
    assert forced_call_schema(TOOLS, None, parallel=True)["type"] == "array"


@pytest.mark.parametrize(
    ("parser", "text", "expected"),
    [
        ("json_tools", '{"name": "get_weather", "arguments": {"city": "Paris"}}', {"city": "Paris"}),
        (
            "qwen3_coder",
            "<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>",
            {"city": "Paris"},
        ),
    ],
)
def test_mlx_lm_parsers_read_their_families_calls(parser, text, expected):
    assert parser in TOOL_PARSERS
    module = importlib.import_module(f"mlx_lm.tool_parsers.{parser}")
    output_format = OutputFormat(
        tool_call=(module.tool_call_start, module.tool_call_end), parse_tool_call=module.parse_tool_call
    )
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
    turn = split(f"{module.tool_call_start}{text}{module.tool_call_end}", output_format, piece=4, tools=tools)
    assert [(c.name, json.loads(c.arguments)) for c in turn.tool_calls] == [("get_weather", expected)]
