"""Structured outputs: constrained decoding makes every finished output valid, whatever the weights.

The tiny model's weights are random, so nothing but the grammar's token mask makes its output JSON:
each check here fails if the mask is not applied, or applied to the wrong sequence of a batch.
"""

from __future__ import annotations

import concurrent.futures
import json
import string
from decimal import Decimal
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wire import ndjson

MAX_TOKENS = 300


@pytest.fixture(scope="module")
def oai(client):
    return openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="unused", http_client=client, max_retries=0)


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def ask(oai, schema: dict, prompt: str = "Answer in JSON", **fields):
    return oai.chat.completions.create(
        model=None,  # type: ignore[arg-type]  # whichever model serves
        messages=[{"role": "user", "content": prompt}],
        response_format=json_schema_format(schema),
        max_tokens=MAX_TOKENS,
        **fields,
    ).choices[0]


def _multiple_of(validator, step, instance, schema):
    # jsonschema divides floats, so it finds 0.57 not a multiple of 0.01; the grammar (rightly) allows it.
    if validator.is_type(instance, "number") and Decimal(str(instance)) % Decimal(str(step)) != 0:
        yield jsonschema.ValidationError(f"{instance} is not a multiple of {step}")


ExactValidator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"multipleOf": _multiple_of})


def validate(instance, schema: dict) -> None:
    ExactValidator(schema).validate(instance)


def assert_finished_and_valid(choice, schema: dict) -> None:
    """The schemas generated here bound every value (string lengths, item counts, a number's digits), so under the
    grammar the model must finish well within MAX_TOKENS, with a valid value."""
    assert choice.finish_reason == "stop", choice.message.content
    validate(json.loads(choice.message.content), schema)


# -- schemas as users write them ------------------------------------------------------------------

NAMES = st.text(string.ascii_lowercase, min_size=1, max_size=6)
PATTERNS = ["^[a-z]{1,6}$", "^[A-Z][a-z]{0,4}$", "^[0-9]{3}-[0-9]{2}$", "^(yes|no|maybe)$"]


@st.composite
def bounded_numbers(draw, kind: str) -> dict:
    low = draw(st.integers(-1000, 1000))
    schema = {"type": kind, "minimum": low, "maximum": low + draw(st.integers(0, 1000))}
    # Without a step, a number's fraction may go on for ever: random weights never choose to end it.
    return schema if kind == "integer" else {**schema, "multipleOf": draw(st.sampled_from([0.5, 0.25, 0.01]))}


LEAVES = st.one_of(
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 8)),
    st.sampled_from(PATTERNS).map(lambda p: {"type": "string", "pattern": p}),
    bounded_numbers("integer"),
    bounded_numbers("number"),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(NAMES, min_size=1, max_size=4, unique=True).map(lambda values: {"enum": values}),
)


@st.composite
def objects(draw, children) -> dict:
    properties = draw(st.dictionaries(NAMES, children, min_size=1, max_size=4))
    required = draw(st.lists(st.sampled_from(sorted(properties)), unique=True))
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def arrays(children):
    return st.builds(
        lambda items, least, extra: {"type": "array", "items": items, "minItems": least, "maxItems": least + extra},
        children,
        st.integers(0, 2),
        st.integers(0, 2),
    )


SCHEMAS = objects(st.recursive(LEAVES, lambda children: st.one_of(arrays(children), objects(children)), max_leaves=6))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=SCHEMAS, temperature=st.sampled_from([0.0, 1.0]))
def test_every_finished_output_validates_against_its_schema(oai, schema, temperature):
    choice = ask(oai, schema, temperature=temperature)
    assert_finished_and_valid(choice, schema)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schemas=st.lists(SCHEMAS, min_size=3, max_size=3))
def test_constrained_and_free_requests_share_a_batch(oai, client, schemas):
    """Each sequence of a batch gets its own mask: the constrained ones valid, the free ones untouched."""

    def free(number: int) -> str:
        response = oai.completions.create(model=None, prompt=f"Story {number}", max_tokens=40, temperature=0)  # type: ignore[arg-type]
        return response.choices[0].text

    alone = [free(number) for number in range(3)]
    steps_before = client.app.state.server.default_model.scheduler.steps
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        constrained = [pool.submit(ask, oai, schema, f"JSON {n}", temperature=1.0) for n, schema in enumerate(schemas)]
        unconstrained = [pool.submit(free, number) for number in range(3)]
        for future, schema in zip(constrained, schemas, strict=True):
            assert_finished_and_valid(future.result(), schema)
        assert [future.result() for future in unconstrained] == alone
    assert client.app.state.server.default_model.scheduler.steps - steps_before < 3 * MAX_TOKENS  # they ran batched


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    kind: Literal["cat", "dog", "fish"]
    age: int = pydantic.Field(ge=0, le=30)
    vaccinated: bool


def test_openai_parse_fills_a_pydantic_model(oai):
    completion = oai.chat.completions.parse(
        model=None,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "Describe a pet"}],
        response_format=Pet,
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Pet)
    assert choice.message.parsed.kind in ("cat", "dog", "fish")
    assert 0 <= choice.message.parsed.age <= 30


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_mode_answers_a_json_object(oai, temperature):
    choice = oai.chat.completions.create(
        model=None,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "Answer in JSON"}],
        response_format={"type": "json_object"},
        max_tokens=MAX_TOKENS,
        temperature=temperature,
        seed=3,
    ).choices[0]
    assert choice.finish_reason in ("stop", "length")
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.message.content.startswith("{")


def test_streamed_structured_output_joins_to_the_plain_one(oai):
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 10},
            "rank": {"type": "integer", "minimum": 1, "maximum": 9},
        },
        "required": ["city", "rank"],
        "additionalProperties": False,
    }
    request = dict(
        model=None,
        messages=[{"role": "user", "content": "A city"}],
        response_format=json_schema_format(schema),
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    plain = oai.chat.completions.create(**request).choices[0]
    chunks = list(oai.chat.completions.create(**request, stream=True))
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == plain.message.content
    assert chunks[-1].choices[0].finish_reason == plain.finish_reason == "stop"
    validate(json.loads(streamed), schema)


def test_a_cut_off_object_is_reported_as_length(oai):
    schema = {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 5}
    choice = oai.chat.completions.create(
        model=None,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "List"}],
        response_format=json_schema_format(schema),
        max_tokens=4,
    ).choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content.startswith("[")


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        ({"type": "strnig"}, "strnig"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
        ({"type": "integer", "minimum": 5, "maximum": 1}, "JSON schema"),
    ],
)
def test_a_schema_that_cannot_be_compiled_is_a_400_naming_the_problem(oai, client, schema, problem):
    with pytest.raises(openai.BadRequestError) as raised:
        ask(oai, schema)
    assert "JSON schema" in raised.value.message
    assert problem in raised.value.message
    assert client.get("/api/model/status").json()["loaded"]  # the server goes on serving


def test_json_schema_format_needs_its_schema(client):
    response = client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "a"}},
        },
    )
    assert response.status_code == 400
    assert "json_schema.schema" in response.json()["error"]["message"]


# -- the guide's generate ----------------------------------------------------------------------------

GUIDE_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "confidence": {"type": "integer", "minimum": 0, "maximum": 100}},
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}


def test_guide_generate_takes_a_json_schema(client):
    response = client.post(
        "/api/model/generate", json={"prompt": "Is it raining?", "json_schema": GUIDE_SCHEMA, "max_tokens": 100}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["finish_reason"] == "stop"
    validate(json.loads(body["text"]), GUIDE_SCHEMA)


def test_guide_generate_streams_a_json_schema_answer(client):
    response = client.post(
        "/api/model/generate",
        json={"prompt": "Is it raining?", "json_schema": GUIDE_SCHEMA, "max_tokens": 100, "streaming": True},
    )
    lines = ndjson(response)
    text = "".join(line["text"] for line in lines if line["type"] == "chunk")
    assert lines[-1]["type"] == "complete"
    assert lines[-1]["text"] == text
    validate(json.loads(text), GUIDE_SCHEMA)


def test_guide_generate_refuses_a_bad_schema_in_its_envelope(client):
    response = client.post("/api/model/generate", json={"prompt": "x", "json_schema": {"type": "strnig"}})
    assert response.status_code == 400
    assert response.json()["success"] is False
    assert "JSON schema" in response.json()["error"]
