"""A model sharded over several processes on loopback, joined by MLX's real ring backend (never a mock of the
transport): under mlx.launch, or spawned with MLX_RANK and MLX_HOSTFILE as mlx.launch sets them. Rank 0 serves
HTTP; its output must be what one process gives. Run these alone with ``-m distributed``."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import live_server
import openai
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model
from rank_group import RankGroup, write_hostfile

from forgellm.backends.mlx.sources.builtin_models import DEFAULT_MODEL
from forgellm.testing import ServerProcess, build_tiny_model, free_port

pytestmark = pytest.mark.distributed


# Poll gently: the ranks share the machine's cores with the test.
wait_for = functools.partial(live_server.wait_for, every=0.2)


GREEDY = {"temperature": 0}
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    """A tiny random Qwen2 (mlx-lm pipelines Qwen2, not Llama) with its weight index, as pipelining needs."""
    overrides = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 4}
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen", config_overrides=overrides)


def answers(client: openai.OpenAI) -> dict[str, object]:
    """What the test asks a server, through the openai client: three requests at once (batched), one of them
    constrained by a JSON schema and one with logprobs and a penalty, then a streamed one."""
    requests = {
        "question": lambda: client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=8,
            logprobs=True, top_logprobs=2, **GREEDY,
        ),
        "story": lambda: client.completions.create(
            model="m", prompt="Once upon a time", max_tokens=8, frequency_penalty=0.5, **GREEDY
        ),
        "json": lambda: client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Where is the Eiffel Tower? Answer in JSON."}],
            max_tokens=12, response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA}},
            **GREEDY,
        ),
    }  # fmt: skip
    with ThreadPoolExecutor(len(requests)) as pool:
        futures = {name: pool.submit(request) for name, request in requests.items()}
        results = {name: future.result() for name, future in futures.items()}
    question, story, constrained = results["question"], results["story"], results["json"]
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=6, stream=True, **GREEDY
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert question.choices[0].logprobs is not None and question.choices[0].logprobs.content is not None
    return {
        "question": question.choices[0].message.content,
        "question_tokens": [
            (entry.token, [top.token for top in entry.top_logprobs]) for entry in question.choices[0].logprobs.content
        ],  # fmt: skip
        "question_logprobs": [entry.logprob for entry in question.choices[0].logprobs.content],
        "story": story.choices[0].text,
        "json": json.loads(constrained.choices[0].message.content or ""),
        "streamed": streamed,
    }


def assert_same_answers(sharded: dict[str, object], alone: dict[str, object]) -> None:
    logprobs = sharded.pop("question_logprobs"), alone.pop("question_logprobs")
    assert sharded == alone
    # Split matrix products add in another order: the same tokens, their log-probabilities equal to rounding.
    assert logprobs[0] == pytest.approx(logprobs[1], abs=1e-3)


@pytest.mark.real_model
def test_three_ranks_tensor_parallel_under_mlx_launch_answer_as_one_process(tmp_path):
    launcher = shutil.which("mlx.launch", path=os.path.dirname(sys.executable))
    assert launcher is not None, "mlx.launch comes with mlx"
    port = free_port()
    server_args = ["-m", "forgellm", "run", "--host", "127.0.0.1", "--port", str(port), "--model", f"m={DEFAULT_MODEL}"]
    command = [launcher, "--backend", "ring", "-n", "3", "--python", sys.executable, "--", *server_args]
    log = open(tmp_path / "launch.log", "w+")
    # stdin stays open: mlx.launch relays it to every rank.
    launch = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _ready(url), "the three ranks to load the model", timeout=120)
        ranks = httpx.get(f"{url}/api/models").json()["ranks"]
        assert [rank["rank"] for rank in ranks] == [0, 1, 2]
        started = time.monotonic()
        with ServerProcess(["--model", f"m={DEFAULT_MODEL}"]) as alone:
            expected = answers(openai.OpenAI(base_url=f"{alone.url}/v1", api_key="none"))
        print(f"one process: {time.monotonic() - started:.1f}s")
        started = time.monotonic()
        sharded = answers(openai.OpenAI(base_url=f"{url}/v1", api_key="none"))
        print(f"three ranks: {time.monotonic() - started:.1f}s")
        assert "Paris" in str(sharded["question"])
        assert_same_answers(sharded, expected)
    finally:
        os.kill(rank_0_pid(port), signal.SIGTERM)  # rank 0 ends the group: every rank exits 0, then the launcher
        try:
            assert launch.wait(timeout=60) == 0, log.seek(0) or log.read()
        finally:
            if launch.poll() is None:
                os.killpg(launch.pid, signal.SIGKILL)
                launch.wait()
            log.close()


def rank_0_pid(port: int) -> int:
    """The process mlx.launch started as rank 0 of the server on this port."""
    for entry in os.listdir("/proc"):
        try:
            environ = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"MLX_RANK=0" in environ and str(port).encode() in cmdline and b"forgellm" in cmdline:
            return int(entry)
    raise AssertionError(f"no rank 0 serving port {port}")


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_two_ranks_pipeline_answer_as_one_process_each_holding_only_its_layers(tiny_qwen, tmp_path):
    args = ["--model", f"m={tiny_qwen}", "--parallel", "pipeline"]
    prompts = ["Once upon a time", "The quick brown fox", "Servers load models"]

    def complete(url: str) -> list[str]:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        with ThreadPoolExecutor(len(prompts)) as pool:
            replies = pool.map(
                lambda p: client.completions.create(model="m", prompt=p, max_tokens=16, **GREEDY), prompts
            )
        return [reply.choices[0].text for reply in replies]

    with ServerProcess(["--model", f"m={tiny_qwen}"]) as alone:
        expected = complete(alone.url)
    with RankGroup(2, args, tmp_path) as group:
        assert complete(group.url) == expected
        wait_for(lambda: len(_ranks(group.url)) == 2 and _ranks(group.url)[0]["weights_bytes"] > 0, "rank status")
        ranks = _ranks(group.url)

    model, _ = load_model(tiny_qwen, lazy=True)
    sizes = {name: array.nbytes for name, array in tree_flatten(model.parameters())}
    layer_bytes = [sum(size for name, size in sizes.items() if f"layers.{layer}." in name) for layer in range(4)]
    shared = sum(sizes.values()) - sum(layer_bytes)  # the embeddings, the final norm and the head: every rank's
    # mlx-lm gives rank 0 the last layers and rank 1 the first.
    assert [rank["weights_bytes"] for rank in ranks] == [shared + sum(layer_bytes[2:]), shared + sum(layer_bytes[:2])]
    assert all(rank["weights_bytes"] < sum(sizes.values()) for rank in ranks)
    assert all(rank["memory_bytes"] > 0 for rank in ranks)


def _ranks(url: str) -> list[dict]:
    return httpx.get(f"{url}/api/models").json()["ranks"]


@pytest.fixture(scope="module")
def tensor_group(tiny_model, tmp_path_factory):
    """Two ranks, tensor parallel, over the tiny Llama (4 attention heads, 2 KV heads)."""
    # --allow-model: a load's error says why (without it, a client's failed load of a local path does not).
    args = ["--model", str(tiny_model), "--rank-timeout", "3", "--allow-model", f"{tmp_path_factory.getbasetemp()}/*"]
    with RankGroup(2, args, tmp_path_factory.mktemp("group")) as group:
        yield group


def test_the_probes_the_models_list_and_the_console_show_the_ranks(tensor_group):
    ready = httpx.get(f"{tensor_group.url}/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True,
        "model_loaded": True,
        "engine_alive": True,
        "ranks": 2,
        "ranks_answering": True,
    }
    models = httpx.get(f"{tensor_group.url}/api/models").json()
    assert [rank["rank"] for rank in models["ranks"]] == [0, 1] and models["ranks_error"] is None
    console = httpx.get(f"{tensor_group.url}/console/api/state").json()
    assert [rank["rank"] for rank in console["ranks"]] == [0, 1]


def test_a_stream_cancelled_mid_way_frees_its_slot_on_every_rank(tensor_group):
    body = {"prompt": "Tell me a story", "max_tokens": 4000, "stream": True}
    with httpx.Client(base_url=tensor_group.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            for _ in range(3):
                next(lines)
            wait_for(lambda: [r["sequences"] for r in _ranks(tensor_group.url)] == [1, 1], "both ranks to hold it")
        wait_for(lambda: [r["sequences"] for r in _ranks(tensor_group.url)] == [0, 0], "both ranks to free it")
        # The group goes on serving.
        reply = http.post("/v1/completions", json={"prompt": "Once", "max_tokens": 4})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4


def test_adapters_are_refused_for_a_sharded_model(tensor_group, tiny_model, tiny_adapter):
    with httpx.Client(base_url=tensor_group.url, timeout=30) as http:
        load = http.post("/api/models/load", json={"model_name": str(tiny_model), "name": "tuned",
                                                    "adapter_path": str(tiny_adapter)})  # fmt: skip
        assert load.status_code == 200
        wait_for(lambda: _state(http, "tuned")["state"] == "failed", "the load to fail")
        assert "adapters are not available for a model sharded over ranks" in _state(http, "tuned")["error"]
        assert http.get("/readyz").status_code == 200  # the group still serves its model


def _state(http: httpx.Client, name: str) -> dict:
    return next(model for model in http.get("/api/models").json()["models"] if model["name"] == name)


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_a_lost_follower_turns_readyz_to_503_fails_the_stream_and_ends_rank_0(tiny_model, tmp_path, fault):
    with RankGroup(2, ["--model", str(tiny_model), "--rank-timeout", "2"], tmp_path) as group:
        assert group.server is not None and group.server.process is not None
        statuses: list[int] = []
        with httpx.Client(base_url=group.url, timeout=30) as http:
            body = {"prompt": "Tell me a story", "max_tokens": 4000, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as response:
                lines = response.iter_lines()
                next(lines)
                group.followers[0].send_signal(fault)
                rest = list(lines)
            while group.server.process.poll() is None:
                try:
                    statuses.append(http.get("/readyz", timeout=1).status_code)
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        group.followers[0].kill()
        assert any('"code":"unavailable"' in line for line in rest), rest[-3:]
        assert 503 in statuses
        code, output = group.server.stop()
        assert code == 1, output
        assert "the distributed group is broken" in output


def test_sigterm_on_rank_0_drains_its_requests_and_stops_every_rank(tiny_model, tmp_path):
    with RankGroup(2, ["--model", str(tiny_model)], tmp_path) as group:
        assert group.server is not None and group.server.process is not None
        with ThreadPoolExecutor(1) as pool:
            body = {"prompt": "Tell me a story", "max_tokens": 2000}
            reply = pool.submit(httpx.post, f"{group.url}/v1/completions", json=body, timeout=60)
            wait_for(lambda: [r["sequences"] for r in _ranks(group.url)] == [1, 1], "the request to start")
            group.server.process.send_signal(signal.SIGTERM)
            assert reply.result().json()["usage"]["completion_tokens"] == 2000
        assert group.server.process.wait(timeout=30) == 0
        assert group.wait_followers(timeout=30) == [0]
        assert "rank 0 stopped the group" in group.follower_output(1)


@pytest.mark.real_model
def test_two_ranks_cannot_split_smollm2_by_tensor_and_the_load_error_names_the_head_counts(tmp_path):
    with RankGroup(2, ["--model", DEFAULT_MODEL], tmp_path, wait_ready=False) as group:
        wait_for(lambda: httpx.get(f"{group.url}/api/model/status").json()["error"], "the load to fail", timeout=60)
        error = httpx.get(f"{group.url}/api/model/status").json()["error"]
        assert "9 attention heads" in error and "3 KV heads" in error and "divide by 2" in error
        generate = httpx.post(f"{group.url}/api/model/generate", json={"prompt": "hi"})
        assert generate.status_code == 400  # the guide's: no model loaded
        assert httpx.get(f"{group.url}/readyz").status_code == 503


def test_a_disk_prompt_cache_is_refused_at_start_under_a_launcher(tiny_model, tmp_path):
    hostfile = write_hostfile(tmp_path, 2)
    env = {**os.environ, "MLX_RANK": "0", "MLX_HOSTFILE": str(hostfile)}
    follower_env = {**env, "MLX_RANK": "1"}
    args = [sys.executable, "-m", "forgellm", "run", "--model", str(tiny_model), "--prompt-cache-dir", str(tmp_path)]
    follower = subprocess.Popen(args, env=follower_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    leader = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    follower_output = follower.communicate(timeout=60)[0]
    assert leader.returncode == 2 and follower.returncode == 2
    assert "--prompt-cache-dir is not available under mlx.launch" in leader.stderr
    assert "--prompt-cache-dir is not available under mlx.launch" in follower_output


def test_every_rank_keeps_the_prompt_cache_rank_0_keeps_under_its_byte_bound(tiny_model, tmp_path):
    """Rank 0's --prompt-cache-bytes drops entries the other ranks' caches would keep (their bytes differ with
    their part of the model): they drop the same ones, or a prompt would find another prefix on another rank."""
    args = ["--model", f"m={tiny_model}", "--prompt-cache-bytes", "20000", "--rank-timeout", "5"]
    prompts = [
        "Once upon a time there was a town",
        "The quick brown fox jumps over",
        "Servers load models and read prompts",
        "Good software is tested by people",
        "Language models predict the next token",
        "In winter the wind was cold and",
    ]
    with RankGroup(2, args, tmp_path) as group, httpx.Client(base_url=group.url, timeout=30) as http:

        def complete(prompt: str) -> dict:
            reply = http.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 6, **GREEDY})
            assert reply.status_code == 200, reply.text
            return reply.json()

        first = [complete(prompt)["choices"][0]["text"] for prompt in prompts]
        memory_tier = httpx.get(f"{group.url}/api/models").json()["models"][0]["kv_cache"]["memory_tier"]
        assert 0 < memory_tier["entries"] < len(prompts)  # the byte bound dropped the oldest
        kept, dropped = complete(prompts[-1]), complete(prompts[0])
        assert [kept["choices"][0]["text"], dropped["choices"][0]["text"]] == [first[-1], first[0]]
        # The last prompt's cache was kept (on every rank, or the ranks would have diverged), the first's dropped.
        cached = [reply["usage"]["prompt_tokens_details"]["cached_tokens"] for reply in (kept, dropped)]
        assert cached[0] > 1 and cached[1] <= 1, cached  # at most the shared BOS token
        assert httpx.get(f"{group.url}/readyz").status_code == 200


def test_the_model_unloads_and_loads_again_on_every_rank(tensor_group):
    with httpx.Client(base_url=tensor_group.url, timeout=30) as http:
        model = http.get("/api/model/status").json()["model_name"]
        assert http.post("/api/model/unload").status_code == 200
        wait_for(lambda: not http.get("/api/model/status").json()["loaded"], "the unload")
        wait_for(
            lambda: [rank["weights_bytes"] for rank in _ranks(tensor_group.url)] == [0, 0], "every rank to free it"
        )
        assert http.post("/api/model/load", json={"model_name": model}).status_code == 200
        wait_for(lambda: http.get("/api/model/status").json()["loaded"], "the load")
        reply = http.post("/v1/completions", json={"prompt": "Once", "max_tokens": 4})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4


def test_a_draft_model_is_refused_for_a_sharded_model(tiny_model, tmp_path):
    args = ["--model", str(tiny_model), "--draft-model", str(tiny_model)]
    with RankGroup(2, args, tmp_path, wait_ready=False) as group:
        wait_for(lambda: httpx.get(f"{group.url}/api/model/status").json()["error"], "the load to fail")
        assert (
            "--draft-model is not available for a model sharded over ranks"
            in httpx.get(f"{group.url}/api/model/status").json()["error"]
        )


def test_the_other_ranks_exit_when_rank_0_dies(tiny_model, tmp_path):
    with RankGroup(2, ["--model", str(tiny_model), "--rank-timeout", "2"], tmp_path) as group:
        assert group.server is not None and group.server.process is not None
        group.server.process.kill()
        assert group.wait_followers(timeout=20) == [1]
        assert "rank 1:" in group.follower_output(1)


def test_two_resident_models_are_served_at_once_by_the_same_ranks(tensor_group, tiny_model, tmp_path):
    """Each resident model has its own engine thread on rank 0; their commands reach the other ranks in one
    order, so both batches run side by side."""
    other = build_tiny_model(tmp_path / "other", seed=1)
    with httpx.Client(base_url=tensor_group.url, timeout=60) as http:
        load = http.post("/api/models/load", json={"model_name": str(other), "name": "other"})
        assert load.status_code == 200
        wait_for(lambda: _state(http, "other")["state"] == "loaded", "the other model to load")
        models = [str(tiny_model), "other"] * 3
        bodies = [{"model": model, "prompt": "Once upon a time", "max_tokens": 40, **GREEDY} for model in models]
        with ThreadPoolExecutor(len(bodies)) as pool:
            replies = list(pool.map(lambda body: http.post("/v1/completions", json=body), bodies))
        assert [reply.status_code for reply in replies] == [200] * len(bodies)
        texts = [reply.json()["choices"][0]["text"] for reply in replies]
        assert len(set(texts[0::2])) == 1 and len(set(texts[1::2])) == 1  # each model's greedy answer, thrice
        assert texts[0] != texts[1]  # two models
        assert http.post("/api/models/unload", json={"name": "other"}).status_code == 200
