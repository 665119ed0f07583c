"""Shared fixtures: one tiny random-weight model and adapter per session, loaded by the real loader."""

from __future__ import annotations

import os

# Nothing in the suite may reach the Hugging Face hub. huggingface_hub reads this once, when it is
# first imported (forgellm.testing imports it), so it must be set before any forgellm import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from forgellm.testing import build_tiny_adapter, build_tiny_model, test_client  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_model_without_template(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-plain", chat_template=False)


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model, tmp_path_factory):
    return build_tiny_adapter(tiny_model, tmp_path_factory.mktemp("adapters") / "tiny-lora")


@pytest.fixture(scope="module")
def client(tiny_model):
    """A server with the tiny model loaded, shared by a module's tests (they must not unload it)."""
    with test_client(tiny_model) as c:
        yield c
