"""Sampling defaults per model: what a request that leaves a sampling field out gets.

In layers, first found wins: the request's own value; the operator's defaults for the model
(``--model-sampling [NAME:]FIELD=VALUE,...``, or a ``[models.NAME]`` table in the config file);
the model's own ``generation_config.json`` (temperature, top_p, top_k, min_p, repetition_penalty,
as vLLM's ``--generation-config auto`` reads it); else the API dialect's default. Anthropic's SDK
has no temperature argument and Anthropic's default is 1.0, so this is how a Claude Code user gets
a small local model sampled as it should be.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import click

from forgellm.core.engine.generation import LAYERED_SAMPLING

# What each field may be: (lowest, highest, integer).
_RANGES: dict[str, tuple[float, float, bool]] = {
    "temperature": (0.0, 2.0, False),
    "top_p": (0.0, 1.0, False),
    "top_k": (0, 1 << 20, True),
    "min_p": (0.0, 1.0, False),
    "repetition_penalty": (0.0, 100.0, False),
}
assert set(_RANGES) == set(LAYERED_SAMPLING)

DEFAULT_MODEL = ""  # the key of the default model's defaults (a spec without NAME:)


def parse_spec(spec: str) -> tuple[str, dict[str, float]]:
    """``coder:temperature=0.2,top_p=0.9`` as ("coder", {...}); without ``NAME:``, the default model's."""
    name, colon, fields = spec.rpartition(":")
    if not colon:
        name, fields = DEFAULT_MODEL, spec
    values: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in fields.split(","))):
        field, equals, text = item.partition("=")
        field = field.strip().replace("-", "_")
        if not equals or field not in _RANGES:
            raise ValueError(f"{item!r} is not FIELD=VALUE with FIELD one of {', '.join(LAYERED_SAMPLING)}")
        values[field] = checked_value(field, text.strip())
    if not values:
        raise ValueError(f"{spec!r} sets no field")
    return name, values


def checked_value(field: str, value: Any) -> float:
    low, high, integer = _RANGES[field]
    try:
        number = int(value) if integer else float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{field} must be {'an integer' if integer else 'a number'}, not {value!r}") from None
    if not low <= number <= high:
        raise ValueError(f"{field} must be between {low:g} and {high:g}, not {number:g}")
    return number


def table_as_spec(name: str, table: Mapping[str, Any]) -> str:
    """A config file's ``[models.NAME]`` table as the spec --model-sampling takes."""
    return f"{name}:" + ",".join(f"{field}={value}" for field, value in table.items())


def operator_defaults(specs: Iterable[str]) -> dict[str, dict[str, float]]:
    """The operator's defaults by model name (DEFAULT_MODEL for the default model's)."""
    by_model: dict[str, dict[str, float]] = {}
    for spec in specs:
        name, values = parse_spec(spec)
        by_model.setdefault(name, {}).update(values)
    return by_model


class ModelSamplingSpec(click.ParamType[str, Any]):
    """``[NAME:]FIELD=VALUE,...``, checked when parsed and kept as written."""

    name = "[NAME:]FIELD=VALUE,..."

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        try:
            parse_spec(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return str(value)


MODEL_SAMPLING_SPEC = ModelSamplingSpec()
