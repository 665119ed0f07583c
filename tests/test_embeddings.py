"""Embeddings (issue 26): all-MiniLM-L6-v2, the built-in embedding model, served at /v1/embeddings through the
openai client and LangChain, its vectors those of sentence-transformers itself.

tests/fixtures/minilm_reference.json holds sentence-transformers' own vectors for ten sentences (the
command that made it is in tests/fixtures/make_minilm_reference.py).
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import pathlib
import struct

import httpx
import numpy as np
import openai
import pytest
from langchain_openai import OpenAIEmbeddings
from live_server import serving

from forgellm.backends.mlx import ModelSources

EMBEDDER = "all-minilm-l6-v2"
CHAT_MODEL = "smollm2-135m-instruct"
REFERENCE = json.loads((pathlib.Path(__file__).parent / "fixtures" / "minilm_reference.json").read_text())

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def live():
    for name in (EMBEDDER, CHAT_MODEL):
        ModelSources().resolve(name, print)
    with serving([EMBEDDER], allow_model=(CHAT_MODEL,)) as server:
        yield server


def oai(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def cosine(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_vectors_equal_sentence_transformers_own(live):
    # The openai client asks for base64 by default and decodes it: the wire format is checked too.
    answer = oai(live).embeddings.create(model=EMBEDDER, input=REFERENCE["sentences"])
    assert [item.index for item in answer.data] == list(range(10))
    for item, expected in zip(answer.data, REFERENCE["vectors"], strict=True):
        assert len(item.embedding) == 384
        assert cosine(item.embedding, expected) >= 0.9999
    assert answer.model == EMBEDDER
    assert answer.usage.prompt_tokens == answer.usage.total_tokens > 10


def test_a_paraphrase_ranks_above_unrelated_sentences(live):
    query, *others = REFERENCE["sentences"][:5]  # "The cat sits on the mat."; [1] is its paraphrase
    vectors = [item.embedding for item in oai(live).embeddings.create(model=EMBEDDER, input=[query, *others]).data]
    scores = [cosine(vectors[0], vector) for vector in vectors[1:]]
    assert scores[0] == max(scores) and scores[0] > scores[1] + 0.3


def test_batched_concurrent_and_single_requests_give_the_same_vectors(live):
    client = oai(live)
    batched = [item.embedding for item in client.embeddings.create(model=EMBEDDER, input=REFERENCE["sentences"]).data]
    single = [client.embeddings.create(model=EMBEDDER, input=s).data[0].embedding for s in REFERENCE["sentences"]]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # inputs of several requests share forward passes
        concurrent_ = list(
            pool.map(
                lambda s: client.embeddings.create(model=EMBEDDER, input=[s]).data[0].embedding, REFERENCE["sentences"]
            )
        )
    np.testing.assert_allclose(batched, single, atol=1e-5)
    np.testing.assert_allclose(batched, concurrent_, atol=1e-5)


def test_float_and_base64_encodings_and_token_id_inputs_agree(live):
    text = REFERENCE["sentences"][4]
    as_float = httpx.post(f"{live.url}/v1/embeddings", json={"model": EMBEDDER, "input": text}).json()
    as_base64 = httpx.post(
        f"{live.url}/v1/embeddings", json={"model": EMBEDDER, "input": text, "encoding_format": "base64"}
    ).json()
    decoded = struct.unpack("<384f", base64.b64decode(as_base64["data"][0]["embedding"]))
    np.testing.assert_allclose(decoded, as_float["data"][0]["embedding"], rtol=1e-6)
    # The model's own token ids ([CLS] ... [SEP], as the text encodes) give the text's vector.
    ids = [101, 3000, 2003, 1996, 3007, 1997, 2605, 1012, 102]  # "Paris is the capital of France."
    by_ids = httpx.post(f"{live.url}/v1/embeddings", json={"model": EMBEDDER, "input": [ids]}).json()
    np.testing.assert_allclose(by_ids["data"][0]["embedding"], as_float["data"][0]["embedding"], atol=1e-5)
    assert by_ids["usage"]["prompt_tokens"] == len(ids) == as_float["usage"]["prompt_tokens"]


def test_langchain_openai_embeddings(live):
    # LangChain counts tokens with tiktoken (OpenAI's vocabulary) and sends those ids unless told not to.
    embeddings = OpenAIEmbeddings(
        model=EMBEDDER, base_url=f"{live.url}/v1", api_key="unused", check_embedding_ctx_length=False
    )
    documents = embeddings.embed_documents(REFERENCE["sentences"][:3])
    query = embeddings.embed_query(REFERENCE["sentences"][0])
    assert cosine(documents[0], REFERENCE["vectors"][0]) >= 0.9999
    assert cosine(query, documents[0]) >= 0.9999


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"input": []}, "at least one input"),
        ({"input": ["a", 3]}, "not a mix"),
        ({"input": ""}, "input[0] is empty"),
        ({"input": "a", "dimensions": 64}, "cannot shorten"),
        ({"input": "word " * 300}, "embeds at most 256"),
        ({"input": [[999999]]}, "not in the model's vocabulary"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "a", "colour": "red"}, "colour"),
    ],
)
def test_bad_requests_are_400s_in_openais_shape(live, body, message):
    response = httpx.post(f"{live.url}/v1/embeddings", json={"model": EMBEDDER, **body})
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_truncation_when_asked_and_the_models_own_size(live):
    long = "word " * 300
    answer = httpx.post(f"{live.url}/v1/embeddings", json={"model": EMBEDDER, "input": long, "truncate": True})
    assert answer.status_code == 200 and answer.json()["usage"]["prompt_tokens"] == 256
    same_size = httpx.post(f"{live.url}/v1/embeddings", json={"model": EMBEDDER, "input": "a", "dimensions": 384})
    assert same_size.status_code == 200


def test_the_models_list_says_which_model_embeds(live):
    models = {model["name"]: model for model in httpx.get(f"{live.url}/api/models").json()["models"]}
    assert models[EMBEDDER]["embedding_dimensions"] == 384
    assert models[EMBEDDER]["memory_bytes"] > 80_000_000


def test_each_model_serves_only_its_task(live):
    chat = httpx.post(
        f"{live.url}/v1/chat/completions",
        json={"model": EMBEDDER, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert chat.status_code == 400 and "embedding model" in chat.json()["error"]["message"]
    wrong = httpx.post(f"{live.url}/v1/embeddings", json={"model": CHAT_MODEL, "input": "hi"}, timeout=120)
    assert wrong.status_code == 400 and "not an embedding model" in wrong.json()["error"]["message"]


def test_plugins_count_embeddings_as_generations():
    # The metrics plugin counts the route's prompt tokens; the ratelimit plugin charges them to the budget
    # (400 tokens a minute here) and refuses once it is spent.
    with serving([EMBEDDER], plugins="metrics,ratelimit", token_limit="400/minute") as live:
        check_counted_and_limited(live)


def check_counted_and_limited(live) -> None:
    def counted() -> float:
        for metric_line in httpx.get(f"{live.url}/metrics").text.splitlines():
            if metric_line.startswith("forgellm_prompt_tokens_total") and "/v1/embeddings" in metric_line:
                return float(metric_line.rsplit(" ", 1)[1])
        return 0.0

    before = counted()
    answer = httpx.post(f"{live.url}/v1/embeddings", json={"model": EMBEDDER, "input": "word " * 250})
    assert answer.status_code == 200
    assert counted() - before == answer.json()["usage"]["prompt_tokens"] == 252
    statuses = [
        httpx.post(f"{live.url}/v1/embeddings", json={"model": EMBEDDER, "input": "word " * 250}).status_code
        for _ in range(3)
    ]
    assert 429 in statuses
