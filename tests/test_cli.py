"""The `dcgrpo` command line as a user runs it: real subprocesses, real exit codes."""

import subprocess
import sys
from pathlib import Path

import pytest

DCGRPO = str(Path(sys.executable).with_name("dcgrpo"))


def run(*args, cwd=None, timeout=600):
    return subprocess.run([DCGRPO, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


@pytest.mark.parametrize(
    "args, field",
    [
        (["config", "--set", "method.budget=-1"], "method.budget"),
        (["train", "--method", "ppo"], "method.name"),
        (["demo", "--set", "train.group_size=1"], "train.group_size"),
        (["compile", "--set", "train.lr=1"], "compile takes no run config"),
        (["train", "--preset", "qwen3-8b"], "train.backend=verl"),
        (["compile", "--accelerator-limit", "0"], "--accelerator-limit 0"),
    ],
)
def test_bad_config_exits_2_naming_the_field(args, field, tmp_path):
    proc = run(*args, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert field in proc.stderr and "Traceback" not in proc.stderr


def test_help_verbose_and_host(tmp_path):
    """`dcgrpo --help` says what the tool is; -v works after the command too; `submit` without --host or $KFP_HOST
    is one line naming both (not argparse's "required" when the default comes from the environment)."""
    import os

    top = run("--help", cwd=tmp_path, timeout=120).stdout
    assert "DC-GRPO" in top and "Kubeflow" in top and "thin shell" not in top
    proc = run("config", "-v", "--set", "method.budget=-1", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" in proc.stderr  # -v after the command: the traceback is shown
    env = {k: v for k, v in os.environ.items() if k != "KFP_HOST"}
    proc = subprocess.run([DCGRPO, "submit"], capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env)
    assert proc.returncode == 2 and "--host" in proc.stderr and "KFP_HOST" in proc.stderr
    assert "required" not in run("submit", "--help", cwd=tmp_path, timeout=120).stdout


def test_demo_refuses_a_bad_method_before_starting_mlflow(tmp_path):
    proc = run("demo", "--methods", "grpo,foo", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "method.name" in proc.stderr and "foo" in proc.stderr
    assert not (tmp_path / "outputs").exists()  # no server started, nothing written


def test_missing_files_exit_2_with_the_path(tmp_path):
    proc = run("evaluate", "--model", str(tmp_path / "nope"), "--no-track", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "nope" in proc.stderr
    proc = run("config", "--config", str(tmp_path / "missing.yaml"), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "missing.yaml" in proc.stderr


@pytest.mark.parametrize("bad", ["model", "benchmark"])
def test_evaluate_input_errors_leave_no_mlflow_run(bad, tmp_path, mlflow_server):
    """Checked before the MLflow run is created: no empty FAILED run is left behind (tracked mode)."""
    import uuid

    from mlflow.tracking import MlflowClient

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    experiment = f"eval-{uuid.uuid4().hex[:6]}"
    args = ["evaluate", "--model", str(tmp_path / "nope") if bad == "model" else str(model), "--benchmarks",
            "aime24" if bad == "model" else "no-such-bench", "--set", f"tracking.mlflow_uri={mlflow_server}",
            "--set", f"tracking.experiment={experiment}", "--out", str(tmp_path / "eval")]  # fmt: skip
    proc = run(*args, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert ("--model: " in proc.stderr and "nope does not exist" in proc.stderr) if bad == "model" else (
        "no-such-bench" in proc.stderr)  # fmt: skip
    assert MlflowClient(mlflow_server).get_experiment_by_name(experiment) is None, "a run was created"


@pytest.mark.slow
def test_train_smoke_writes_a_checkpoint_and_logs_to_a_local_store(tmp_path):
    proc = run(
        "train", "--method", "dc-grpo",
        "--set", "model.sft_steps=20", "--set", "train.rounds=1", "--set", "train.steps_per_round=2",
        "--set", "train.prompts_per_batch=4", "--set", "train.ppo_mini_batch=2",
        "--set", "data.synthetic_val_size=16", "--set", f"storage.root={tmp_path / 'out'}",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2" in proc.stdout and "checkpoint" in proc.stdout
    ckpts = list((tmp_path / "out").rglob("checkpoints/step_000002/model.safetensors"))
    assert ckpts, "no checkpoint written"
    assert (ckpts[0].parent / "trainer" / "optimizer.safetensors").is_file()
    assert list((tmp_path / "out").rglob("mlflow*.db")) or list((tmp_path / "out").rglob("*.db")), (
        "no local MLflow store"
    )


def test_error_boundary_separates_user_errors_from_bugs():
    """User-fixable errors (ours, files, servers) become one line; anything else is a bug and keeps its traceback."""
    import requests
    from botocore.exceptions import NoCredentialsError
    from mlflow.exceptions import MlflowException

    from dcgrpo.cli import user_error_message
    from dcgrpo.errors import DataError
    from dcgrpo.storage import StorageError

    assert user_error_message(DataError("train.parquet: row 3: prompt is null")) == (
        "train.parquet: row 3: prompt is null"
    )
    assert "s3://b" in user_error_message(StorageError("s3://b: no such bucket"))
    assert user_error_message(FileNotFoundError("x.yaml")) == "x.yaml"
    assert user_error_message(requests.exceptions.ConnectionError("http://h:9 refused")).startswith(
        "server unreachable: http://h:9"
    )
    assert user_error_message(NoCredentialsError()).startswith("S3: Unable to locate credentials")
    message = user_error_message(MlflowException("Run 'abc' not found\n  more\n  lines"))
    assert message == "MLflow: Run 'abc' not found more lines"  # one line
    for bug in (KeyError("k"), TypeError("t"), IndexError("i"), ValueError("v")):
        assert user_error_message(bug) is None


def test_a_bug_keeps_its_traceback(tmp_path):
    """A ValueError from inside a library call is not dressed up as a user error."""
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from dcgrpo import cli; "
         "cli.COMMANDS['config'] = (lambda a: [][1], 'x', None); sys.exit(cli.main(['config']))"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "IndexError" in proc.stderr
