"""The TOML configuration file (``forgellm run --config forgellm.toml``), read and written.

Core options sit at the top level or in a ``[server]`` table; each plugin's options sit in a
table named after the plugin (``[auth]``, ``[ratelimit]``, ``[prompt-guard]``), so a plugin's
table exists as soon as it declares an option through the ``register_options`` hook. Keys are
option names, with ``_`` or ``-``::

    port = 8080
    plugins = "auth,metrics"

    [auth]
    api_keys_file = "/etc/forgellm/keys.json"

    [models.coder]          # per model, by the name it is served as: its sampling defaults
    temperature = 0.2

The file only supplies defaults: ``FORGELLM_*`` variables override it, and flags override
both (click's ``default_map``). Every value is checked here, against the TOML type the option
takes, so a mistake fails at start with a message naming the file, the table and the option.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import click
import tomli_w

from forgellm.core.config.settings import Option, Settings
from forgellm.core.models.sampling_defaults import parse_spec, table_as_spec

CORE_PLUGIN = "core"
CORE_TABLE = "server"
MODELS_TABLE = "models"  # [models.NAME]: one model's sampling defaults (--model-sampling)


class ConfigError(ValueError):
    """The configuration file cannot be used; the message names the option at fault."""


def table_of(option: Option) -> str:
    return CORE_TABLE if option.plugin == CORE_PLUGIN else option.plugin


def read_config_file(path: str | Path, options: Iterable[Option]) -> dict[str, Any]:
    """The file's values by option name, checked against each option's type: a click ``default_map``."""
    try:
        document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    by_table: dict[str, dict[str, Option]] = {}
    for option in options:
        by_table.setdefault(table_of(option), {})[option.name] = option

    values: dict[str, Any] = {}
    for key, value in document.items():
        if key == MODELS_TABLE and isinstance(value, dict):
            values.setdefault("model_sampling", []).extend(_model_tables(path, value))
        elif isinstance(value, dict):
            if key not in by_table:
                raise ConfigError(
                    f"{path}: unknown table [{key}]{_suggestion(key, by_table)}; "
                    f"tables: {', '.join(sorted(by_table))} (a plugin's table is its name)"
                )
            for name, item in value.items():
                _take(values, path, key, by_table, name, item)
        else:
            _take(values, path, CORE_TABLE, by_table, key, value, top_level=True)
    return values


def _model_tables(path: str | Path, tables: Mapping[str, Any]) -> list[str]:
    """``[models.NAME]`` tables as --model-sampling specs."""
    specs = []
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{MODELS_TABLE}] holds one table per model ([{MODELS_TABLE}.{name}])")
        spec = table_as_spec(name, table)
        try:
            parse_spec(spec)
        except ValueError as exc:
            raise ConfigError(f"{path}: [{MODELS_TABLE}.{name}]: {exc}") from None
        specs.append(spec)
    return specs


def _take(
    values: dict[str, Any],
    path: str | Path,
    table: str,
    by_table: Mapping[str, Mapping[str, Option]],
    key: str,
    value: Any,
    top_level: bool = False,
) -> None:
    where = "at the top level" if top_level else f"in [{table}]"
    name = _name(key)
    option = by_table.get(table, {}).get(name)
    if option is None:
        owner = next((t for t, names in by_table.items() if name in names), None)
        if owner is not None:
            raise ConfigError(f"{path}: {name} belongs in the [{owner}] table, not {where}")
        raise ConfigError(f"{path}: unknown option {key!r} {where}{_suggestion(name, by_table.get(table, {}))}")
    if name in values:
        raise ConfigError(f"{path}: {name} is set twice (at the top level and in [{CORE_TABLE}])")
    if option.multiple and option.one_or_many and not isinstance(value, list):
        value = [value]
    problem = _type_problem(option, value)
    if problem:
        raise ConfigError(f"{path}: {name} {where} (--{name.replace('_', '-')}) {problem}")
    values[name] = list(value) if option.multiple else value


def _name(key: str) -> str:
    return key.replace("-", "_")


def _suggestion(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_problem(option: Option, value: Any) -> str | None:
    """Why value does not fit option, or None: TOML's own types must match, then the option's check runs."""
    if option.multiple:
        if not isinstance(value, list):
            return f"must be a list, not {_describe(value)}"
        for item in value:
            problem = _item_problem(option, item)
            if problem:
                return problem
        return None
    return _item_problem(option, value)


def _item_problem(option: Option, value: Any) -> str | None:
    param_type = click.BOOL if option.is_flag else click.types.convert_type(option.type)
    expected = (
        (click.types.BoolParamType, bool, "true or false"),
        (click.types.IntParamType, int, "an integer"),
        (click.types.FloatParamType, (int, float), "a number"),
    )
    for kind, python_type, words in expected:
        if isinstance(param_type, kind):
            if isinstance(value, bool) != (python_type is bool) or not isinstance(value, python_type):
                return f"must be {words}, not {_describe(value)}"
            break
    else:
        if not isinstance(value, str):
            return f"must be a string, not {_describe(value)}"
    try:
        param_type.convert(value, None, None)
    except click.BadParameter as exc:
        return f"is invalid: {exc.message}"
    return None


def _describe(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "a list", dict: "a table"}
    return f"{kinds.get(type(value), type(value).__name__)} ({value!r})"


def effective_config_toml(settings: Settings) -> str:
    """The settings as a config file, secrets masked; unset options are listed in a comment (TOML has no null)."""
    masked = settings.masked()
    tables: dict[str, dict[str, Any]] = {}
    unset = []
    for option in settings.options:
        # Every plugin's table is shown, empty or not, so the file's layout is plain to see.
        target = tables if option.plugin == CORE_PLUGIN else tables.setdefault(table_of(option), {})
        value = masked.get(option.name)
        if value is None:
            unset.append(option.name)
        else:
            target[option.name] = _toml_value(value)
    header = "# The effective configuration: flags over FORGELLM_* variables over --config over defaults.\n"
    if unset:
        header += f"# Unset: {', '.join(unset)}\n"
    core = {name: value for name, value in tables.items() if not isinstance(value, dict)}
    plugin_tables = {name: value for name, value in tables.items() if isinstance(value, dict)}
    return header + "\n" + tomli_w.dumps({**core, **plugin_tables})


def _toml_value(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_toml_value(item) for item in value]
    return str(value)  # a plugin's own type: shown as text
