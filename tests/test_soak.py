"""The soak script, short: benchmarks/soak.py for 20 seconds against the tiny model.

Mixed plain and streamed requests on both APIs from several API keys, auth and rate limits on:
every refusal must be an intended 429 (or 503) with Retry-After, the server's resident memory must
level off, no sequence may be left in the engine, and the server must exit 0 on SIGTERM. The
script checks all of that itself (its exit code); the report shows the load really hit the limits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).parents[1] / "benchmarks" / "soak.py"


def test_a_short_soak_passes(tiny_model, tmp_path):
    report = tmp_path / "soak.json"
    command = [
        sys.executable,
        str(SOAK),
        "--model",
        str(tiny_model),
        "--duration",
        "20",
        "--clients",
        "8",
        "--report",
        str(report),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)

    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(report.read_text())
    assert figures["problems"] == [] and figures["unintended"] == 0
    assert figures["outcomes"]["ok"] > 0
    assert figures["outcomes"]["rate_limited"] > 0, "the greedy key should have met its rate limit"
    assert figures["outcomes"].get("abandoned", 0) > 0, "some streams should have been abandoned mid-way"
    assert figures["gauges_after"] == {"forgellm_queue_depth": 0, "forgellm_active_sequences": 0}
    assert figures["server_exit"] == 0
    assert "outcomes by route" in result.stdout and "server resident memory" in result.stdout
