"""The integration guide's own clients, unchanged but for the URL and model name, against `forgellm run`.

The Python, JavaScript and curl examples below are copied verbatim from
shared/spec/model-server-integration-guide.md (test_copies_match_the_guide checks that when the
guide is beside this repository). One real server process serves the whole module.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from forgellm.testing import ServerProcess

GUIDE = Path(__file__).resolve().parents[2] / "shared" / "spec" / "model-server-integration-guide.md"
GUIDE_URL = "http://localhost:5001"
GUIDE_MODEL = "mlx-community/gemma-3-1b-it-bf16"

GUIDE_PYTHON_CLIENT = r'''import requests

class ModelClient:
    def __init__(self, server_url="http://localhost:5001"):
        self.server_url = server_url

    def get_status(self):
        """Get the status of the currently loaded model."""
        response = requests.get(f"{self.server_url}/api/model/status")
        return response.json()

    def load_model(self, model_name, adapter_path=None):
        """Load a model."""
        data = {
            "model_name": model_name,
            "adapter_path": adapter_path
        }
        response = requests.post(f"{self.server_url}/api/model/load", json=data)
        return response.json()

    def generate_text(self, prompt, max_tokens=100):
        """Generate text using the loaded model."""
        data = {
            "prompt": prompt,
            "max_tokens": max_tokens
        }
        response = requests.post(f"{self.server_url}/api/model/generate", json=data)
        return response.json()

# Usage example
client = ModelClient()
status = client.get_status()
if not status["loaded"]:
    client.load_model("mlx-community/gemma-3-1b-it-bf16")
    # Wait for the model to load
    import time
    while True:
        status = client.get_status()
        if status["loaded"]:
            break
        if not status["is_loading"]:
            print(f"Error loading model: {status.get('error')}")
            break
        time.sleep(1)

# Generate text
result = client.generate_text("Hello, world!")
print(result["text"])
'''

GUIDE_JAVASCRIPT_CLIENT = r"""class ModelClient {
  constructor(serverUrl = "http://localhost:5001") {
    this.serverUrl = serverUrl;
  }

  async getStatus() {
    const response = await fetch(`${this.serverUrl}/api/model/status`);
    return response.json();
  }

  async loadModel(modelName, adapterPath = null) {
    const response = await fetch(`${this.serverUrl}/api/model/load`, {
      method: "POST",
      headers: {
        "Content-Type": "application/json"
      },
      body: JSON.stringify({
        model_name: modelName,
        adapter_path: adapterPath
      })
    });
    return response.json();
  }

  async generateText(prompt, maxTokens = 100) {
    const response = await fetch(`${this.serverUrl}/api/model/generate`, {
      method: "POST",
      headers: {
        "Content-Type": "application/json"
      },
      body: JSON.stringify({
        prompt: prompt,
        max_tokens: maxTokens
      })
    });
    return response.json();
  }
}

// Usage example
const client = new ModelClient();
(async () => {
  const status = await client.getStatus();
  if (!status.loaded) {
    await client.loadModel("mlx-community/gemma-3-1b-it-bf16");
    // Wait for the model to load
    while (true) {
      const status = await client.getStatus();
      if (status.loaded) {
        break;
      }
      if (!status.is_loading) {
        console.error(`Error loading model: ${status.error}`);
        break;
      }
      await new Promise(resolve => setTimeout(resolve, 1000));
    }
  }

  // Generate text
  const result = await client.generateText("Hello, world!");
  console.log(result.text);
})();
"""

GUIDE_CURL_LINES = r"""# Get status
curl http://localhost:5001/api/model/status

# Load model
curl -X POST -H "Content-Type: application/json" -d '{"model_name": "mlx-community/gemma-3-1b-it-bf16"}' http://localhost:5001/api/model/load

# Generate text
curl -X POST -H "Content-Type: application/json" -d '{"prompt": "Hello, world!", "max_tokens": 100}' http://localhost:5001/api/model/generate
"""


def adapted(code: str, server: ServerProcess, model: Path) -> str:
    """The guide's code with only its URL and model name changed."""
    return code.replace(GUIDE_URL, server.url).replace(GUIDE_MODEL, str(model))


@pytest.fixture(scope="module")
def server():
    """`forgellm run` with no model: the guide's clients load it themselves."""
    with ServerProcess([], wait_ready=False) as process:
        yield process


@pytest.fixture
def unloaded(server):
    """Each client starts as a fresh deployment would: nothing loaded, so it runs its loading loop."""
    httpx.post(f"{server.url}/api/model/unload", timeout=30).raise_for_status()
    assert httpx.get(f"{server.url}/api/model/status").json()["loaded"] is False
    return server


def served_status(server) -> dict:
    return httpx.get(f"{server.url}/api/model/status", timeout=30).json()


def test_copies_match_the_guide():
    if not GUIDE.exists():
        pytest.skip(f"the guide is not at {GUIDE}")
    # Trailing spaces aside (the guide has some on blank lines; this file has none).
    text = "\n".join(line.rstrip() for line in GUIDE.read_text().splitlines())
    blocks = re.findall(r"```(\w+)\n(.*?)```", text, re.S)
    assert ("python", GUIDE_PYTHON_CLIENT) in blocks
    assert ("javascript", GUIDE_JAVASCRIPT_CLIENT) in blocks
    assert ("bash", GUIDE_CURL_LINES) in blocks


def test_python_client_loads_polls_and_generates(unloaded, tiny_model, capsys):
    exec(compile(adapted(GUIDE_PYTHON_CLIENT, unloaded, tiny_model), "guide_python_client", "exec"), {})

    printed = capsys.readouterr().out
    assert "Error loading model" not in printed
    assert printed.strip(), "the client printed no generated text"
    status = served_status(unloaded)
    assert status["loaded"] is True and status["model_name"] == str(tiny_model)


def test_javascript_client_loads_polls_and_generates(unloaded, tiny_model, tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    major = int(subprocess.run([node, "--version"], capture_output=True, text=True).stdout.lstrip("v").split(".")[0])
    if major < 18:
        pytest.skip(f"node {major} has no built-in fetch")
    script = tmp_path / "guide_client.js"
    script.write_text(adapted(GUIDE_JAVASCRIPT_CLIENT, unloaded, tiny_model))

    result = subprocess.run([node, str(script)], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert "Error loading model" not in result.stderr  # how the client reports a failed load
    assert result.stdout.strip(), "the client printed no generated text"
    status = served_status(unloaded)
    assert status["loaded"] is True and status["model_name"] == str(tiny_model)


def test_curl_lines(unloaded, tiny_model):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    lines = adapted(GUIDE_CURL_LINES, unloaded, tiny_model).splitlines()
    get_status, load_model, generate_text = [line for line in lines if line.startswith("curl")]

    def curl(command: str) -> dict:
        result = subprocess.run(
            ["bash", "-c", f"{command} --silent --show-error"], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    assert curl(get_status)["loaded"] is False
    assert curl(load_model) == {
        "success": True,
        "message": f"Model {tiny_model} loading started",
        "model_name": str(tiny_model),
        "adapter_path": None,
    }
    deadline = time.monotonic() + 60
    while (status := curl(get_status))["is_loading"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status["loaded"] is True
    result = curl(generate_text)
    assert result["success"] is True and result["text"]
    assert result["completion_tokens"] == 100


def test_sigint_shuts_down_cleanly(server):
    """Runs last: stops the module's server as Ctrl-C would."""
    code, output = server.stop(signal.SIGINT)

    assert "Traceback" not in output
    assert "Application shutdown complete" in output
    assert code == 0, output
