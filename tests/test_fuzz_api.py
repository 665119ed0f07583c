"""Arbitrary JSON at generate and load: never a 5xx, never a dropped connection, always the envelope."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from wire import ndjson

from forgellm.testing import test_client, wait_until_loaded
from forgellm.testing.tiny_model import VOCAB_SIZE

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


# MLX compiles top_p and min_p filtering anew for each distinct value (about half a second on a CPU),
# so valid values come from a small set; any float still reaches the validation.
filter_values = st.sampled_from([0.0, 0.05, 0.5, 0.9, 1.0])


def field(plausible: st.SearchStrategy) -> st.SearchStrategy:
    """A value for a known field: mostly near-valid, sometimes any JSON at all."""
    return plausible | json_values


message = st.fixed_dictionaries(
    {"role": field(st.sampled_from(["system", "user", "assistant", "tool"])), "content": field(st.text(max_size=30))}
)
generate_requests = st.fixed_dictionaries(
    {},
    optional={
        "prompt": field(st.text(max_size=60)),
        "max_tokens": field(st.integers(-2, 10)),
        "temperature": field(st.floats(-1, 3)),
        "top_p": field(filter_values | st.floats(-0.5, 0, exclude_max=True) | st.floats(1, 2, exclude_min=True)),
        "top_k": field(st.integers(-1, VOCAB_SIZE - 1)),
        "min_p": field(filter_values | st.floats(-0.5, 0, exclude_max=True) | st.floats(1, 2, exclude_min=True)),
        "repetition_penalty": field(st.floats(-1, 3)),
        "seed": field(st.integers(-1, 2**64)),
        "stop": field(st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=20)),
        "system_prompt": field(st.text(max_size=30)),
        "history": field(st.lists(message, max_size=4)),
        "streaming": field(st.booleans()),
    },
)
# Valid requests too, so the fuzzing reaches tokenizing, sampling and streaming, not only validation.
valid_generate_requests = st.fixed_dictionaries(
    {"prompt": st.text(max_size=60)},
    optional={
        "max_tokens": st.integers(1, 8),
        "temperature": st.floats(0, 3),
        "top_p": filter_values.filter(bool),
        "top_k": st.integers(0, VOCAB_SIZE - 1),
        "min_p": filter_values,
        "repetition_penalty": st.floats(0, 3, exclude_min=True),
        "seed": st.integers(0, 2**63 - 1),
        "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=16),
        "system_prompt": st.text(max_size=30),
        "history": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=30)}
            ),
            max_size=4,
        ),
        "streaming": st.booleans(),
    },
)
load_requests = st.fixed_dictionaries(
    {},
    optional={
        "model_name": field(st.text(max_size=40) | st.sampled_from([".", "/", "~", "owner/name", "a/b/c"])),
        "adapter_path": field(st.none() | st.text(max_size=20) | st.sampled_from([".", "/"])),
    },
)
bodies = json_values | generate_requests | valid_generate_requests | load_requests


def encode(body) -> bytes:
    # allow_nan: NaN and Infinity are not JSON, so the server must call them invalid JSON.
    return json.dumps(body, allow_nan=True).encode()


def top_k_beyond_vocabulary(body) -> bool:
    """The one known 5xx (see test_errors.py): skip it here, or it would break the shared server."""
    if not isinstance(body, dict) or "top_k" not in body:
        return False
    try:
        return float(body["top_k"]) >= VOCAB_SIZE  # lax decoding reads "600" and 600.0 as 600 too
    except (TypeError, ValueError, OverflowError):
        return False


def assert_answered_in_the_contract(response) -> None:
    event(f"HTTP {response.status_code}")  # --hypothesis-show-statistics shows how deep the examples got
    assert response.status_code < 500, response.text
    if response.status_code == 200 and response.headers["content-type"].startswith("application/x-ndjson"):
        lines = ndjson(response)
        assert lines[-1]["type"] == "complete", lines[-1]
        return
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body, dict)
    if response.status_code == 200:
        assert body["success"] is True
    else:
        assert body == {"success": False, "error": body["error"]}
        assert isinstance(body["error"], str) and body["error"]
        assert "Traceback" not in body["error"]


@pytest.fixture(scope="module")
def generate_server(tiny_model):
    """A small cap keeps every valid fuzzed generation short."""
    with test_client(tiny_model, max_tokens_cap=8, default_max_tokens=4, max_prompt_tokens=256) as c:
        yield c


@pytest.fixture(scope="module")
def load_server():
    """Its own server: fuzzed loads fail and must not disturb other tests' models."""
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE, "fuzzed repo ids must never reach the network"
    with test_client() as c:
        yield c
        wait_until_loaded(c)


@FUZZ
@given(body=bodies)
def test_generate_answers_any_json_within_the_contract(generate_server, body):
    assume(not top_k_beyond_vocabulary(body))
    response = generate_server.post(
        "/api/model/generate", content=encode(body), headers={"Content-Type": "application/json"}
    )
    assert_answered_in_the_contract(response)


@FUZZ
@given(body=bodies)
def test_load_answers_any_json_within_the_contract(load_server, body):
    response = load_server.post("/api/model/load", content=encode(body), headers={"Content-Type": "application/json"})
    assert_answered_in_the_contract(response)
    status = load_server.get("/api/model/status")
    assert status.status_code == 200
    assert status.json()["loaded"] is False  # nothing fuzzed is a real model


def test_generate_server_still_serves_after_fuzzing(generate_server):
    response = generate_server.post("/api/model/generate", json={"prompt": "Hello", "temperature": 0.7})
    assert response.status_code == 200
    assert response.json()["completion_tokens"] == 4
