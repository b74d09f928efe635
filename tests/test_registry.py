"""Registry against a real MLflow server (sqlite, served artifacts) and moto S3."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from dcgrpo import registry, storage
from dcgrpo.cli import main as cli_main

GATE = "eval/synthetic/avg_1"
BUDGET = 5e-3


def _name() -> str:
    return f"dcgrpo-test-{uuid.uuid4().hex[:8]}"


def _register(mlc, name, model_dir, acc: float, d: float = 1e-3, **kw):
    exp = mlc.get_experiment_by_name("registry-tests") or mlc.get_experiment(mlc.create_experiment("registry-tests"))
    run = mlc.create_run(exp.experiment_id)
    mlc.set_terminated(run.info.run_id)
    return registry.register_model(
        kw.pop("client", mlc), name, run.info.run_id, str(model_dir),
        metrics={GATE: acc, "eval/math500/avg_1": acc / 2}, final_lambda=0.25, discrepancy=d,
        config_hash="abc123", **kw,
    )  # fmt: skip


def _champion(mlc, name):
    return registry.alias_version(mlc, name, "champion")


def test_first_registration_becomes_champion(mlc, model_dir):
    name = _name()
    mv = _register(mlc, name, model_dir, acc=0.4)
    assert mv.tags[registry.TAG_QUANTIZATION] == "fp8" and mv.tags[registry.TAG_CONFIG_HASH] == "abc123"
    assert json.loads(mv.tags[registry.TAG_METRICS])[GATE] == 0.4
    assert mv.tags["metric.eval/synthetic/avg_1"] == "0.4"
    assert mlc.get_model_version_by_alias(name, "challenger").version == mv.version
    assert mlc.list_artifacts(mv.run_id, "model")  # the directory is in the run's artifacts

    decision = registry.promote(mlc, name, mv.version, GATE, BUDGET)
    assert decision.promoted and "first champion" in decision.reason
    champ = _champion(mlc, name)
    assert champ.version == mv.version and champ.tags[registry.TAG_DECISION] == "promoted"


def test_worse_is_rejected_better_is_promoted_force_overrides(mlc, model_dir):
    name = _name()
    v1 = _register(mlc, name, model_dir, acc=0.5).version
    assert registry.promote(mlc, name, v1, GATE, BUDGET).promoted

    worse = _register(mlc, name, model_dir, acc=0.3)
    decision = registry.promote(mlc, name, worse.version, GATE, BUDGET)
    assert not decision.promoted and _champion(mlc, name).version == v1
    tags = mlc.get_model_version(name, worse.version).tags
    assert tags[registry.TAG_DECISION] == "rejected" and "0.3 < champion" in tags[registry.TAG_REASON]
    assert tags[registry.TAG_COMPARED_TO] == v1

    drifted = _register(mlc, name, model_dir, acc=0.9, d=0.2)
    assert not registry.promote(mlc, name, drifted.version, GATE, BUDGET).promoted
    assert "outside budget" in mlc.get_model_version(name, drifted.version).tags[registry.TAG_REASON]

    better = _register(mlc, name, model_dir, acc=0.6)
    assert registry.promote(mlc, name, better.version, GATE, BUDGET).promoted
    assert _champion(mlc, name).version == better.version
    # Aliases are unique: exactly one champion, and the old one lost it.
    aliases = mlc.get_registered_model(name).aliases
    assert aliases["champion"] == better.version and list(aliases.values()).count(better.version) == 2
    assert "champion" not in mlc.get_model_version(name, v1).aliases

    forced = _register(mlc, name, model_dir, acc=0.1)
    decision = registry.promote(mlc, name, forced.version, GATE, BUDGET, force=True)
    assert decision.promoted and decision.reason.startswith("forced")
    assert _champion(mlc, name).version == forced.version


class _AliasFails(MlflowClient):
    """A real client whose alias moves fail: a registry outage at the commit point."""

    def set_registered_model_alias(self, name, alias, version):
        raise RuntimeError("registry unavailable")


def test_failure_midway_leaves_champion_untouched(mlc, mlflow_server, model_dir):
    name = _name()
    v1 = _register(mlc, name, model_dir, acc=0.5).version
    registry.promote(mlc, name, v1, GATE, BUDGET)
    broken = _AliasFails(tracking_uri=mlflow_server, registry_uri=mlflow_server)

    # Registration fails after the version was created: it is removed again.
    with pytest.raises(RuntimeError, match="unavailable"):
        _register(mlc, name, model_dir, acc=0.9, client=broken)
    versions = {v.version for v in mlc.search_model_versions(f"name='{name}'")}
    assert versions == {v1}
    assert mlc.get_model_version_by_alias(name, "challenger").version == v1

    # Promotion fails at the alias move: champion stays, the failure is on record.
    better = _register(mlc, name, model_dir, acc=0.9)
    with pytest.raises(RuntimeError, match="unavailable"):
        registry.promote(broken, name, better.version, GATE, BUDGET)
    assert _champion(mlc, name).version == v1
    assert mlc.get_model_version(name, better.version).tags[registry.TAG_DECISION] == "failed"

    with pytest.raises(registry.RegistryError, match="non-finite"):
        _register(mlc, name, model_dir, acc=float("nan"))
    with pytest.raises(registry.RegistryError, match="no version '1'"):
        registry.promote(mlc, _name(), 1, GATE, BUDGET)


def test_s3_export_registered_and_served(mlc, mlflow_server, model_dir, s3_server, tmp_path, monkeypatch):
    """FP8 dir on S3 -> registered (storage_uri tag) -> promoted via the CLI -> manifests point at S3."""
    name = _name()
    uri = "s3://dcgrpo-test/exports/run-1/fp8"
    storage.upload_dir(model_dir, uri)
    mv = _register(mlc, name, uri, acc=0.7)
    assert mv.tags[registry.TAG_STORAGE_URI] == uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    out = tmp_path / "serving"
    rc = cli_main(["promote", "--model-name", name, "--set", f"registry.max_discrepancy={BUDGET}",
                   "--manifests-dir", str(out)])  # fmt: skip
    assert rc == 0 and _champion(mlc, name).version == mv.version
    isvc = yaml.safe_load((out / "inferenceservice.yaml").read_text())
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == uri
    assert "--quantization=compressed-tensors" in isvc["spec"]["predictor"]["model"]["args"]
    deployment, service = yaml.safe_load_all((out / "vllm-deployment.yaml").read_text())
    assert deployment["spec"]["template"]["spec"]["initContainers"][0]["args"][0] == uri


# --- idempotent, all-or-nothing registration -----------------------------------------------------------------------


def _run_id(mlc) -> str:
    exp = mlc.get_experiment_by_name("registry-tests") or mlc.get_experiment(mlc.create_experiment("registry-tests"))
    return mlc.create_run(exp.experiment_id).info.run_id


def _register_run(mlc, name, run_id, model_dir, client=None, **kw):
    return registry.register_model(
        client or mlc, name, run_id, str(model_dir), metrics={GATE: 0.5}, final_lambda=0.1, discrepancy=1e-3,
        config_hash="abc123", **kw,
    )  # fmt: skip


def test_registering_the_same_model_twice_returns_the_first_version(mlc, model_dir, tmp_path, caplog):
    name, run_id = _name(), _run_id(mlc)
    first = _register_run(mlc, name, run_id, model_dir)
    assert first.tags[registry.TAG_SOURCE_DIR] == str(model_dir.resolve())
    caplog.set_level("INFO", logger="dcgrpo.registry")
    again = _register_run(mlc, name, run_id, str(model_dir) + "/")  # the same directory, spelled differently
    assert again.version == first.version and "reused" in caplog.text
    assert [v.version for v in mlc.search_model_versions(f"name='{name}'")] == [first.version]

    # A different directory, quantization or run is a different version.
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    (other_dir / "config.json").write_text("{}")
    versions = {
        _register_run(mlc, name, run_id, other_dir).version,
        _register_run(mlc, name, run_id, model_dir, quantization="bf16").version,
        _register_run(mlc, name, _run_id(mlc), model_dir).version,
    }
    assert len(versions) == 3 and first.version not in versions
    assert mlc.get_model_version_by_alias(name, "challenger").version == max(versions, key=int)


def _stored_sha(mlc, mv, filename: str, tmp_path) -> str:
    """sha256 of ``filename`` as the registry stores it for version ``mv`` (downloaded from its source)."""
    import hashlib

    from mlflow.artifacts import download_artifacts

    out = download_artifacts(artifact_uri=f"{mv.source}/{filename}", dst_path=str(tmp_path / f"v{mv.version}"),
                             tracking_uri=mlc._tracking_client.tracking_uri)  # fmt: skip
    return hashlib.sha256(Path(out).read_bytes()).hexdigest()


def test_a_registered_versions_files_never_change(mlc, model_dir, tmp_path):
    """register (dir A) -> promote -> register (dir B, same run): the champion's stored weights are still A's
    (they were B's before: the run's one `model` folder was rewritten in place)."""
    import hashlib

    name, run_id = _name(), _run_id(mlc)
    v1 = _register_run(mlc, name, run_id, model_dir)
    assert registry.promote(mlc, name, v1.version, GATE, BUDGET).promoted
    sha_a = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    other = tmp_path / "b"
    other.mkdir()
    (other / "config.json").write_text("{}")
    (other / "model.safetensors").write_bytes(b"\1" * 64)  # other weights
    v2 = _register_run(mlc, name, run_id, other)
    assert v2.version != v1.version and v2.source != v1.source
    assert _champion(mlc, name).version == v1.version
    assert _stored_sha(mlc, mlc.get_model_version(name, v1.version), "model.safetensors", tmp_path) == sha_a
    assert _stored_sha(mlc, v2, "model.safetensors", tmp_path) == hashlib.sha256(b"\1" * 64).hexdigest()


class _CreateVersionFails(MlflowClient):
    def create_model_version(self, *args, **kwargs):
        raise RuntimeError("registry unavailable")


def test_failed_first_registration_leaves_no_orphan_model(mlc, mlflow_server, model_dir):
    for broken_client in (_CreateVersionFails, _AliasFails):
        name = _name()
        broken = broken_client(tracking_uri=mlflow_server, registry_uri=mlflow_server)
        with pytest.raises(RuntimeError, match="unavailable"):
            _register_run(mlc, name, _run_id(mlc), model_dir, client=broken)
        assert not mlc.search_registered_models(f"name='{name}'"), broken_client.__name__
        assert not mlc.search_model_versions(f"name='{name}'")


# --- the CLI as a user runs it: one line, exit 2, nothing written --------------------------------------------------

DCGRPO = str(Path(sys.executable).with_name("dcgrpo"))


def _cli(*args, timeout=120):
    return subprocess.run([DCGRPO, *args], capture_output=True, text=True, timeout=timeout)


def _error_lines(proc) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if ": error: " in line]


@pytest.mark.parametrize(
    "metrics, bad_run, expected",
    [
        ("{not json", False, "--metrics: not JSON"),
        ('["eval/x", 0.5]', False, "--metrics: expected a JSON object of numbers"),
        ('{"eval/x": "high"}', False, "--metrics: expected a JSON object of numbers"),
        (json.dumps({GATE: 0.5}), True, "run_id 'no-such-run'"),
    ],
)
def test_cli_register_bad_input_exits_2_and_writes_nothing(mlc, mlflow_server, model_dir, metrics, bad_run, expected):
    name = _name()
    run_id = "no-such-run" if bad_run else _run_id(mlc)
    proc = _cli("register", "--tracking-uri", mlflow_server, "--model-name", name, "--run-id", run_id,
                "--model-dir", str(model_dir), "--metrics", metrics, "--final-lambda", "0.1",
                "--discrepancy", "1e-3")  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = _error_lines(proc)
    assert len(lines) == 1 and expected in lines[0], proc.stderr[-3000:]
    assert not mlc.search_registered_models(f"name='{name}'")


def test_cli_register_gates_and_records_a_rejection_as_the_pipeline_step_does(mlc, mlflow_server, model_dir, capsys):
    """One register path (stages.registration.register_and_gate): a hand registration the gate refuses carries the same
    decision tags as the pipeline's register step; with --quantization bf16 it is the bf16 twin's version."""
    from dcgrpo.stages import publish

    sets = [f"eval.gate_metric={GATE}", f"registry.max_discrepancy={BUDGET}"]
    tags = {}
    for path in ("step", "cli"):
        name = _name()
        champion = _register(mlc, name, model_dir, acc=0.5).version
        assert registry.promote(mlc, name, champion, GATE, BUDGET).promoted
        run_id = _run_id(mlc)
        if path == "step":
            meta = {"mlflow_run_id": run_id, "discrepancy": 1e-3, "lambda": 0.1, "eval_metrics": {GATE: 0.3}}
            out = publish.register_step("", sets, mlflow_server, name, meta, str(model_dir), str(model_dir))
            assert not out.passes_gate and out.model_name == name
            version = out.version
        else:
            argv = ["register", "--tracking-uri", mlflow_server, "--model-name", name, "--run-id", run_id,
                    "--model-dir", str(model_dir), "--metrics", json.dumps({GATE: 0.3}), "--final-lambda", "0.1",
                    "--discrepancy", "1e-3", "--set", sets[0], "--set", sets[1]]  # fmt: skip
            assert cli_main(argv) == 0
            version = mlc.get_model_version_by_alias(name, "challenger").version
            assert capsys.readouterr().out.splitlines()[-1] == f"{name} version {version}"  # the output line as before
            assert cli_main([*argv, "--quantization", "bf16"]) == 0
            twin = mlc.get_model_version_by_alias(name + "-bf16", "challenger")
            assert capsys.readouterr().out.splitlines()[-1] == f"{name}-bf16 version {twin.version}"
            assert twin.tags[registry.TAG_QUANTIZATION] == "bf16"
        assert _champion(mlc, name).version == champion
        tags[path] = {k: v for k, v in mlc.get_model_version(name, version).tags.items() if k.startswith("promotion.")}
    assert tags["cli"] == tags["step"]
    assert tags["cli"][registry.TAG_DECISION] == "rejected" and "0.3 < champion v1" in tags["cli"][registry.TAG_REASON]


@pytest.mark.parametrize(
    "gates, ds, expected",
    [
        ([0.9, 0.5, 0.4], [5e-3, 1e-4, 1e-4], 1),  # the higher gate value outside the budget loses
        ([0.9, 0.5, 0.5], [5e-3, 2e-4, 1e-4], 2),  # a tie in the gate value: the lower discrepancy wins
        ([0.9, 0.5, 0.5], [5e-3, 1e-4, 1e-4], 1),  # ... then the earlier method
        ([0.4, 0.9, 0.9], [5e-3, 2e-3, 3e-3], 1),  # none within the budget: the best gate value overall
        ([0.4, 0.9], [1e-4, float("nan")], 0),  # no discrepancy measured: never within the budget
    ],
)
def test_rank_methods_prefers_the_best_model_within_the_budget(gates, ds, expected):
    assert registry.rank_methods(gates, ds, budget=1e-3) == expected


def test_rank_methods_needs_one_discrepancy_per_gate_value():
    with pytest.raises(ValueError, match="2 gate values, 1 discrepancies"):
        registry.rank_methods([0.1, 0.2], [1e-4], 1e-3)
    with pytest.raises(ValueError):
        registry.rank_methods([], [], 1e-3)


def test_cli_promote_with_unreachable_server_fails_fast():
    uri = "http://127.0.0.1:9"  # discard port: nothing listens
    start = time.monotonic()
    proc = _cli("promote", "--tracking-uri", uri, timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = _error_lines(proc)
    assert len(lines) == 1 and uri in lines[0]
    assert elapsed < 15, f"took {elapsed:.1f} s"


def test_engine_tags_say_whether_the_rollout_engine_is_the_served_one():
    from dcgrpo.registry import engine_tags

    verl = engine_tags("vllm 0.24.0 (verl 0.9.1)", "vllm 0.33.0", "vllm/vllm-openai:v0.33.0")
    assert verl["dcgrpo.engine.serving"] == "vllm 0.33.0"
    assert verl["dcgrpo.engine.rollout_matches_serving"] == "false"
    assert engine_tags("vllm 0.33.0", "vllm 0.33.0", "vllm/vllm-openai:v0.33.0")[
        "dcgrpo.engine.rollout_matches_serving"] == "true"  # fmt: skip
    unknown = engine_tags(None, None, "vllm/vllm-openai:v0.33.0")
    assert unknown["dcgrpo.engine.rollout"] == unknown["dcgrpo.engine.rollout_matches_serving"] == "unknown"


@pytest.mark.parametrize("bad", ["it's-mine", 'say "hi"'])
def test_a_model_name_with_a_quote_is_refused_before_anything_is_written(mlc, mlflow_server, model_dir, bad, capsys):
    """MLflow's search filter cannot hold a quote (`Invalid clause(s) in filter string` mid-registration)."""
    from dcgrpo.config import ConfigError, load_config

    with pytest.raises(registry.RegistryError, match="contain no quotes"):
        _register(mlc, bad, model_dir, acc=0.5)
    with pytest.raises(registry.RegistryError, match="contain no quotes"):
        registry.promote(mlc, bad, 1, GATE, BUDGET)
    assert not mlc.search_registered_models(f"name LIKE '%{bad[:2]}%'")
    with pytest.raises(ConfigError, match="registry.model_name"):
        load_config(overrides=[f"registry.model_name={bad}"])


def test_a_champion_registered_with_the_old_metric_spelling_still_gates(mlc, model_dir):
    """Versions registered before the one spelling carry ``avg@1`` keys; ``--metrics`` may still use them."""
    from dcgrpo import registry

    exp = mlc.get_experiment_by_name("spelling") or mlc.get_experiment(mlc.create_experiment("spelling"))
    name = f"spelling-{uuid.uuid4().hex[:6]}"

    def register(metrics: dict) -> str:
        run_id = mlc.create_run(exp.experiment_id).info.run_id
        return registry.register_model(mlc, name, run_id, str(model_dir), metrics=metrics, final_lambda=0.0,
                                       discrepancy=1e-4, config_hash="h").version  # fmt: skip

    v1 = register({"eval/synthetic/avg@1": 0.5})  # as registered before the rename
    assert registry.promote(mlc, name, v1, "eval/synthetic/avg_1", 1e-3).promoted
    v2 = register(registry.load_metrics('{"eval/synthetic/avg@1": 0.4}'))
    decision = registry.promote(mlc, name, v2, "eval/synthetic/avg_1", 1e-3)
    assert not decision.promoted and "0.5" in decision.reason, decision.reason


def _imports(path: Path) -> set[str]:
    """Every module (and ``module.name``) ``path`` imports, at any depth: inside functions and ``if`` blocks too."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = node.module if node.level == 0 else "dcgrpo.registry"  # relative: inside the package
            found |= {module} | {f"{module}.{a.name}" for a in node.names}
    return found


def test_the_registry_sits_below_serving_and_the_driver_layer():
    """Nothing under src/dcgrpo/registry imports dcgrpo.serving (nor the driver layer, nor ``RunConfig``), not even
    inside a function: serve-on-promote is a hook the caller above passes (issue 24)."""
    package = Path(registry.__file__).parent
    files = sorted(package.rglob("*.py"))
    assert len(files) >= 5, files
    above = ("dcgrpo.serving", "dcgrpo.stages", "dcgrpo.steps", "dcgrpo.cli", "dcgrpo.pipeline")
    bad = sorted(
        f"{f.relative_to(package)}: {m}"
        for f in files
        for m in _imports(f)
        if m in above or m.startswith(tuple(a + "." for a in above)) or m == "dcgrpo.config.RunConfig"
    )
    assert not bad, f"the registry imports a layer above it: {bad}"


def test_the_layer_check_sees_an_import_hidden_in_a_function(tmp_path):
    hidden = tmp_path / "hidden.py"
    hidden.write_text("def f():\n    from dcgrpo import serving\n\n\ndef g():\n    import dcgrpo.serving.x\n")
    assert {"dcgrpo.serving", "dcgrpo.serving.x"} <= _imports(hidden)


def test_best_method_index_ranks_within_the_run_configs_gate_limit():
    """``stages.registration.best_method_index``: ``rank_methods`` with the config's promotion discrepancy limit."""
    from dcgrpo.config import load_config
    from dcgrpo.stages.registration import best_method_index

    gates, ds = [0.9, 0.5], [5e-3, 1e-4]
    assert best_method_index(load_config(overrides=["registry.max_discrepancy=1e-3"]), gates, ds) == 1
    assert best_method_index(load_config(overrides=["registry.max_discrepancy=1e-2"]), gates, ds) == 0
