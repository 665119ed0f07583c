"""The MLX backend (mlx-lm), the default backend plugin (``plugin``), one concept a module:

- ``sampling``, ``decoding``: samplers, penalties, logits processors and logprobs for one sequence;
- ``constrained``: grammars (llguidance) as logits processors;
- ``detokenize``: a sequence's text as its tokens arrive;
- ``batch_engine``, ``sequential_engine``: the engines (continuous batching; one at a time);
- ``output_format``: how a model marks reasoning and tool calls;
- ``model``, ``backend``: a loaded model, and the backend that loads them;
- ``sources/``: where a name's weights come from (built-in models, GGUF files, the conversion cache);
- ``options``, ``pull``, ``plugin``: the plugin's options, its ``pull`` command and its hooks;
- ``bootstrap``, ``cpu_blas``, ``open_file_limit``: the process made ready before MLX is imported.

Importing this package imports nothing else: MLX must not be imported before ``bootstrap.prepare_process()``
has chosen its BLAS. The names below are loaded from their modules when first used, and that first use
prepares the process, so ``from forgellm.backends.mlx import MlxBackend`` is safe anywhere.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MlxBackend": "backend",
    "MlxModel": "model",
    "EngineTuning": "batch_engine",
    "ModelSources": "sources",
    "automatic_gguf_weights": "sources",
    "GGUF_KEEP_QUANTIZED": "sources",
    "TOOL_PARSERS": "output_format",
    "parse_json_tool_call": "output_format",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    importlib.import_module(f"{__name__}.bootstrap").prepare_process()  # a no-op once MLX is imported
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
