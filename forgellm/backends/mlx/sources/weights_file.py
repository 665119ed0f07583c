"""A model directory's weights as Hugging Face lays them out: the safetensors file and the index saying which
file holds each weight (``model.safetensors.index.json``), which a pipeline rank reads to load only its layers."""

from __future__ import annotations

import json
import pathlib

import mlx.core as mx

WEIGHTS_FILE = "model.safetensors"
WEIGHT_INDEX = "model.safetensors.index.json"


def save_weights(directory: pathlib.Path, weights: dict[str, mx.array]) -> None:
    mx.save_safetensors(str(directory / WEIGHTS_FILE), weights, metadata={"format": "mlx"})
    index = {
        "metadata": {"total_size": sum(weight.nbytes for weight in weights.values())},
        "weight_map": {name: WEIGHTS_FILE for name in sorted(weights)},
    }
    (directory / WEIGHT_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
