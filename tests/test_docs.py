"""The project's documents say what the code does: every hook is documented with its
signature and an example, and nothing documented as a hook is missing from the code."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from vbrd import hookspecs

DOCS = Path(__file__).resolve().parents[1] / "docs"


def hooks() -> dict[str, inspect.Signature]:
    return {name: inspect.signature(function) for name, function in vars(hookspecs).items()
            if name.startswith("vbrd_") and callable(function)}


def documented() -> dict[str, tuple[str, str]]:
    """Hook name → (its argument list in the heading, the section's text)."""
    text = (DOCS / "plugins.md").read_text()
    sections = re.split(r"(?m)^### ", text)[1:]
    found = {}
    for section in sections:
        heading, _, body = section.partition("\n")
        match = re.fullmatch(r"`(vbrd_\w+)\(([^)]*)\)`", heading.strip())
        assert match, f"a hook heading must read `name(args)`: {heading!r}"
        found[match[1]] = (match[2], body)
    return found


def test_every_hook_is_documented_and_every_documented_hook_exists():
    assert set(documented()) == set(hooks())


@pytest.mark.parametrize("name", sorted(hooks()))
def test_a_hooks_documentation_gives_its_signature_and_an_example(name):
    arguments, body = documented()[name]
    assert [a.strip() for a in arguments.split(",") if a.strip()] == list(
        hooks()[name].parameters), f"docs/plugins.md gives {name} other arguments"
    example = re.search(r"```python\n(.*?)```", body, re.S)
    assert example, f"docs/plugins.md has no example for {name}"
    code = example[1]
    assert "@hookimpl" in code and f"def {name}(" in code
    compile(code, f"docs/plugins.md:{name}", "exec")
    implemented = re.search(rf"def {name}\(([^)]*)\)", code)
    assert implemented is not None
    assert [a.strip() for a in implemented[1].split(",") if a.strip()] == list(
        hooks()[name].parameters), f"the example of {name} implements other arguments"


def test_no_module_points_at_a_design_document_outside_the_project():
    root = DOCS.parent
    offenders = [str(p.relative_to(root)) for folder in ("vbrd", "plugins", "tests")
                 for p in (root / folder).rglob("*.py")
                 if "DESIGN.md" in p.read_text() and p != Path(__file__).resolve()]
    assert offenders == []
