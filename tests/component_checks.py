"""The check each component's own test runs (``components/<name>/tests/``): its README is its interface.

A README names each component of its folder with its image and the library functions it calls, and lists the
inputs and outputs with their KFP types; this compares those tables with what KFP builds from the function, so
a changed signature, image or call fails the component's test until its README says so.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _table(readme: str, heading: str | None) -> list[list[str]]:
    """Rows (cells without backticks) of the first table after ``## heading`` (None: the first table)."""
    lines = readme.splitlines()
    start = lines.index(f"## {heading}") if heading else 0
    rows, seen = [], False
    for line in lines[start:]:
        if line.startswith("|"):
            seen = True
            cells = [c.strip().replace("`", "") for c in line.strip("|").split("|")]
            if not set(cells[0]) <= {"-"}:
                rows.append(cells)
        elif seen:
            break
    return rows[1:]  # without the header row


def library_calls(fn) -> list[str]:
    """``module.name`` for every ``from dcgrpo.<module> import name`` in the function's body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    return [f"{node.module}.{alias.name}" for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dcgrpo.")
            for alias in node.names]  # fmt: skip


def check_component(folder: str) -> None:
    from dcgrpo.components import GPU_STEPS, LIGHT_STEPS, build_components

    readme = (ROOT / "components" / folder / "README.md").read_text()
    steps = LIGHT_STEPS | GPU_STEPS
    here = {name for name, fn in steps.items() if fn.__module__ == f"dcgrpo.components.{folder}.component"}
    listed = {row[0]: row for row in _table(readme, None)}
    assert set(listed) == here, f"components/{folder}/README.md lists {sorted(listed)}; the folder has {sorted(here)}"
    built = build_components("img/light:1", "img/gpu:1")
    for name in here:
        image = "light" if name in LIGHT_STEPS else "gpu"
        assert listed[name][1] == image, f"{folder}/README.md: {name} runs on the {image} image"
        calls = [c.strip() for c in listed[name][2].split(",") if c.strip()]
        assert calls == library_calls(steps[name]), f"{folder}/README.md: {name} calls {library_calls(steps[name])}"
        spec = getattr(built, name).component_spec
        for heading, items in (("Inputs", spec.inputs or {}), ("Outputs", spec.outputs or {})):
            documented = [(row[0], row[1]) for row in _table(readme, heading)]
            actual = [(key, value.type) for key, value in items.items()]
            assert documented == actual, f"{folder}/README.md {heading} of {name}: {documented} != {actual}"
