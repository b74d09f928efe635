"""The workflow's layout: components and pipelines install as ``dcgrpo.components`` / ``dcgrpo.pipelines``, each
component has its own folder (component, README, tests), and imports only go down the layers
cli -> pipeline -> pipelines -> components -> library, so nothing in the library imports the workflow."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {
    "dcgrpo": ROOT / "src" / "dcgrpo",
    "dcgrpo.components": ROOT / "components",
    "dcgrpo.pipelines": ROOT / "pipelines",
}
TOP_LEVEL_IMPORT = re.compile(r"(?<!from dcgrpo )\bimport (components|pipelines)\b|\bfrom (components|pipelines)\b")
LAYERS = {
    "dcgrpo.cli": 4,
    "dcgrpo.demo": 4,
    "dcgrpo.pipeline": 3,
    "dcgrpo.pipelines": 2,
    "dcgrpo.components": 1,
}  # else 0: library


def _modules() -> dict[str, Path]:
    """Every module of the distribution, by its installed name (component folders' tests excluded)."""
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            if "tests" in rel.parts or (package == "dcgrpo" and rel.parts[0] in ("components", "pipelines")):
                continue
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            found[".".join((package, *parts))] = path
    return found


def _layer(module: str) -> int:
    return max((rank for prefix, rank in LAYERS.items() if module == prefix or module.startswith(prefix + ".")),
               default=0)  # fmt: skip


def _imports(path: Path, module: str) -> set[str]:
    """Absolute names of every import in the file, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module if path.name == "__init__.py" else module.rpartition(".")[0]
                package = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{package}.{base}" if base else package
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


def test_package_list_names_every_package_folder():
    """pyproject lists the packages by hand (package-dir maps folders outside src/): a folder it misses would be
    missing from the images."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {k: str(ROOT / v) if k else v for k, v in tool["package-dir"].items()} == {
        "": "src", "dcgrpo.components": str(SOURCES["dcgrpo.components"]),
        "dcgrpo.pipelines": str(SOURCES["dcgrpo.pipelines"])}  # fmt: skip
    packages = {m for m, p in _modules().items() if p.name == "__init__.py"}
    assert set(tool["packages"]) == packages


def test_no_code_imports_the_workflow_as_top_level_packages():
    offenders = []
    for folder in ("src", "components", "pipelines", "tests", "benchmarks", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            tops = {name.split(".")[0] for name in _imports(path, "x")}
            offenders += [f"{path.relative_to(ROOT)} imports {t}" for t in tops & {"components", "pipelines"}]
    for dockerfile in (ROOT / "containers").glob("Dockerfile.*"):
        text = dockerfile.read_text()
        offenders += [f"{dockerfile.name}: {m.group()}" for m in TOP_LEVEL_IMPORT.finditer(text)]
    assert not offenders


def test_imports_only_go_down_the_layers():
    """The library never imports the workflow (no package cycle); components never import the pipeline."""
    modules = _modules()
    upward = []
    for module, path in modules.items():
        for name in _imports(path, module):
            if name.startswith("dcgrpo") and _layer(name) > _layer(module):
                upward.append(f"{module} (layer {_layer(module)}) imports {name} (layer {_layer(name)})")
    assert not upward, "\n".join(sorted(upward))


def _import_graph() -> dict[str, set[str]]:
    """module -> the modules of the distribution it imports, at module level or inside functions (an import of
    ``a.b.name`` counts as one of ``a.b`` when ``a.b.name`` is no module)."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in _imports(path, module):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(root: str) -> None:
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter[0]
                counter[0] += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycles_not_even_through_imports_inside_functions():
    """Issue 24: a function-level import hides a circle from Python but not from a reader; none in the
    distribution (e.g. config <-> data.benchmarks, registry <-> serving, before)."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the finder finds one
    cycles = _cycles(_import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


# What a function-level import may keep out of a light process: packages the light image lacks (torch, the engines,
# the trainers) and, for the CLI and `dcgrpo submit` (which retrain.yml runs with kfp, pydantic and pyyaml only),
# every other third-party package.
HEAVY = {"torch", "vllm", "transformers", "verl", "ray", "triton", "compressed_tensors", "llmcompressor", "datasets",
         "tokenizers", "mlflow", "boto3", "botocore", "pandas", "pyarrow", "numpy", "matplotlib", "math_verify",
         "rich", "tqdm", "safetensors", "huggingface_hub", "kubernetes", "kfp", "urllib3", "moto"}  # fmt: skip


def _top_level_imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text())
    return _imports_of([n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)], path, module)


def _imports_of(nodes, path: Path, module: str) -> set[str]:
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif node.level:  # relative: resolve against this module's package
            package = module if path.name == "__init__.py" else module.rpartition(".")[0]
            names.add(".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [node.module or ""]))
        else:
            names.add(node.module)
    return {n.rstrip(".") for n in names}


def _pulls_heavy(name: str, modules: dict[str, Path], seen: frozenset = frozenset()) -> bool:
    """Importing ``name`` (at module level, transitively) loads one of ``HEAVY``."""
    if not name.startswith("dcgrpo"):
        return name.split(".")[0] in HEAVY
    while name and name not in modules:
        name = name.rpartition(".")[0]
    if not name or name in seen:
        return False
    return any(_pulls_heavy(n, modules, seen | {name}) for n in _top_level_imports(modules[name], name))


def test_imports_inside_functions_only_keep_a_heavy_dependency_out_and_say_so():
    """Issue 24: an import inside a function hides a dependency; one stays only where it keeps a heavy package out of
    a light process (the light image, the CLI, submit), with the reason in a short comment on its line or the line
    above. Anything else imports at the top of its module.

    Exempt from "import it at the top", not from the comment: a component function (``dcgrpo.components.<step>.
    component``). KFP runs its body alone (a lightweight component embeds only the function's source), so every
    import it needs stays inside it."""
    modules, offenders = _modules(), []
    for module, path in modules.items():
        lines = path.read_text().splitlines()
        component = re.fullmatch(r"dcgrpo\.components\.\w+\.component", module) is not None
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in [n for n in ast.walk(fn) if isinstance(n, ast.Import | ast.ImportFrom)]:
                where = f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}"
                if not component and not any(_pulls_heavy(n, modules) for n in _imports_of([node], path, module)):
                    offenders.append(f"{where}  (light: import it at the top)")
                elif "#" not in lines[node.end_lineno - 1] and not lines[node.lineno - 2].strip().startswith("#"):
                    offenders.append(f"{where}  (no comment saying why)")
    assert not offenders, f"{len(offenders)} imports inside functions:\n" + "\n".join(offenders)


def _definitions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node.name, node.end_lineno - node.lineno + 1


def test_no_file_over_500_lines_and_no_function_over_60():
    """Issue 24: sizes a reader can hold (src, components, pipelines, benchmarks); the offenders are named."""
    offenders = []
    for folder in ("src", "components", "pipelines", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            lines = len(path.read_text().splitlines())
            if lines > 500:
                offenders.append(f"{path.relative_to(ROOT)}: {lines} lines")
            offenders += [
                f"{path.relative_to(ROOT)}: {name}() is {n} lines" for name, n in _definitions(path) if n > 60
            ]
    assert not offenders, "over the size limits (500 lines a file, 60 a function):\n" + "\n".join(offenders)


def test_every_component_has_its_folder_readme_and_test():
    from dcgrpo.components import GPU_STEPS, LIGHT_STEPS

    folders = {fn.__module__.split(".")[2] for fn in (LIGHT_STEPS | GPU_STEPS).values()}
    on_disk = {p.parent.name for p in (ROOT / "components").glob("*/component.py")}
    assert folders == on_disk
    for folder in folders:
        assert (ROOT / "components" / folder / "README.md").is_file(), folder
        assert (ROOT / "components" / folder / "tests" / f"test_{folder}_component.py").is_file(), folder


@pytest.mark.slow
def test_the_wheel_installs_only_the_dcgrpo_package(tmp_path):
    """What the images install (`pip install .`): the workflow inside dcgrpo, the presets, no top-level
    ``components``/``pipelines`` that could clash with another project's."""
    src = tmp_path / "src"  # what the Dockerfiles copy, so no stale build/ of a checkout leaks in
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("src", "components", "pipelines"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", str(src), "-w", str(tmp_path)], check=True, timeout=300)  # fmt: skip
    (wheel,) = tmp_path.glob("dcgrpo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"dcgrpo", wheel.name.split("-py3")[0] + ".dist-info"}
    expected = {f"dcgrpo/components/{p.parent.name}/component.py" for p in (ROOT / "components").glob("*/component.py")}
    assert expected <= set(names) and "dcgrpo/pipelines/dc_grpo.py" in names
    assert "dcgrpo/presets/tiny-cpu.yaml" in names and not any("/tests/" in n for n in names)
