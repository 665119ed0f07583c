"""Schema fuzzing: schemathesis generates requests for every operation of our OpenAPI schema (the document
/docs/openapi.json serves) and checks each answer against it: never a 5xx, and every status, media
type and body (server-sent events included) as declared.

The app runs in-process through schemathesis's ASGI transport (no socket), once with no auth and
once with every opt-in plugin on (auth, rate limits, access log, metrics), where each generated
request is sent both with an admin key and without credentials. Each test item gets a freshly
started server (schemathesis ends an app's lifespan after every test), whose startup loads the tiny
model before the first request, so generation routes are fuzzed with a model serving. Loads and
unloads run against their own server: a fuzzed load replaces the model.

Bounded for CI: about 25 generated examples per operation, plus schemathesis's coverage cases
(boundary values, missing fields, wrong methods).
"""

from __future__ import annotations

import asyncio
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from forgellm import hookimpl
from forgellm.testing import create_test_app, test_client

ADMIN_KEY = "schema-fuzz-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PUBLIC_PATHS = {"/healthz", "/readyz"}
MODEL_CHANGES = r"^/api/model/(load|unload)$"

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
BOUNDED = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)
# Small generation limits keep each fuzzed generation to a few engine steps.
SMALL = {"max_tokens_cap": 8, "default_max_tokens": 4, "max_prompt_tokens": 512}


class LoadAtStartup:
    """Loads the session's tiny model inside the server's startup, so the first request already finds it
    serving (--model loads in the background, and fuzzed requests would meet 503 "loading" instead)."""

    model: str | None = None  # set by the serve_the_tiny_model fixture before any server starts

    @hookimpl
    async def startup(self, server):
        await asyncio.wrap_future(server.default_model.slot.start_load(self.model, None))


LOAD_AT_STARTUP = LoadAtStartup()


@pytest.fixture(autouse=True)
def serve_the_tiny_model(tiny_model):
    LOAD_AT_STARTUP.model = str(tiny_model)


def fuzzed_schema(plugins: str = "", **options):
    """The schema /docs/openapi.json serves, bound to a new app: schemathesis starts the app's lifespan at the
    first request of a test and ends it with the test."""
    # schemathesis' ASGI transport addresses the app as "testserver".
    app = create_test_app(
        plugins=plugins,
        extra_plugins={"load-at-startup": LOAD_AT_STARTUP},
        allowed_hosts=("testserver",),
        **SMALL,
        **options,
    )
    schema = schemathesis.openapi.from_dict(app.openapi_schema.to_schema())
    schema.app = app  # what schemathesis.openapi.from_asgi sets: requests go through the ASGI transport
    return schema


def open_schema():
    return fuzzed_schema(plugins="metrics")


def locked_schema():
    return fuzzed_schema(
        plugins="auth,ratelimit,logging,metrics",
        api_key=(ADMIN_KEY,),
        rate_limit="100000/minute",  # on, so its hooks run under fuzzing, but never reached
        access_log_file=os.devnull,
    )


@pytest.fixture()
def offline():
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE, "fuzzed repo ids must never reach the network"


def answers_anonymous_within_the_contract(case) -> None:
    """Without credentials: the same checks, and nothing but the health probes gets past the 401.

    Two answers come before authentication, by design: 405 for a method the route lacks, and the
    OPTIONS answer, which browsers ask for without credentials (CORS preflight).
    """
    response = case.call_and_validate(checks=CHECKS)
    if case.path not in PUBLIC_PATHS and case.method != "OPTIONS" and response.status_code != 405:
        assert response.status_code == 401, f"{case.method} {case.path} answered {response.status_code} anonymously"
        assert response.headers["www-authenticate"]


# A fuzzed load replaces the model, so loads and unloads get servers of their own.
open_serving = open_schema().exclude(path_regex=MODEL_CHANGES)
open_loading = open_schema().include(path_regex=MODEL_CHANGES)
locked_serving = locked_schema().exclude(path_regex=MODEL_CHANGES)
locked_loading = locked_schema().include(path_regex=MODEL_CHANGES)


@open_serving.parametrize()
@BOUNDED
def test_every_route_without_auth_answers_within_its_schema(case):
    case.call_and_validate(checks=CHECKS)


@open_loading.parametrize()
@BOUNDED
def test_loads_and_unloads_without_auth_answer_within_their_schema(offline, case):
    case.call_and_validate(checks=CHECKS)


@locked_serving.parametrize()
@BOUNDED
def test_every_route_with_auth_answers_within_its_schema(case):
    case.call_and_validate(checks=CHECKS, headers=ADMIN)
    answers_anonymous_within_the_contract(case)


@locked_loading.parametrize()
@BOUNDED
def test_loads_and_unloads_with_auth_answer_within_their_schema(offline, case):
    case.call_and_validate(checks=CHECKS, headers=ADMIN)
    answers_anonymous_within_the_contract(case)


# Found by this fuzzing: load requests naming something the OS cannot even look up were a 500.
UNLOOKABLE_NAMES = {"longer than a file name": "/" + "x" * 300, "an unknown user's home": "~no-such-user/model"}


@pytest.fixture(scope="module")
def empty_server():
    with test_client() as client:
        yield client


@pytest.mark.parametrize("name", UNLOOKABLE_NAMES.values(), ids=UNLOOKABLE_NAMES.keys())
def test_loading_a_model_the_os_cannot_look_up_is_400(empty_server, name):
    response = empty_server.post("/api/model/load", json={"model_name": name})
    assert response.status_code == 400
    assert response.json() == {"success": False, "error": f"Model {name} was not found or is not loadable"}


@pytest.mark.parametrize("name", UNLOOKABLE_NAMES.values(), ids=UNLOOKABLE_NAMES.keys())
def test_loading_an_adapter_the_os_cannot_look_up_is_400(empty_server, tmp_path, name):
    response = empty_server.post("/api/model/load", json={"model_name": str(tmp_path), "adapter_path": name})
    assert response.status_code == 400
    assert response.json() == {
        "success": False,
        "error": f"Model {tmp_path} with adapter {name} was not found or is not loadable",
    }
