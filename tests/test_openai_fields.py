"""No request field is silently dropped: each of OpenAI's fields does what docs/openai-fields.md says.

The fields come from the ``openai`` SDK's own request types, so a field OpenAI adds shows up here
as a failure until the table (and the server) say what happens to it.
"""

from __future__ import annotations

import pathlib
import re
import typing

import pytest
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params

FIELDS_DOC = pathlib.Path(__file__).parent.parent / "docs" / "openai-fields.md"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}

# A value for each field: for honoured and ignored fields one the server takes, for refused ones one it refuses.
SAMPLES = {
    "messages": [{"role": "user", "content": "Hi"}],
    "prompt": "Hi",
    "model": None,  # filled in with the served model's name
    "max_tokens": 2,
    "max_completion_tokens": 2,
    "temperature": 0.5,
    "top_p": 0.9,
    "seed": 1,
    "stop": ["\n\n"],
    "n": 2,
    "stream": True,
    "stream_options": {"include_usage": True},
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
    "logit_bias": {"7": 1.5},
    "logprobs": True,
    "top_logprobs": 2,
    "response_format": {"type": "json_object"},
    "tools": [TOOL],
    "tool_choice": "auto",
    "parallel_tool_calls": False,
    "modalities": ["text"],
    "user": "someone",
    "metadata": {"team": "a"},
    "store": True,
    "service_tier": "auto",
    "prompt_cache_key": "k",
    "prompt_cache_options": {"mode": "explicit"},
    "prompt_cache_retention": "24h",
    "safety_identifier": "s",
    "reasoning_effort": "low",
    "verbosity": "low",
    "audio": {"voice": "alloy", "format": "mp3"},
    "prediction": {"type": "content", "content": "x"},
    "web_search_options": {},
    "moderation": {"input": {"mode": "block"}},
    "functions": [TOOL["function"]],
    "function_call": "auto",
    "echo": True,
    "best_of": 2,
    "suffix": "end",
}
COMPLETION_SAMPLES = {"logprobs": 2}  # completions' logprobs is a count
# Fields that mean something only beside another.
COMPANIONS = {
    "stream_options": {"stream": True},
    "top_logprobs": {"logprobs": True},
    "tool_choice": {"tools": [TOOL]},
    "parallel_tool_calls": {"tools": [TOOL]},
}


def documented(section: str) -> dict[str, str]:
    """The table under a heading of the doc: field -> honoured, ignored or refused."""
    text = FIELDS_DOC.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `(\w+)` \| (honoured|ignored|refused) \|", body, re.MULTILINE))


def sdk_fields(params) -> set[str]:
    return set(typing.get_type_hints(params.CompletionCreateParamsBase)) | {"stream"}


ENDPOINTS = [
    (CHAT, "Chat completions", sdk_fields(chat_create_params)),
    (COMPLETIONS, "Completions", sdk_fields(completion_create_params)),
]


@pytest.mark.parametrize(("path", "section", "fields"), ENDPOINTS)
def test_the_table_lists_every_field_of_openais_request(path, section, fields):
    assert set(documented(section)) == fields


CASES = [
    (path, field, handling)
    for path, section, _ in ENDPOINTS
    for field, handling in sorted(documented(section).items())
    if field not in ("messages", "prompt")
]


@pytest.mark.parametrize(("path", "field", "handling"), CASES)
def test_each_field_is_honoured_ignored_or_refused_as_documented(client, path, field, handling):
    body = {"messages": SAMPLES["messages"]} if path == CHAT else {"prompt": SAMPLES["prompt"]}
    body["max_tokens"] = 2
    value = COMPLETION_SAMPLES.get(field, SAMPLES[field]) if path == COMPLETIONS else SAMPLES[field]
    if field == "model":
        value = client.get("/v1/models").json()["data"][0]["id"]
    body.update(COMPANIONS.get(field, {}))
    body[field] = value
    response = client.post(path, json=body)
    if handling == "refused":
        assert response.status_code == 400, response.text
        assert field in response.json()["error"]["message"]
    else:
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("field", ["max_tokenz", "temprature", "tool_choise", "response_fromat"])
def test_a_misspelt_field_is_a_400_naming_it(client, path, field):
    body = {"messages": SAMPLES["messages"]} if path == CHAT else {"prompt": "Hi"}
    response = client.post(path, json={**body, field: 1})
    assert response.status_code == 400
    assert field in response.json()["error"]["message"]


def test_modalities_other_than_text_are_refused(client):
    response = client.post(CHAT, json={"messages": SAMPLES["messages"], "modalities": ["text", "audio"]})
    assert response.status_code == 400
    assert "modalities" in response.json()["error"]["message"]


def test_honoured_and_ignored_fields_differ_in_effect(client):
    """An ignored field changes nothing; an honoured one is seen (here: logprobs appear, n gives choices)."""
    base = {"prompt": "Hi", "max_tokens": 3, "temperature": 0}
    plain = client.post(COMPLETIONS, json=base).json()
    ignored = client.post(COMPLETIONS, json={**base, "user": "u"}).json()
    assert ignored["choices"][0]["text"] == plain["choices"][0]["text"]
    honoured = client.post(COMPLETIONS, json={**base, "logprobs": 1, "n": 2}).json()
    assert len(honoured["choices"]) == 2
    assert all(len(choice["logprobs"]["tokens"]) == 3 for choice in honoured["choices"])
