"""The plugin-authoring kit: what a plugin's tests need to run against a real ForgeLLM server.

- ``build_tiny_model`` / ``build_tiny_adapter``: a random-weight model on disk that mlx-lm's real loader loads.
- ``make_settings``: settings with every installed plugin's defaults, plus overrides.
- ``test_client``: an in-process server (Litestar's test client) with chosen plugins and a loaded model.
- ``ServerProcess``: a real ``forgellm run`` process on a free port.
"""

from forgellm.testing.clients import ServerProcess, free_port, make_settings, test_client, wait_until_loaded
from forgellm.testing.tiny_model import build_tiny_adapter, build_tiny_model

__all__ = [
    "ServerProcess",
    "build_tiny_adapter",
    "build_tiny_model",
    "free_port",
    "make_settings",
    "test_client",
    "wait_until_loaded",
]
