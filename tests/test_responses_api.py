"""The ``responses`` plugin through the official ``openai`` client: OpenAI's Responses API at /v1/responses.

Every generation here is greedy, so the Responses route and /v1/chat/completions must give the same text
for the same conversation: that shows the input items, instructions and history reach the model as the
chat template renders them. The random-weight model never ends a turn itself, so a plain answer is
``incomplete`` (max_output_tokens) and only a forced call or a schema-constrained answer completes.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from faulty_backend import ROW_FAULT, ROW_FAULT_MESSAGE, Faults
from wire import sse

from forgellm.testing import test_client

CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather now", "parameters": CITY_SCHEMA}
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_model):
    with test_client(tiny_model, plugins="responses") as client:
        yield client


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", http_client=server, max_retries=0)


@pytest.fixture(scope="module")
def model_name(oai):
    return oai.models.list().data[0].id


def chat(server, messages, max_tokens, **fields) -> dict:
    response = server.post(
        "/v1/chat/completions", json={"messages": messages, "max_tokens": max_tokens, **GREEDY, **fields}
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_a_text_input_answers_as_chat_completions_does(oai, server):
    answer = oai.responses.create(input="Hello there", instructions="Answer briefly", max_output_tokens=8, **GREEDY)
    same = chat(
        server, [{"role": "system", "content": "Answer briefly"}, {"role": "user", "content": "Hello there"}], 8
    )
    assert answer.object == "response" and answer.id.startswith("resp_")
    assert answer.status == "incomplete" and answer.incomplete_details.reason == "max_output_tokens"
    [message] = answer.output
    assert message.type == "message" and message.role == "assistant"
    assert answer.output_text == same["choices"][0]["message"]["content"]
    assert answer.usage.input_tokens == same["usage"]["prompt_tokens"]
    assert answer.usage.output_tokens == 8 and answer.usage.total_tokens == answer.usage.input_tokens + 8


def test_message_items_with_parts_and_roles(oai, server):
    items = [
        {"role": "developer", "content": "Be terse"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello", "annotations": []}]},
        {"role": "user", "content": "And now?"},
    ]
    answer = oai.responses.create(input=items, max_output_tokens=6, **GREEDY)
    messages = [
        {"role": "system", "content": "Be terse"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "And now?"},
    ]
    same = chat(server, messages, 6)
    assert answer.output_text == same["choices"][0]["message"]["content"]
    assert answer.usage.input_tokens == same["usage"]["prompt_tokens"]


def test_a_stream_sends_the_typed_events_in_order(oai, model_name):
    plain = oai.responses.create(input="Tell me", max_output_tokens=7, **GREEDY)
    events = list(oai.responses.create(model=model_name, input="Tell me", max_output_tokens=7, stream=True, **GREEDY))
    kinds = [event.type for event in events]
    deltas = kinds.count("response.output_text.delta")
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == plain.output_text
    done = next(event for event in events if event.type == "response.output_text.done")
    assert done.text == text
    final = events[-1].response
    assert final.output_text == text and final.usage.output_tokens == 7 and final.status == "incomplete"


def test_a_required_call_is_a_function_call_item(oai):
    # Greedy: sampled at the default temperature, a list of calls may now and then run past max_output_tokens.
    answer = oai.responses.create(
        input="Weather?", tools=[WEATHER], tool_choice="required", max_output_tokens=60, **GREEDY
    )
    assert answer.status == "completed"
    calls = [item for item in answer.output if item.type == "function_call"]
    assert calls and all(call.name == "get_weather" and call.call_id.startswith("call_") for call in calls)
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), CITY_SCHEMA)


def test_a_named_call_streams_its_arguments(oai, model_name):
    choice = {"type": "function", "name": "get_weather"}
    with oai.responses.stream(
        model=model_name, input="Weather?", tools=[WEATHER], tool_choice=choice, max_output_tokens=60
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert kinds[2] == "response.output_item.added" and events[2].item.type == "function_call"
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    streamed = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    [call] = final.output
    assert call.type == "function_call" and call.arguments == streamed
    jsonschema.validate(json.loads(streamed), CITY_SCHEMA)


def test_a_function_call_output_round_trip(oai, server):
    first = oai.responses.create(
        input="Weather in Paris?",
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=60,
    )
    [call] = first.output
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "clear"}'}
    chained = oai.responses.create(
        previous_response_id=first.id, input=[result], tools=[WEATHER], max_output_tokens=5, **GREEDY
    )
    # The same conversation sent whole, the earlier output items as the client got them.
    whole = [{"role": "user", "content": "Weather in Paris?"}, *first.output, result]
    sent = oai.responses.create(input=whole, tools=[WEATHER], max_output_tokens=5, store=False, **GREEDY)
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": call.call_id, "content": '{"sky": "clear"}'},
    ]
    tools = [{"type": "function", "function": {k: WEATHER[k] for k in ("name", "description", "parameters")}}]
    same = chat(server, messages, 5, tools=tools)
    assert chained.usage.input_tokens == sent.usage.input_tokens == same["usage"]["prompt_tokens"]
    assert chained.output_text == sent.output_text == same["choices"][0]["message"]["content"]
    assert chained.previous_response_id == first.id


def test_text_format_json_schema(oai):
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    answer = oai.responses.create(
        input="Is it ok?",
        text={"format": {"type": "json_schema", "name": "verdict", "schema": schema, "strict": True}},
        max_output_tokens=40,
    )
    assert answer.status == "completed"
    jsonschema.validate(json.loads(answer.output_text), schema)


def test_logprobs_are_included_on_request(oai):
    answer = oai.responses.create(
        input="Hi", include=["message.output_text.logprobs"], top_logprobs=2, max_output_tokens=4, **GREEDY
    )
    logprobs = answer.output[0].content[0].logprobs
    assert len(logprobs) == 4 and "".join(entry.token for entry in logprobs) == answer.output_text
    assert all(len(entry.top_logprobs) == 2 and entry.logprob <= 0 for entry in logprobs)


def test_stored_responses_are_retrieved_deleted_and_bounded(tiny_model):
    with test_client(tiny_model, plugins="responses", responses_store_size=2) as server:
        oai = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", http_client=server, max_retries=0)
        first, second, third = (oai.responses.create(input=text, max_output_tokens=2) for text in "abc")
        assert oai.responses.retrieve(third.id).output_text == third.output_text
        with pytest.raises(openai.NotFoundError, match="previous_response_not_found|not found"):
            oai.responses.create(input="more", previous_response_id=first.id, max_output_tokens=2)  # evicted
        oai.responses.delete(second.id)
        with pytest.raises(openai.NotFoundError):
            oai.responses.retrieve(second.id)
        unstored = oai.responses.create(input="d", max_output_tokens=2, store=False)
        with pytest.raises(openai.NotFoundError):
            oai.responses.create(input="more", previous_response_id=unstored.id, max_output_tokens=2)


def test_an_identity_never_reads_anothers_responses(tiny_model):
    with test_client(tiny_model, plugins="auth,responses", api_key=("key-alice", "key-bob")) as server:
        alice, bob = (
            openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, http_client=server, max_retries=0)
            for key in ("key-alice", "key-bob")
        )
        answer = alice.responses.create(input="private", max_output_tokens=2)
        assert alice.responses.retrieve(answer.id).id == answer.id
        with pytest.raises(openai.NotFoundError):
            bob.responses.retrieve(answer.id)
        with pytest.raises(openai.NotFoundError):
            bob.responses.create(input="more", previous_response_id=answer.id, max_output_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(
                base_url=f"{server.base_url}/v1", api_key="wrong", http_client=server, max_retries=0
            ).responses.create(input="x", max_output_tokens=2)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"background": True}, "background is not supported"),
        ({"include": ["file_search_call.results"]}, "include"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input_image"),
        ({"tool_choice": "required"}, "tool_choice needs tools"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "needs a schema"),
        ({"max_output_tokenz": 5}, "max_output_tokenz"),
    ],
)
def test_bad_requests_are_400s_in_openais_error_shape(oai, fields, message):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.responses.create(input="x", extra_body=fields)
    assert caught.value.status_code == 400 and message in caught.value.message
    assert caught.value.body["type"] == "invalid_request_error"


def test_an_unknown_model_is_a_404(oai):
    with pytest.raises(openai.NotFoundError, match="is not loaded"):
        oai.responses.create(model="gpt-5", input="x", max_output_tokens=2)


def test_rate_limits_apply(tiny_model):
    with test_client(tiny_model, plugins="ratelimit,responses", rate_limit="1/minute") as server:
        oai = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", http_client=server, max_retries=0)
        oai.responses.create(input="x", max_output_tokens=2)
        with pytest.raises(openai.RateLimitError):
            oai.responses.create(input="x", max_output_tokens=2)


def test_a_failure_mid_stream_is_an_error_event_then_response_failed(tiny_model):
    faults = Faults(step_fault=False)
    faults.row_fault.set()
    with test_client(tiny_model, plugins="responses", backend=faults.backend) as server:
        body = {"input": f"x {ROW_FAULT}", "stream": True, "max_output_tokens": 4000}
        response = server.post("/v1/responses", json=body)
    events = sse(response)
    assert events[-2]["type"] == "error" and ROW_FAULT_MESSAGE in events[-2]["message"]
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"]["code"] == "generation_failed"


def test_the_request_timeout_keeps_the_text_as_an_incomplete_response(tiny_model):
    # --request-timeout ends a generation the tiny model would carry on for thousands of tokens.
    with test_client(tiny_model, plugins="responses", request_timeout=0.5) as server:
        whole = server.post("/v1/responses", json={"input": "x", "max_output_tokens": 4000}).json()
        events = sse(server.post("/v1/responses", json={"input": "x", "stream": True, "max_output_tokens": 4000}))
    assert whole["status"] == "incomplete" and whole["incomplete_details"] == {"reason": "timeout"}
    assert whole["output"][0]["content"][0]["text"]
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "timeout"}


def test_the_route_is_absent_without_the_plugin(client):
    response = client.post("/v1/responses", json={"input": "x"})
    assert response.status_code == 404
    assert isinstance(response.json()["error"], dict)  # OpenAI's shape: /v1 is the OpenAI prefix


def test_errors_before_routing_take_the_responses_shape(tiny_model):
    with test_client(tiny_model, plugins="responses", max_body_size=1024) as server:
        response = server.post(
            "/v1/responses", content=b'{"input": "' + b"x" * 2048 + b'"}', headers={"Content-Type": "application/json"}
        )
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_each_event_is_named_by_its_type(server):
    # The events as bytes: each named by its type, as OpenAI's streams are (Codex reads the name).
    with server.stream("POST", "/v1/responses", json={"input": "x", "stream": True, "max_output_tokens": 2}) as r:
        body = r.read().decode()
    names = [line[len("event: ") :] for line in body.splitlines() if line.startswith("event: ")]
    datas = [json.loads(line[len("data: ") :]) for line in body.splitlines() if line.startswith("data: ")]
    assert names == [data["type"] for data in datas] and names[-1] == "response.incomplete"


def test_responses_match_the_openapi_schema(server):
    # The in-process client checks every body and event against the server's own schema (conftest).
    ask = {"input": "x", "max_output_tokens": 3}
    answer = server.post("/v1/responses", json=ask)
    assert answer.status_code == 200
    assert server.post("/v1/responses", json={**ask, "stream": True}).status_code == 200
    forced = {"tools": [WEATHER], "tool_choice": "required", "max_output_tokens": 60, "stream": True}
    assert server.post("/v1/responses", json={**ask, **forced}).status_code == 200
    assert server.get(f"/v1/responses/{answer.json()['id']}").status_code == 200
    assert server.delete(f"/v1/responses/{answer.json()['id']}").status_code == 200
    assert server.post("/v1/responses", json={"input": 5}).status_code == 400


def test_a_client_that_leaves_a_stream_frees_its_slot(tiny_model):
    from live_server import idle, serving, wait_for

    with serving(tiny_model, plugins="responses") as live:
        body = {"input": "x", "stream": True, "max_output_tokens": 4000}
        with httpx.stream("POST", f"{live.url}/v1/responses", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if "response.output_text.delta" in line:
                    break  # leave mid-stream
        wait_for(lambda: idle(live.scheduler), "the abandoned generation to leave the batch")
