"""The compiled pipeline: fresh, parseable, and carrying the cluster settings."""

import json
import re

import pytest
import yaml

from dcgrpo import pipeline
from dcgrpo.cli import main
from dcgrpo.config import ConfigError
from dcgrpo.deploy import DeploymentContract

GPU_STEPS = ("warm-start", "train", "export-fp8", "evaluate")
LIGHT_STEPS = ("prepare-data", "select-best", "register-model", "promote", "mark-failed")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = tmp_path_factory.mktemp("compiled") / "dc_grpo.yaml"
    pipeline.compile_yaml(path)
    return path


@pytest.fixture(scope="module")
def compiled_rayjob(tmp_path_factory):
    path = tmp_path_factory.mktemp("compiled") / "dc_grpo_rayjob.yaml"
    pipeline.compile_yaml(path, train_pod="launcher")
    return path


def test_committed_yaml_is_fresh(compiled, compiled_rayjob):
    for fresh in (compiled, compiled_rayjob):
        committed = pipeline.COMPILED_DIR / fresh.name
        assert committed.is_file(), f"run `dcgrpo compile` and commit pipelines/compiled/{fresh.name}"
        assert committed.read_text() == fresh.read_text(), (
            f"pipelines/compiled/{fresh.name} is stale: run `.venv/bin/dcgrpo compile` and commit it"
        )


def _depth(spec, dag=None) -> int:
    """Levels of groups (exit handler, loop, condition) the deepest task sits in."""
    dag = dag if dag is not None else spec["root"]["dag"]
    inner = [spec["components"][t["componentRef"]["name"]].get("dag") for t in dag["tasks"].values()]
    return max([0] + [1 + _depth(spec, d) for d in inner if d])


def test_the_graph_reads_like_algorithm_1(compiled, compiled_rayjob):
    """Issue 24: prepare -> warm start -> per method (train all rounds -> export -> evaluate) -> select ->
    register -> promote under a gate, in an exit handler: at most 20 tasks, 150 KB and 3 levels of nesting, and no
    compiled-in number of rounds (one train task per method, whatever ``rounds`` is)."""
    for path in (compiled, compiled_rayjob):
        spec = next(yaml.safe_load_all(path.read_text()))
        tasks = _all_tasks(spec)
        assert len(tasks) <= 20 and path.stat().st_size <= 150 * 1024 and _depth(spec) <= 3, path.name
        leaves = [t["taskInfo"]["name"] for _, t in tasks if "dag" not in spec["components"][t["componentRef"]["name"]]]
        groups = [t["taskInfo"]["name"] for _, t in tasks if "dag" in spec["components"][t["componentRef"]["name"]]]
        assert sorted(groups) == ["dc-grpo-run", "gate-passed", "methods"], groups
        train = "train" if path == compiled else "train-launcher"
        assert sorted(leaves) == sorted(
            ["prepare-data", "warm-start", "train", "export-fp8", "evaluate", "select-best", "register-model",
             "promote", "mark-failed"]
        ), leaves  # fmt: skip
        loop = next(c for n, c in spec["components"].items() if n.startswith("comp-for-loop"))["dag"]["tasks"]
        assert set(loop) == {train, "export-fp8", "evaluate"}, path.name
        assert loop[train]["inputs"]["parameters"]["rounds"] == {"componentInputParameter": "pipelinechannel--rounds"}
        assert loop["export-fp8"]["dependentTasks"] == [train] and loop["evaluate"]["dependentTasks"]
        assert pipeline.compiled_train_pod(path) == ("gpu" if path == compiled else "launcher")


def test_yaml_parses_into_pipeline_and_platform_protobufs(compiled):
    spec, executors = pipeline.load_compiled(compiled)
    assert spec.pipeline_info.name == "dc-grpo"
    params = set(spec.root.input_definitions.parameters)
    assert {"preset", "overrides", "data_uri", "model_uri", "methods", "rounds", "mlflow_uri", "model_name"} <= params
    assert executors, "no Kubernetes platform config"


def _executors(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    k8s = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    containers = docs[0]["deploymentSpec"]["executors"]
    return containers, k8s


def test_gpu_steps_request_gpus_on_the_gpu_pool_with_cache_and_secrets(compiled):
    containers, k8s = _executors(compiled)
    for step in GPU_STEPS:
        name = f"exec-{step}"
        resources = containers[name]["container"]["resources"]
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu", step
        assert int(resources["accelerator"]["resourceCount"]) == 1, step
        cfg = k8s[name]
        assert cfg["nodeSelector"]["labels"] == DeploymentContract().gpu_node_selector, step
        assert cfg["tolerations"][0]["key"] == "nvidia.com/gpu", step
        assert cfg["pvcMount"][0]["mountPath"] == "/cache", step
        secrets = {s["secretName"] for s in cfg["secretAsEnv"]}
        assert secrets == {"dcgrpo-s3", "dcgrpo-mlflow", "dcgrpo-hf"}, step  # HF_TOKEN: gated base models


def test_weights_stay_on_the_checkpoint_volume_that_every_gpu_step_and_the_train_task_mount(
    compiled, compiled_rayjob, tmp_path
):
    """Point 8: the warm start, the train task (the launcher too: the RayJob's volume), export and evaluation mount
    the checkpoint volume and are told where (``$DCGRPO_MODEL_STORE``), so Model artifacts reference weights there;
    the light steps never see it."""
    for path in (compiled, compiled_rayjob):
        containers, k8s = _executors(path)
        on_volume = [n for n in k8s if n.startswith(tuple(f"exec-{s}" for s in GPU_STEPS))]
        assert len(on_volume) == 4, on_volume
        for name in on_volume:
            mounts = {m["mountPath"]: m for m in k8s[name]["pvcMount"]}
            assert mounts["/checkpoints"]["constant"] == "dcgrpo-checkpoints", name  # = verl.checkpoint_dir's default
            env = {e["name"]: e["value"] for e in containers[name]["container"]["env"]}
            assert env["DCGRPO_MODEL_STORE"] == "/checkpoints", name
        assert all("/checkpoints" not in json.dumps(k8s[n]) for n in k8s if n not in on_volume)
    bare = pipeline.compile_yaml(tmp_path / "bare.yaml", DeploymentContract(checkpoint_pvc=""), accelerator_limit=8)
    containers, k8s = _executors(bare)
    assert "/checkpoints" not in json.dumps(k8s)
    assert int(containers["exec-train"]["container"]["resources"]["accelerator"]["resourceCount"]) == 8


def test_light_steps_have_cpu_limits_and_no_gpu(compiled, compiled_rayjob):
    for path, extra in ((compiled, ()), (compiled_rayjob, ("train-launcher",))):
        containers, k8s = _executors(path)
        for step in (*LIGHT_STEPS, *extra):
            resources = containers[f"exec-{step}"]["container"]["resources"]
            assert "accelerator" not in resources, step
            assert resources["cpuLimit"] == 2.0, step
            assert "nodeSelector" not in k8s.get(f"exec-{step}", {}), step


def _gb(quantity: str) -> float:
    units = {"K": 1e-6, "M": 1e-3, "G": 1, "T": 1e3}
    return float(quantity[:-1]) * units[quantity[-1]] if quantity[-1] in units else float(quantity) / 1e9


def test_every_task_requests_what_its_work_needs(compiled, compiled_rayjob):
    """Point 9: requests are set on every executor; light steps (the verl launcher included) are small, the GPU
    steps reserve a GPU node's share. (KFP's IR has no ephemeral-storage field: weights travel by reference,
    so no light step writes models to its node's disk.)"""
    for path in (compiled, compiled_rayjob):
        containers, _ = _executors(path)
        assert len(containers) == 9
        for name, executor in containers.items():
            r = executor["container"]["resources"]
            assert r.get("resourceCpuRequest") and r.get("resourceMemoryRequest"), name
            assert float(r["resourceCpuRequest"].rstrip("m")) / (
                1000 if r["resourceCpuRequest"].endswith("m") else 1
            ) <= float(r["resourceCpuLimit"]), name
            assert _gb(r["resourceMemoryRequest"]) <= _gb(r["resourceMemoryLimit"]), name
            gpu = "accelerator" in r
            assert gpu == (name in {f"exec-{s}" for s in GPU_STEPS}), name
            assert (_gb(r["resourceMemoryRequest"]) >= 32) == gpu and (_gb(r["resourceMemoryLimit"]) <= 4 or gpu), name


def test_verl_on_a_rayjob_trains_from_a_launcher_that_requests_no_gpu(compiled_rayjob):
    """Point 9: with verl on a RayJob (the qwen presets) the train task is a launcher pod without a GPU, in the
    package ``dcgrpo submit`` picks for those presets; the graph is the same."""
    from dcgrpo.config import load_config
    from dcgrpo.stages.parameters import train_pod

    assert train_pod(load_config(preset="qwen3-8b")) == "launcher"
    assert train_pod(load_config(preset="tiny-cpu")) == "gpu"
    assert train_pod(load_config(preset="qwen3-8b", overrides=["verl.launch=single-node"])) == "gpu"
    assert pipeline.package_for({"preset": "qwen3-8b"}).name == "dc_grpo_rayjob.yaml"
    assert pipeline.package_for({"preset": "tiny-cpu"}).name == "dc_grpo.yaml"
    containers, k8s = _executors(compiled_rayjob)
    assert "accelerator" not in containers["exec-train-launcher"]["container"]["resources"]
    # No GPU pool placement either (the contract in $DCGRPO_DEPLOYMENT names the pool for the RayJob only)
    assert not {"nodeSelector", "tolerations"} & set(k8s["exec-train-launcher"])
    assert k8s["exec-train-launcher"]["pvcMount"][0]["mountPath"] == "/checkpoints"


def test_a_run_the_package_cannot_train_is_refused_before_anything_starts(capsys, compiled_rayjob):
    """The GPU package asked to train verl on a RayJob (or the other way round): refused naming the package to use,
    by submit before any request and by the pipeline's first step (a run started from the UI)."""
    from dcgrpo.stages.parameters import resolve_pipeline_run

    gpu_package = str(pipeline.COMPILED_PATH)
    assert main(["submit", "--host", "http://127.0.0.1:9", "--preset", "qwen3-8b", "--package", gpu_package]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dc_grpo_rayjob.yaml" in err and "127.0.0.1" not in err
    assert main(["schedule", "--host", "http://127.0.0.1:9", "--cron", "0 0 3 * * 0", "--package",
                 str(compiled_rayjob)]) == 2  # fmt: skip
    assert "run dc_grpo.yaml instead" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="run dc_grpo_rayjob.yaml instead"):
        resolve_pipeline_run("qwen3-8b", [], 0, "", "gpu")
    assert resolve_pipeline_run("qwen3-8b", [], 25, "", "launcher") == (25, "dcgrpo-qwen3-8b")  # no maximum
    assert pipeline.pipeline_arguments("qwen3-8b", rounds=25)["rounds"] == 25  # what submit sends


def test_retries_and_no_secret_values(compiled, compiled_rayjob):
    for path in (compiled, compiled_rayjob):
        text = path.read_text()
        docs = list(yaml.safe_load_all(text))
        body = json.dumps(docs[0])
        assert body.count('"retryPolicy"') == 4  # the train task (GPU or launcher), warm start, export, evaluate
        assert "exit-handler-1" in docs[0]["root"]["dag"]["tasks"]
        # Only secret names and key names appear; no credential values.
        assert "testing" not in text and "password:" not in text.lower()


def test_compile_cli_writes_yaml_with_custom_images(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert main(["compile", "--output", str(out), "--image", "reg/cpu:1", "--trainer-image", "reg/gpu:1",
                 "--train-pod", "launcher", "--gpu-pool", "pool=a100"]) == 0  # fmt: skip
    text = out.read_text()
    assert "reg/cpu:1" in text and "reg/gpu:1" in text and "a100" in text
    assert pipeline.compiled_train_pod(out) == "launcher"
    assert main(["compile", "--output", str(out), "--gpu-pool", "nokey"]) == 2
    assert main(["compile", "--train-pod", "gpu"]) == 2  # without --output both packages are written


def test_pipeline_arguments_are_validated_before_submission():
    args = pipeline.pipeline_arguments("tiny-cpu", ["train.lr=1e-3"], ["grpo", "dc-grpo"])
    assert args["rounds"] == 2 and args["methods"] == ["grpo", "dc-grpo"] and args["model_name"] == "dcgrpo-tiny"
    with pytest.raises(ConfigError, match="method.name"):
        pipeline.pipeline_arguments("tiny-cpu", [], ["grpo", "ppo"])
    with pytest.raises(ConfigError, match="train.lr"):
        pipeline.pipeline_arguments("tiny-cpu", ["train.lr=-1"])


def test_schedule_rejects_five_field_cron():
    with pytest.raises(ValueError, match="6 fields"):
        pipeline.schedule("http://127.0.0.1:9", "0 3 * * 0", {})


def test_retrain_workflow_is_least_privilege_and_follows_the_run():
    """retrain.yml: read-only token, inputs through env (never spliced into a shell line), only the
    submit tooling installed with pyproject's pins, and `submit --wait` so the job fails with the run."""
    import tomllib

    root = pipeline.COMPILED_PATH.parents[2]
    workflow = yaml.safe_load((root / ".github/workflows/retrain.yml").read_text())
    assert workflow["permissions"] == {"contents": "read"}
    assert workflow[True]["schedule"][0]["cron"]  # YAML 1.1 reads the key `on` as True
    steps = workflow["jobs"]["submit"]["steps"]
    runs = " ".join(s.get("run", "") for s in steps)
    assert "${{" not in runs, "expressions belong in env:, not in run: (script injection)"
    assert "dcgrpo compile" in runs and "dcgrpo submit" in runs and "--wait" in runs
    submit = next(s for s in steps if "dcgrpo submit" in s.get("run", ""))
    assert "inputs.rounds" in submit["env"]["ROUNDS"] and submit["env"]["KFP_HOST"] == "${{ vars.KFP_HOST }}"
    # the installed package carries both checked packages; submit picks the preset's (no --package to go stale)
    assert "--package" not in submit["run"] and "diff -q /tmp/dc_grpo_rayjob.yaml" in runs
    install = next(s["run"] for s in steps if "pip install" in s.get("run", ""))
    assert "torch" not in install and "pip install --no-deps ." in install and "-e ." not in install
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(re.findall(r'"([a-z-]+)([=<>][^"]+)"', install))
    for name, spec in pins.items():  # the same pins as pyproject's base dependencies
        assert any(re.sub(r"\s*#.*", "", d).replace(" ", "") == name + spec for d in deps), (name, spec)
    assert {"kfp", "kfp-kubernetes", "pydantic", "pyyaml"} <= set(pins)


def test_submit_path_imports_no_engine_or_torch(tmp_path):
    """What retrain.yml installs is enough: compile and submit import none of the heavy dependencies."""
    import subprocess
    import sys

    blocked = "torch,transformers,vllm,mlflow,boto3,botocore,pandas,pyarrow,numpy,matplotlib,math_verify,rich"
    script = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {blocked.split(",")!r}:
            raise ImportError("submit path imported " + name)
sys.meta_path.insert(0, Block())
from dcgrpo.cli import main
assert main(["compile", "--output", {str(tmp_path / "p.yaml")!r}]) == 0
sys.exit(main(["submit", "--host", "http://127.0.0.1:9", "--preset", "qwen3-8b"]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "127.0.0.1:9 is unreachable" in proc.stderr, proc.stderr[-2000:]


def _all_tasks(spec) -> list[tuple[str, dict]]:
    """(task name, task) of every DAG in the spec: root, exit handler, loop, conditions."""
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    return [item for dag in dags for item in dag["tasks"].items()]


# --- UI defaults (point 13) ----------------------------------------------------------------------------------------


def test_ui_defaults_mean_the_presets_values_and_every_parameter_is_described(compiled):
    spec, _ = pipeline.load_compiled(compiled)
    params = spec.root.input_definitions.parameters
    for name, param in params.items():
        assert len(param.description) > 20, f"parameter {name} has no description for the UI"
    assert params["rounds"].default_value.number_value == 0 and params["model_name"].default_value.string_value == ""
    assert pipeline.pipeline_arguments("qwen3-8b")["rounds"] == 10
    assert pipeline.pipeline_arguments("tiny-cpu")["model_name"] == "dcgrpo-tiny"
    assert pipeline.pipeline_arguments("qwen3-8b", rounds=3, model_name="mine")["model_name"] == "mine"
    # register and promote take the resolved name, not the raw parameter
    spec_dict = next(yaml.safe_load_all(compiled.read_text()))
    users = [t for name, t in _all_tasks(spec_dict) if name.startswith(("register-model", "promote"))]
    assert len(users) == 2
    for task in users:
        assert task["inputs"]["parameters"]["model_name"] in (
            {"taskOutputParameter": {"outputParameterKey": "model_name", "producerTask": "prepare-data"}},
            {"componentInputParameter": "pipelinechannel--prepare-data-model_name"},  # inside the gate's group
        )


def test_side_effect_steps_are_never_cached(compiled):
    spec = next(yaml.safe_load_all(compiled.read_text()))
    tasks = _all_tasks(spec)
    side_effects = [
        (n, t) for n, t in tasks if n.startswith(("register-model", "promote", "mark-failed", "prepare-data"))
    ]
    assert len(side_effects) == 4
    for name, task in side_effects:
        assert not task.get("cachingOptions", {}).get("enableCache"), name
    assert dict(tasks)["warm-start"]["cachingOptions"]["enableCache"] is True  # the rest may be cached


# --- submit and schedule as a cluster user expects (points 6, 11, 12) -------------------------------------------


def test_submit_to_an_unreachable_host_prints_one_line_and_exits_2(capsys, monkeypatch):
    monkeypatch.delenv("KFP_HOST", raising=False)
    assert main(["submit", "--host", "http://127.0.0.1:9", "--preset", "qwen3-8b"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "http://127.0.0.1:9" in err and "unreachable" in err
    monkeypatch.setenv("KFP_HOST", "http://127.0.0.1:9")  # --host is optional when KFP_HOST is set
    assert main(["submit", "--preset", "qwen3-8b"]) == 2
    assert "http://127.0.0.1:9 is unreachable" in capsys.readouterr().err


class _FakeKFP:
    """A KFP API front (healthz only) on a real socket: what a refused token or a host looks like."""

    def __init__(self, status: int, body: dict):
        import http.server
        import threading

        outer = self
        self.headers = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                outer.headers.append(dict(self.headers))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_refused_token_and_multi_user_without_namespace_are_one_line_errors(capsys, monkeypatch):
    fake = _FakeKFP(401, {"error": "unauthenticated"})
    try:
        monkeypatch.setenv("KFP_TOKEN", "expired")
        assert main(["submit", "--host", fake.url]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and fake.url in err and "refused the credentials" in err and "KFP_TOKEN" in err
        assert fake.headers[-1]["Authorization"] == "Bearer expired"
    finally:
        fake.close()
    fake = _FakeKFP(200, {"multi_user": True})
    try:
        assert main(["schedule", "--host", fake.url, "--cron", "0 0 3 * * 0"]) == 2
        assert "--namespace" in capsys.readouterr().err
    finally:
        fake.close()


def test_kfp_api_refusals_become_one_line_errors():
    from kfp_server_api.exceptions import ApiException

    from dcgrpo.errors import ServiceUnavailable

    with pytest.raises(
        ServiceUnavailable, match=r"h: creating a run in experiment 'x' failed \(HTTP 404.*--experiment"
    ):
        with pipeline._kfp_errors("h", "creating a run in experiment 'x'"):
            raise ApiException(status=404, reason="experiment not found")
    with pytest.raises(KeyError):  # a bug stays a bug
        with pipeline._kfp_errors("h", "x"):
            raise KeyError("k")


def test_submit_wait_follows_the_run_and_fails_when_it_fails(capsys, monkeypatch):
    """``--wait``: kfp.Client's wait_for_run_completion decides the exit status (the client is the
    third-party part replaced here; the health check goes to a real socket)."""
    import types

    import kfp

    calls = {}

    class Client:
        def __init__(self, host, existing_token=None, namespace="kubeflow"):
            calls["client"] = (host, namespace)

        def create_run_from_pipeline_package(self, package, **kwargs):
            calls["run"] = kwargs
            return types.SimpleNamespace(run_id="run-1")

        def wait_for_run_completion(self, run_id, timeout, sleep_duration=5):
            return types.SimpleNamespace(state=calls["final"])

    monkeypatch.setattr(kfp, "Client", Client)
    fake = _FakeKFP(200, {"multi_user": False})
    try:
        calls["final"] = "FAILED"
        assert main(["submit", "--host", fake.url, "--wait", "--namespace", "team-a"]) == 1
        assert "run-1 ended FAILED" in capsys.readouterr().err
        assert calls["client"] == (fake.url, "team-a")
        assert calls["run"]["service_account"] is None  # Kubeflow's own run account (manifests/rbac binds ours to it)
        assert calls["run"]["namespace"] == "team-a" and calls["run"]["arguments"]["rounds"] == 2
        calls["final"] = "SUCCEEDED"
        assert main(["submit", "--host", fake.url, "--wait"]) == 0
        assert capsys.readouterr().out.strip() == "run-1 SUCCEEDED"
    finally:
        fake.close()


def test_components_run_from_the_images_and_the_run_stays_far_below_etcds_object_limit(compiled, tmp_path):
    """The compiled components are containerized (``python3 -m kfp.dsl.executor_main``, no source in each of the
    executors), and the whole spec, as the JSON the KFP API server turns into an Argo Workflow, stays well under
    etcd's 1.5 MiB object limit (the 295-task graph of one chain per round count was 0.80 MB; one train task per
    method is about 40 KB)."""
    from kfp.dsl.component_factory import CONTAINERIZED_PYTHON_COMPONENT_COMMAND

    docs = list(yaml.safe_load_all(compiled.read_text()))
    assert sum(len(json.dumps(d, separators=(",", ":"))) for d in docs) < 150 * 1024
    containers, _ = _executors(compiled)
    for name, executor in containers.items():
        assert executor["container"]["command"] == CONTAINERIZED_PYTHON_COMPONENT_COMMAND, name


def test_the_images_kfp_config_runs_a_compiled_component_as_the_cluster_does(compiled, tmp_path):
    """What a pod does: in the image's WORKDIR (``kfp_config.ini`` written by ``components.write_kfp_config``, as
    the Dockerfiles do), run the compiled command and args of ``select_best`` with a real executor input."""
    import subprocess
    import sys

    from dcgrpo import components

    containers, _ = _executors(compiled)
    names = {e["container"]["args"][e["container"]["args"].index("--function_to_execute") + 1]
             for e in containers.values()}  # fmt: skip
    config = components.write_kfp_config(str(tmp_path))
    text = config.read_text()
    assert all(f"{name} = " in text for name in names), (names, text)
    for dockerfile in ("light", "gpu"):
        body = (pipeline.COMPILED_PATH.parents[2] / "containers" / f"Dockerfile.{dockerfile}").read_text()
        assert "components.write_kfp_config('/home/dcgrpo')" in body and body.rstrip().count("WORKDIR /home/dcgrpo")

    executor = containers["exec-select-best"]["container"]
    ref = {"model_uri": "s3://b/m", "fp8_uri": "s3://b/f", "metadata": {"discrepancy": 1e-5}}
    out = tmp_path / "out"
    executor_input = {
        "inputs": {"parameterValues": {"preset": "tiny-cpu", "overrides": [], "methods": ["grpo", "dc-grpo"],
                                       "gate_values": [0.25, 0.5], "references": [ref, ref]}},
        "outputs": {"parameters": {"reference": {"outputFile": str(out / "reference")},
                                   "method": {"outputFile": str(out / "method")},
                                   "gate_value": {"outputFile": str(out / "gate_value")}},
                    "outputFile": str(out / "executor_output.json")},
    }  # fmt: skip
    args = [a.replace("{{$}}", json.dumps(executor_input)) for a in executor["args"]]
    command = [sys.executable if c == "python3" else c for c in executor["command"]]
    proc = subprocess.run([*command, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = json.loads((out / "executor_output.json").read_text())
    assert "dc-grpo" in json.dumps(written), written
