"""The attacks of the hardening review (issue 16), each replayed against a real `forgellm run`.

Connection floods, slow and huge headers and the open-file limit are in test_connection_limits.py;
this file holds the rest, row by row of the review's table: budgets under concurrency, loads that
hang, limits before work, the keys file's modes, web pages driving a local server, malformed
input and claims, long prompts stalling others, template bombs, and what leaks without
credentials.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import socket
import stat
import threading
import time

import httpx
import psutil
import pytest
from network_clients import client_from, needs_loopback_aliases

from forgellm.core.clients import client_key
from forgellm.plugins.auth.keys_file import add_key
from forgellm.testing import ServerProcess, test_client

GENERATE = "/api/model/generate"


def _wait_for_status(url: str, done, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = httpx.get(f"{url}/api/model/status").json()
        if done(status):
            return status
        assert time.monotonic() < deadline, f"status never settled: {status}"
        time.sleep(0.1)


def _eventually(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.1)


# -- 3: token budgets evaded by concurrency; one client taking every slot -------------------------


def test_a_burst_cannot_spend_one_token_budget_many_times(tiny_model):
    # Before: a key limited to 100 tokens/minute generated 5,639 tokens in one burst of 30 requests.
    args = ["--model", str(tiny_model), "--plugins", "ratelimit", "--token-limit", "100/day"]
    with ServerProcess(args) as server:

        def one(_):
            return httpx.post(f"{server.url}{GENERATE}", json={"prompt": "hello", "max_tokens": 50}, timeout=60)

        with concurrent.futures.ThreadPoolExecutor(30) as pool:
            answers = list(pool.map(one, range(30)))
    assert {answer.status_code for answer in answers} <= {200, 429}
    generated = sum(answer.json()["completion_tokens"] for answer in answers if answer.status_code == 200)
    assert generated == 100  # the whole budget, and not one token more


@needs_loopback_aliases
def test_one_client_cannot_take_every_batch_and_queue_slot(tiny_model):
    args = ["--model", str(tiny_model), "--max-inflight-per-client", "2", "--max-tokens-cap", "100000"]
    endless = {"prompt": "hello", "max_tokens": 100000, "streaming": True}
    with ServerProcess(args) as server, httpx.Client(base_url=server.url, timeout=60) as greedy:
        with (
            greedy.stream("POST", GENERATE, json=endless) as first,
            greedy.stream("POST", GENERATE, json=endless) as second,
        ):
            # Keep the line iterators: a dropped one closes its response.
            streams = [first.iter_lines(), second.iter_lines()]
            assert all(next(lines) for lines in streams)  # both are generating
            third = greedy.post(GENERATE, json={"prompt": "hello", "max_tokens": 2})
            with client_from("127.0.0.2", server.url) as other:
                served = other.post(GENERATE, json={"prompt": "hello", "max_tokens": 2})
        # Its streams have ended: once the server has seen them go, it is served again.
        _eventually(lambda: greedy.post(GENERATE, json={"prompt": "hello", "max_tokens": 2}).status_code == 200)
    assert third.status_code == 429 and third.headers["retry-after"] == "1"
    assert "Too many generations in flight" in third.json()["error"]
    assert served.status_code == 200


# -- 4: loads that never end ------------------------------------------------------------------------


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    return copy


@pytest.mark.parametrize("poison", ["fifo", "dev-zero"])
def test_a_model_directory_that_would_hang_or_exhaust_a_load_is_refused_at_once(model_copy, poison):
    config = model_copy / "config.json"
    config.unlink()
    if poison == "fifo":
        os.mkfifo(config)  # before: status said is_loading forever and SIGTERM hung
    else:
        config.symlink_to("/dev/zero")  # before: read until the process was killed for memory
    with ServerProcess([], wait_ready=False) as server:
        assert httpx.post(f"{server.url}/api/model/load", json={"model_name": str(model_copy)}).status_code == 200
        status = _wait_for_status(server.url, lambda s: not s["is_loading"])
        assert status["error"] == f"Model {model_copy} was not found or is not loadable"
        assert httpx.post(f"{server.url}{GENERATE}", json={"prompt": "hi"}).status_code == 400  # not a 503
        assert httpx.get(f"{server.url}/readyz").status_code == 503
        code, output = server.stop()
    assert code == 0
    assert f"config.json in {model_copy} is not a regular file" in output  # the operator's log says why


@pytest.fixture
def unanswering_index():
    """A package index that accepts connections and never answers: a fetch that hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/simple"
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    listener.close()


def test_a_load_that_hangs_is_given_up_after_the_load_timeout_and_sigterm_still_exits(tmp_path, unanswering_index):
    env = {
        "PIP_INDEX_URL": unanswering_index,
        "PIP_FIND_LINKS": "",
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_DEFAULT_TIMEOUT": "600",
        "PIP_RETRIES": "0",
    }
    args = ["--cache-dir", str(tmp_path / "cache"), "--load-timeout", "2", "--drain-timeout", "2"]
    with ServerProcess(args, env=env, default_model=True, wait_ready=False) as server:
        fetchers = []
        try:
            status = _wait_for_status(server.url, lambda s: not s["is_loading"])
            fetchers = psutil.Process(server.process.pid).children(recursive=True)
            assert status["error"] == "TimeoutError: the load did not finish within 2s (--load-timeout)"
            assert httpx.get(f"{server.url}/healthz").status_code == 200
            code, _ = server.stop(timeout=60)  # the engine thread is still stuck in the fetch: not waited for
            assert code == 0
        finally:
            for child in fetchers:
                child.kill()


# -- 5: limits checked after the work they should prevent -----------------------------------------


def test_a_client_over_its_limit_is_refused_before_its_prompt_is_rendered_and_oversize_prompts_count(
    tiny_model, model_copy
):
    (model_copy / "chat_template.jinja").write_text(TEMPLATE_BOMB)
    args = ["--model", str(model_copy), "--plugins", "ratelimit", "--rate-limit", "2/minute",
            "--template-timeout", "1", "--max-prompt-tokens", "8"]  # fmt: skip
    with ServerProcess(args) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        oversize = client.post("/v1/completions", json={"prompt": "word " * 50, "max_tokens": 1})
        slow = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        # A rendering would be a 400 after a second's work: the limit is checked first.
        refused = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert oversize.status_code == 400 and "the limit is 8" in oversize.json()["error"]["message"]
    assert slow.status_code == 400 and "--template-timeout" in slow.json()["error"]["message"]
    assert refused.status_code == 429


# -- 6: a keys file anyone may write ----------------------------------------------------------------


@pytest.mark.parametrize("writable", ["file", "directory"])
def test_a_keys_file_others_may_write_stops_the_server(tmp_path, writable):
    keys = tmp_path / "conf" / "keys.json"
    add_key(keys, "admin", ("admin",))
    target = keys if writable == "file" else keys.parent
    target.chmod(target.stat().st_mode | stat.S_IWOTH)
    with pytest.raises(RuntimeError) as refused:
        with ServerProcess(["--plugins", "auth", "--api-keys-file", str(keys)], wait_ready=False):
            pass
    assert "writable by group or others" in str(refused.value)


def test_a_keys_file_made_writable_by_others_while_serving_accepts_no_key(tmp_path):
    keys = tmp_path / "conf" / "keys.json"
    key = add_key(keys, "reader", ("generate",))
    with ServerProcess(["--plugins", "auth", "--api-keys-file", str(keys)], wait_ready=False) as server:
        headers = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{server.url}/api/model/status", headers=headers).status_code == 200
        keys.chmod(0o666)  # before: an admin key appended by another user was accepted within a second
        assert httpx.get(f"{server.url}/api/model/status", headers=headers).status_code == 401
        keys.chmod(0o600)
        assert httpx.get(f"{server.url}/api/model/status", headers=headers).status_code == 200


# -- 7: a web page driving a server without auth ----------------------------------------------------


@pytest.fixture(scope="module")
def open_server(tiny_model):
    with ServerProcess(["--model", str(tiny_model)]) as server:
        yield server


def test_a_cross_site_form_post_as_text_plain_is_refused(open_server):
    body = json.dumps({"prompt": "hi", "max_tokens": 2})
    answer = httpx.post(f"{open_server.url}{GENERATE}", content=body, headers={"Content-Type": "text/plain"})
    assert answer.status_code == 415
    assert answer.json() == {
        "success": False,
        "error": "Send the request body as application/json (Content-Type: application/json)",
    }


def test_a_request_from_another_origin_cannot_change_state(open_server):
    evil = {"Origin": "https://evil.example"}
    unload = httpx.post(f"{open_server.url}/api/model/unload", headers=evil)  # no body: no preflight either
    assert unload.status_code == 403
    assert httpx.get(f"{open_server.url}/api/model/status").json()["loaded"]
    own = {"Origin": open_server.url, "Content-Type": "application/json"}
    same_origin = httpx.post(f"{open_server.url}{GENERATE}", json={"prompt": "hi", "max_tokens": 2}, headers=own)
    assert same_origin.status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:5001", "localhost.evil.example"])
def test_a_rebound_host_name_is_refused(open_server, host):
    answer = httpx.get(f"{open_server.url}/api/model/status", headers={"Host": host})
    assert answer.status_code == 400
    assert "Invalid Host header" in answer.json()["error"]


@pytest.mark.parametrize("host", ["localhost", "localhost:5001", "127.0.0.1:5001", "[::1]:5001", "10.1.2.3"])
def test_localhost_names_and_addresses_are_served(open_server, host):
    assert httpx.get(f"{open_server.url}/api/model/status", headers={"Host": host}).status_code == 200


def test_allowed_hosts_names_the_public_name(tiny_model):
    with test_client(allowed_hosts=("llm.example.com",)) as client:
        assert client.get("/healthz", headers={"Host": "llm.example.com"}).status_code == 200
        assert client.get("/healthz", headers={"Host": "localhost"}).status_code == 400  # only what is listed


# -- 8 and 9: input that gave a 500 ------------------------------------------------------------------


def test_json_nested_a_thousand_deep_is_a_400(open_server):
    body = b'{"prompt": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    answer = httpx.post(f"{open_server.url}{GENERATE}", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400
    assert answer.json()["error"] == "Request body is not valid JSON (it is nested too deeply)"


@pytest.mark.parametrize("claim", [["10/minute"], {"amount": 10}, 10])
def test_a_malformed_limit_claim_is_ignored_with_a_warning(tiny_model, claim, caplog):
    import jwt

    secret = "s" * 32
    token = jwt.encode(
        {"sub": "odd", "exp": int(time.time()) + 60, "scope": "generate", "token_limit": claim, "rate_limit": claim},
        secret,
        algorithm="HS256",
    )
    with test_client(tiny_model, plugins="auth,ratelimit", jwt_secret=secret, rate_limit="5/minute") as client:
        answer = client.post(
            GENERATE, json={"prompt": "hi", "max_tokens": 2}, headers={"Authorization": f"Bearer {token}"}
        )
    assert answer.status_code == 200  # before: a 500 on every generate
    assert "ignoring token_limit" in caplog.text and "ignoring rate_limit" in caplog.text


# -- 10: one long prompt stalls everyone ------------------------------------------------------------


def test_a_running_stream_keeps_producing_while_a_long_prompt_is_prefilled(tiny_model):
    args = ["--model", str(tiny_model), "--prefill-chunk-size", "128", "--max-tokens-cap", "100000"]
    with ServerProcess(args) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        arrivals: list[float] = []
        window: dict[str, float] = {}

        def stream() -> None:
            body = {"prompt": "hello", "max_tokens": 100000, "streaming": True}
            with client.stream("POST", GENERATE, json=body) as response:
                for _ in response.iter_lines():
                    arrivals.append(time.monotonic())
                    if "end" in window:
                        return

        reader = threading.Thread(target=stream)
        reader.start()
        while not arrivals:
            time.sleep(0.01)
        window["start"] = time.monotonic()
        long = client.post(GENERATE, json={"prompt": " ".join(["the"] * 2000), "max_tokens": 1})
        window["end"] = time.monotonic()
        reader.join()
    assert long.status_code == 200 and long.json()["prompt_tokens"] > 2000
    during = [t for t in arrivals if window["start"] <= t <= window["end"]]
    # 2,000 prompt tokens in slices of 128: a token for the stream between each slice and the next.
    assert len(during) >= 2000 // 128 - 1


# -- 11: a chat template that renders for minutes ---------------------------------------------------

# Nested loops: a conversation of one message renders for minutes.
TEMPLATE_BOMB = (
    "{% for m in messages %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    "{{ m['content'] }}{% endfor %}"
)


def _cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def test_a_template_bomb_is_abandoned_when_the_client_leaves_and_shutdown_does_not_wait(model_copy):
    (model_copy / "chat_template.jinja").write_text(TEMPLATE_BOMB)
    args = ["--model", str(model_copy), "--template-timeout", "600"]
    with ServerProcess(args) as server:
        body = {"messages": [{"role": "user", "content": "hi"}]}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=1)  # the client gives up
        # Before: the rendering pinned a core until it finished. Now it stops with the client: the server idles.
        deadline = time.monotonic() + 30
        while True:
            before = _cpu_seconds(server.process.pid)
            time.sleep(1)
            if _cpu_seconds(server.process.pid) - before < 0.3:
                break
            assert time.monotonic() < deadline, "the rendering went on after the client left"
        completion = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
        assert completion.status_code == 200
        code, _ = server.stop(timeout=30)
    assert code == 0


def test_a_template_bomb_is_a_400_after_the_template_timeout(model_copy):
    (model_copy / "chat_template.jinja").write_text(TEMPLATE_BOMB)
    with ServerProcess(["--model", str(model_copy), "--template-timeout", "1"]) as server:
        answer = httpx.post(f"{server.url}{GENERATE}", json={"prompt": "hi"}, timeout=60)
        assert answer.status_code == 400
        assert answer.json()["error"] == "Rendering the prompt took longer than 1s (--template-timeout)"
        # Shutdown while a rendering runs does not wait for it.
        threading.Thread(
            target=lambda: httpx.post(f"{server.url}{GENERATE}", json={"prompt": "hi"}, timeout=60), daemon=True
        ).start()
        time.sleep(0.3)
        code, _ = server.stop(timeout=30)
    assert code == 0


# -- 12 and 13: what answers without credentials ----------------------------------------------------


def test_options_says_nothing_of_which_paths_exist(open_server):
    known = httpx.options(f"{open_server.url}/api/model/status")
    unknown = httpx.options(f"{open_server.url}/no/such/route")
    assert known.status_code == unknown.status_code == 405
    assert known.json() == unknown.json()


def test_a_cors_preflight_from_an_allowed_origin_is_answered(tiny_model):
    origin = "https://app.example"
    with ServerProcess(["--cors-origin", origin], wait_ready=False) as server:
        preflight = httpx.options(
            f"{server.url}{GENERATE}",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        stranger = httpx.options(
            f"{server.url}{GENERATE}",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
    assert preflight.status_code in (200, 204)
    assert preflight.headers["access-control-allow-origin"] == origin
    assert stranger.status_code == 405


def test_probes_answer_head_and_readyz_names_no_path(open_server, tiny_model):
    assert httpx.head(f"{open_server.url}/healthz").status_code == 200
    assert httpx.head(f"{open_server.url}/readyz").status_code == 200
    assert str(tiny_model) not in httpx.get(f"{open_server.url}/readyz").text


def test_the_schema_names_the_root_path_its_clients_must_call():
    with test_client(root_path="/llm") as client:
        assert client.get("/docs/openapi.json").json()["servers"] == [{"url": "/llm"}]


def test_anonymous_ipv6_clients_count_per_network_prefix():
    same = [client_key(None, "2001:db8:1:2::1"), client_key(None, "2001:db8:1:2:ffff::9")]
    assert same[0] == same[1] == "address:2001:db8:1:2::/64"
    assert client_key(None, "2001:db8:1:3::1") != same[0]
    assert client_key(None, "2001:db8:1:2::1", ipv6_prefix=128) == "address:2001:db8:1:2::1"
    assert client_key(None, "::ffff:192.0.2.7") == "address:192.0.2.7"  # IPv4 through a dual-stack socket


def test_without_allow_model_a_load_tells_nothing_of_the_disk(tmp_path):
    existing, missing = tmp_path / "exists", tmp_path / "missing"
    existing.mkdir()
    with ServerProcess([], wait_ready=False) as server:
        refused = httpx.post(f"{server.url}/api/model/load", json={"model_name": str(missing)})
        assert refused.json()["error"] == f"Model {missing} was not found or is not loadable"
        assert httpx.post(f"{server.url}/api/model/load", json={"model_name": str(existing)}).status_code == 200
        status = _wait_for_status(server.url, lambda s: not s["is_loading"])
    assert status["error"] == f"Model {existing} was not found or is not loadable"  # the same words
