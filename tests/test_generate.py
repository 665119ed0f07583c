"""Generation parameters over HTTP: sampling, seeds, stop strings, limits and chat templates.

The tiny model never emits EOS, so a generation runs to max_tokens unless a stop string ends it.
"""

from __future__ import annotations

import pytest
from mlx_lm import load as mlx_load
from wire import ndjson

from forgellm.testing import test_client

PROMPT = "Once upon a time"


def generate(client, **fields) -> dict:
    response = client.post("/api/model/generate", json={"prompt": PROMPT, "max_tokens": 24, **fields})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["success"] is True
    return result


def stream(client, **fields) -> tuple[list[str], dict]:
    """(chunk texts, the complete line) of a streaming generation."""
    response = client.post(
        "/api/model/generate", json={"prompt": PROMPT, "max_tokens": 24, **fields, "streaming": True}
    )
    assert response.status_code == 200, response.text
    *chunks, complete = ndjson(response)
    assert all(chunk["type"] == "chunk" for chunk in chunks)
    assert complete["type"] == "complete"
    return [chunk["text"] for chunk in chunks], complete


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    """The tiny model's tokenizer as mlx-lm loads it: the reference for prompt token counts."""
    return mlx_load(str(tiny_model))[1]


# -- sampling ----------------------------------------------------------------------------------


def test_temperature_zero_is_deterministic(client):
    first = generate(client, temperature=0)
    again = generate(client, temperature=0)

    assert first["text"] == again["text"]
    assert first["completion_tokens"] == again["completion_tokens"] == 24


def test_a_seed_makes_sampling_reproducible(client):
    first = generate(client, temperature=1.0, seed=1234)
    again = generate(client, temperature=1.0, seed=1234)

    assert first["text"] == again["text"]


def test_different_seeds_sample_different_text(client):
    texts = {generate(client, temperature=1.5, seed=seed)["text"] for seed in (1, 2, 3)}

    assert len(texts) > 1


def test_seeded_sampling_is_reproducible_when_streamed(client):
    chunks, complete = stream(client, temperature=1.0, seed=99)

    assert "".join(chunks) == complete["text"] == generate(client, temperature=1.0, seed=99)["text"]


def test_sampling_filters_with_a_seed_are_reproducible(client):
    fields = {"temperature": 0.8, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.3, "seed": 5}
    first = generate(client, **fields)
    again = generate(client, **fields)

    assert first["completion_tokens"] == 24
    assert again["text"] == first["text"]


def test_repetition_penalty_changes_greedy_output(client):
    plain = generate(client, temperature=0, max_tokens=60)["text"]
    penalized = generate(client, temperature=0, max_tokens=60, repetition_penalty=5.0)["text"]

    assert penalized != plain


# -- limits and stops ------------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [1, 7, 40])
def test_max_tokens_ends_with_length(client, max_tokens):
    result = generate(client, temperature=0, max_tokens=max_tokens)

    assert result["completion_tokens"] == max_tokens
    assert result["finish_reason"] == "length"
    assert result["total_tokens"] == result["prompt_tokens"] + max_tokens


@pytest.fixture(scope="module")
def greedy_text(client) -> str:
    text = generate(client, temperature=0, max_tokens=40)["text"]
    assert len(text) > 20, "the tiny model should write enough text to cut"
    return text


def stop_in(text: str) -> tuple[str, str]:
    """A stop string taken from the middle of text, and the text that should come back."""
    stop = text[12:15]
    return stop, text[: text.index(stop)]


def test_stop_string_truncates_and_finishes_with_stop(client, greedy_text):
    stop, expected = stop_in(greedy_text)

    result = generate(client, temperature=0, max_tokens=40, stop=stop)

    assert result["text"] == expected
    assert stop not in result["text"]
    assert result["finish_reason"] == "stop"
    assert result["completion_tokens"] < 40


def test_stop_list_stops_at_the_first_match(client, greedy_text):
    stop, expected = stop_in(greedy_text)

    result = generate(client, temperature=0, max_tokens=40, stop=["never appears \u2603", stop])

    assert result["text"] == expected
    assert result["finish_reason"] == "stop"


def test_stop_string_that_never_appears_changes_nothing(client, greedy_text):
    result = generate(client, temperature=0, max_tokens=40, stop=["never appears \u2603"])

    assert result["text"] == greedy_text
    assert result["finish_reason"] == "length"


def test_stop_string_is_held_back_from_the_stream(client, greedy_text):
    stop, expected = stop_in(greedy_text)

    chunks, complete = stream(client, temperature=0, max_tokens=40, stop=stop)

    assert "".join(chunks) == complete["text"] == expected
    assert complete["finish_reason"] == "stop"


# -- prompts and chat templates ------------------------------------------------------------------

SYSTEM = "You are a terse assistant."
HISTORY = [
    {"role": "user", "content": "Tell me about the sea."},
    {"role": "assistant", "content": "The boats come home with the tide."},
]


def test_plain_prompt_is_rendered_as_one_user_turn(client, tokenizer):
    """As the guide's example answer suggests, a bare prompt reaches a chat model as a user message."""
    result = generate(client, temperature=0, max_tokens=4)

    messages = [{"role": "user", "content": PROMPT}]
    assert result["prompt_tokens"] == len(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    assert result["prompt_tokens"] > len(tokenizer.encode(PROMPT))


def test_plain_prompt_to_a_model_without_template_is_raw_text(plain_client, tokenizer):
    result = generate(plain_client, temperature=0, max_tokens=4)

    assert result["prompt_tokens"] == len(tokenizer.encode(PROMPT))


def test_system_prompt_is_rendered_with_the_chat_template(client, tokenizer):
    result = generate(client, temperature=0, max_tokens=4, system_prompt=SYSTEM)

    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]
    assert result["prompt_tokens"] == len(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def test_history_is_rendered_with_the_chat_template(client, tokenizer):
    result = generate(client, temperature=0, max_tokens=4, system_prompt=SYSTEM, history=HISTORY)

    messages = [{"role": "system", "content": SYSTEM}, *HISTORY, {"role": "user", "content": PROMPT}]
    assert result["prompt_tokens"] == len(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def test_the_same_conversation_gives_the_same_generation_however_it_is_sent(client):
    """A system message in history and system_prompt are one conversation to the template."""
    via_field = generate(client, temperature=0, system_prompt=SYSTEM, history=HISTORY)
    via_history = generate(client, temperature=0, history=[{"role": "system", "content": SYSTEM}, *HISTORY])

    assert via_history["prompt_tokens"] == via_field["prompt_tokens"]
    assert via_history["text"] == via_field["text"]


def test_conversation_context_changes_the_generation(client):
    alone = generate(client, temperature=0)
    with_history = generate(client, temperature=0, history=HISTORY)

    assert with_history["prompt_tokens"] > alone["prompt_tokens"]
    assert with_history["text"] != alone["text"]


@pytest.fixture(scope="module")
def plain_client(tiny_model_without_template):
    with test_client(tiny_model_without_template) as c:
        yield c


def test_model_without_a_chat_template_still_takes_conversations(plain_client):
    alone = generate(plain_client, temperature=0, max_tokens=8)
    conversation = generate(plain_client, temperature=0, max_tokens=8, system_prompt=SYSTEM, history=HISTORY)

    assert conversation["completion_tokens"] == 8
    assert conversation["finish_reason"] == "length"
    assert conversation["prompt_tokens"] > alone["prompt_tokens"]
    chunks, complete = stream(plain_client, temperature=0, max_tokens=8, history=HISTORY)
    assert "".join(chunks) == complete["text"]


# -- the response ------------------------------------------------------------------------------


def test_response_carries_every_documented_field(client):
    result = generate(client, temperature=0, max_tokens=10)

    assert isinstance(result["text"], str)
    assert isinstance(result["generation_time"], float) and result["generation_time"] > 0
    assert isinstance(result["prompt_tokens"], int) and result["prompt_tokens"] > 0
    assert result["completion_tokens"] == 10
    assert result["total_tokens"] == result["prompt_tokens"] + 10
    assert result["tokens_per_sec"] == pytest.approx(10 / result["generation_time"], rel=1e-6)
    assert result["finish_reason"] == "length"


def test_unicode_prompt_round_trips(client):
    result = generate(client, prompt="Café ☕ — naïve 日本語 🚀", temperature=0, max_tokens=6)

    assert result["completion_tokens"] == 6


def test_a_conversation_the_chat_template_refuses_is_a_400(tmp_path):
    """Templates raise on conversations they cannot render (here: no system role); that is the client's input."""
    from forgellm.testing import build_tiny_model

    model = build_tiny_model(tmp_path / "no-system-role")
    (model / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with test_client(model) as strict_client:
        guide = strict_client.post(
            "/api/model/generate", json={"prompt": "hi", "system_prompt": "be brief", "max_tokens": 2}
        )
        assert guide.status_code == 400
        assert guide.json() == {
            "success": False,
            "error": "The model's chat template rejected the conversation: System role not supported",
        }
        openai = strict_client.post(
            "/v1/chat/completions", json={"messages": [{"role": "system", "content": "x"}], "max_tokens": 2}
        )
        assert openai.status_code == 400
        assert "System role not supported" in openai.json()["error"]["message"]
        assert strict_client.post("/api/model/generate", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
