"""Fixtures from ForgeLLM's plugin-authoring kit: a tiny model on disk, and servers with this plugin."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tiny model is built here; nothing is downloaded

import forgellm_prompt_guard  # noqa: E402

from forgellm.testing import build_tiny_model, test_client  # noqa: E402

BLOCKED = (r"ignore (all )?previous instructions", r"\bpassword\b")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def guarded(tiny_model):
    """A server running this plugin (whether or not the package is installed) with two patterns."""
    with test_client(
        tiny_model, extra_plugins={"prompt-guard": forgellm_prompt_guard}, prompt_guard_pattern=BLOCKED
    ) as client:
        yield client
