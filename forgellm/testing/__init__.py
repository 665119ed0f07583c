"""The plugin-authoring kit: what a plugin's tests need to run against a real ForgeLLM server.

- ``build_tiny_model(path)`` / ``build_tiny_adapter(model, path)``: a random-weight Llama (and a
  LoRA adapter) written to disk in about a second, loaded by mlx-lm's real loader; it never emits
  EOS, so a generation always runs to ``max_tokens``.
- ``test_client(model, extra_plugins={...}, **settings)``: an in-process server (Litestar's
  TestClient) with the model loaded, the plugin under test registered whether or not it is
  installed, and any option set by name; ``client.app.state.server`` is the ``Server`` your
  hooks receive.
- ``make_settings(**overrides)``: the Settings such a server gets, every installed plugin's
  defaults included; an unknown name is a TypeError.
- ``ServerProcess(args, env=...)``: a real ``forgellm run`` process on a free port, for what only
  a process shows (the command line, signals, logs, concurrent streams).
- ``wait_until_loaded(client)``: poll ``/api/model/status`` as the guide's clients do.

A plugin's tests, in full::

    import pytest
    import my_plugin
    from forgellm.testing import build_tiny_model, test_client

    @pytest.fixture(scope="session")
    def tiny_model(tmp_path_factory):
        return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")

    def test_refuses_long_prompts(tiny_model):
        with test_client(tiny_model, extra_plugins={"my-plugin": my_plugin}, my_plugin_limit=3) as client:
            response = client.post("/api/model/generate", json={"prompt": "far too long a prompt"})
            assert response.status_code == 400

docs/testing-plugins.md says more; examples/forgellm-prompt-guard is a plugin package tested this way.
"""

# First: the BLAS MLX binds to is chosen before anything imports MLX (forgellm/backends/mlx/bootstrap.py).
from forgellm.backends.mlx.bootstrap import prepare_process

prepare_process()

from forgellm.testing.clients import (  # noqa: E402  # after prepare_process(), as MLX must be
    TEST_BASE_URL,
    ServerProcess,
    create_test_app,
    free_port,
    make_settings,
    test_client,
    wait_until_loaded,
)
from forgellm.testing.tiny_model import build_tiny_adapter, build_tiny_model  # noqa: E402

__all__ = [
    "TEST_BASE_URL",
    "ServerProcess",
    "build_tiny_adapter",
    "create_test_app",
    "build_tiny_model",
    "free_port",
    "make_settings",
    "test_client",
    "wait_until_loaded",
]
