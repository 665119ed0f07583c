"""docs/plugins.md documents every hook in forgellm/core/hookspecs.py, and its examples work.

Adding a hook without a "## hook_name" section (signature, when it runs, what to return, an
example) fails here, as Datasette's docs test does.
"""

from __future__ import annotations

import inspect
import re
import sys
import tomllib
import types
from pathlib import Path

import pluggy
import pytest

from forgellm.core import hookspecs
from forgellm.core.plugin_manager import PROJECT

PLUGINS_DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
FENCE = re.compile(r"^```(\w*)\s*$")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*$")


def hook_specs() -> dict[str, object]:
    marker = f"{PROJECT}_spec"
    return {name: fn for name, fn in vars(hookspecs).items() if callable(fn) and hasattr(fn, marker)}


def signature_of(spec) -> str:
    return f"{spec.__name__}({', '.join(inspect.signature(spec).parameters)})"


def parse(text: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """({level-2 heading: its section's text}, [(language, code) for every fenced block])."""
    sections: dict[str, list[str]] = {}
    blocks: list[tuple[str, str]] = []
    current: list[str] | None = None
    fence: tuple[str, list[str]] | None = None
    for line in text.splitlines():
        if fence is not None:
            if line.strip() == "```":
                blocks.append((fence[0], "\n".join(fence[1]) + "\n"))
                fence = None
            else:
                fence[1].append(line)
            if current is not None:
                current.append(line)
            continue
        if match := FENCE.match(line):
            fence = (match.group(1), [])
        elif match := HEADING.match(line):
            if len(match.group(1)) <= 2:
                current = sections.setdefault(match.group(2), []) if len(match.group(1)) == 2 else None
                continue
        if current is not None:
            current.append(line)
    return {title: "\n".join(lines) for title, lines in sections.items()}, blocks


@pytest.fixture(scope="module")
def doc():
    return parse(PLUGINS_DOC.read_text(encoding="utf-8"))


HOOKS = sorted(hook_specs())


def test_hookspecs_are_found():
    assert {"register_backends", "authenticate", "before_generate", "access_log"} <= set(HOOKS)


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_has_a_section_with_its_signature(doc, name):
    sections, _ = doc
    assert name in sections, f"docs/plugins.md has no '## {name}' section"
    section = sections[name]
    signature = signature_of(hook_specs()[name])
    assert f"```python\n{signature}\n```" in section, f"the {name} section should show `{signature}`"
    for part in ("**When it runs:**", "**What to return:**", "**Example"):
        assert part in section, f"the {name} section lacks {part}"
    example = section.split("**Example", 1)[1]
    assert f"def {name}(" in example, f"the {name} example should implement the hook"


@pytest.mark.parametrize("name", HOOKS)
def test_the_reference_table_links_every_hook(doc, name):
    sections, _ = doc
    assert f"[`{name}`](#{name})" in sections["Hook reference"]


def test_firstresult_hooks_say_so(doc):
    sections, _ = doc
    for name, spec in hook_specs().items():
        if getattr(spec, f"{PROJECT}_spec").get("firstresult"):
            assert "firstresult" in sections[name], f"{name} stops at the first answer; its section must say so"


def test_no_section_documents_a_hook_that_does_not_exist(doc):
    sections, _ = doc
    hook_like = {title for title in sections if re.fullmatch(r"[a-z_]+", title)}
    assert hook_like == set(HOOKS)


def plugin_examples(blocks) -> list[str]:
    return [code for language, code in blocks if language == "python" and "@hookimpl" in code]


def test_every_python_block_compiles(doc):
    _, blocks = doc
    for language, code in blocks:
        if language == "python":
            compile(code, "docs/plugins.md", "exec")


def test_every_plugin_example_registers_against_the_hookspecs(doc):
    """pluggy checks hook names and argument names at registration: a typo in the docs fails here."""
    _, blocks = doc
    examples = plugin_examples(blocks)
    assert len(examples) > len(HOOKS)  # the first plugin, then one example a hook
    for number, code in enumerate(examples):
        module = types.ModuleType(f"docs_example_{number}")
        exec(compile(code, f"docs/plugins.md example {number}", "exec"), module.__dict__)
        pm = pluggy.PluginManager(PROJECT)
        pm.add_hookspecs(hookspecs)
        pm.register(module)
        pm.check_pending()  # an @hookimpl whose name is no hook


def test_the_entry_point_example_is_valid_pyproject(doc):
    _, blocks = doc
    (pyproject,) = [code for language, code in blocks if language == "toml" and "entry-points" in code]
    assert tomllib.loads(pyproject)["project"]["entry-points"][PROJECT] == {"hello": "forgellm_hello"}


def test_the_first_plugin_and_its_test_work(doc, monkeypatch, tmp_path):
    _, blocks = doc
    (plugin_code,) = [code for language, code in blocks if code.startswith("# forgellm_hello.py")]
    (test_code,) = [code for language, code in blocks if code.startswith("# test_hello.py")]
    plugin = types.ModuleType("forgellm_hello")
    exec(compile(plugin_code, "forgellm_hello.py", "exec"), plugin.__dict__)
    monkeypatch.setitem(sys.modules, "forgellm_hello", plugin)
    namespace: dict = {}
    exec(compile(test_code, "test_hello.py", "exec"), namespace)

    namespace["test_forbidden_prompts_are_refused"](tmp_path)
