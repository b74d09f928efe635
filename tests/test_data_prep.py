"""DAPO-Math-17K preparation and benchmark loading on real rows (the package's samples), the Hugging Face Hub
path offline from a cache the test builds, the published form and bad inputs."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dcgrpo import storage
from dcgrpo.data import dapo
from dcgrpo.data.benchmarks import BENCHMARKS, BenchmarkError, load_benchmark
from dcgrpo.data.dapo import DapoSchemaError, prepare_dapo


def _read(path):
    return pq.read_table(io.BytesIO(storage.read_bytes(path))).to_pylist()


def test_real_counts(sample_data, tmp_path):
    s = prepare_dapo(str(sample_data / "dapo_math_17k.sample.parquet"), str(tmp_path), template="dapo", seed=0)
    # The sample holds 7 exact-duplicate pairs and 2 problems with two different answers (rows 35/179, 282/7665;
    # samples/PROVENANCE.md). The full SvS file gives 17,917 -> 650 duplicates, 12 conflict groups -> 17,243.
    assert (s.rows_in, s.bad_rows, s.duplicates, s.conflict_groups, s.conflict_rows, s.rows_out) == (
        406, 0, 7, 2, 4, 395,
    )  # fmt: skip
    assert (s.train_rows, s.val_rows) == (387, 8)  # val_fraction 0.02 of 395
    train, val = _read(tmp_path / "train.parquet"), _read(tmp_path / "val.parquet")
    assert len(train) == 387 and len(val) == 8
    row = train[0]
    assert set(row) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"].startswith(dapo.DAPO_PREFIX)
    assert row["reward_model"]["style"] == "rule" and row["extra_info"]["split"] == "train"
    problems = [r["extra_info"]["problem"] for r in train + val]
    assert len(set(problems)) == len(problems)  # no duplicates, no train/val leak
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rows_out"] == 395


def test_split_is_deterministic_by_seed(sample_data, tmp_path):
    src = str(sample_data / "dapo_math_17k.sample.parquet")
    a = prepare_dapo(src, str(tmp_path / "a"), seed=1, template="boxed")
    b = prepare_dapo(src, str(tmp_path / "b"), seed=1, template="boxed")
    c = prepare_dapo(src, str(tmp_path / "c"), seed=2, template="boxed")
    assert a.rows_out == b.rows_out == c.rows_out
    va, vb, vc = (_read(tmp_path / d / "val.parquet") for d in "abc")
    assert va == vb and va != vc
    assert "\\boxed{}" in va[0]["prompt"][0]["content"]


def _published_form(rows, repeats):
    """The HF file's shape: DAPO template, UUID index, every row repeated."""
    out = []
    for r in rows:
        uid = str(uuid.UUID(int=hash(r["problem"]) & (2**128 - 1)))
        for _ in range(repeats):
            out.append(
                {
                    "data_source": "math_dapo",
                    "prompt": [{"content": dapo.PROMPT_TEMPLATES["dapo"].format(problem=r["problem"]), "role": "user"}],
                    "ability": "MATH",
                    "reward_model": {"ground_truth": r["answer"], "style": "rule-lighteval/MATH_v2"},
                    "extra_info": {"index": uid},
                }
            )
    return out


def test_published_form_matches_deduplicated_form(sample_data, tmp_path):
    rows = [json.loads(line) for line in (sample_data / "dapo_math_17k.sample.jsonl").read_text().splitlines()[:300]]
    pub = tmp_path / "published.parquet"
    pq.write_table(pa.Table.from_pylist(_published_form(rows, 100)), pub)
    orig = tmp_path / "orig.jsonl"
    orig.write_text("\n".join(json.dumps(r) for r in rows))
    sp = prepare_dapo(str(pub), str(tmp_path / "p"), seed=3)
    so = prepare_dapo(str(orig), str(tmp_path / "o"), seed=3)
    assert sp.form == "published" and sp.rows_in == 30000
    assert sp.rows_out == so.rows_out
    assert sp.duplicates == 30000 - 300 + so.duplicates
    strip = lambda rs: [(r["prompt"], r["reward_model"]["ground_truth"]) for r in rs]  # noqa: E731
    assert strip(_read(tmp_path / "p" / "train.parquet")) == strip(_read(tmp_path / "o" / "train.parquet"))


def test_bad_rows_reported_by_index(tmp_path):
    good = {"problem": "What is 1+1?", "answer": "2"}
    lines = [good, {"problem": "", "answer": "3"}, {"problem": "Q2", "answer": ""}, {"problem": "Q3", "answer": 5}]
    lines += [{"problem": f"Q{i}", "answer": str(i)} for i in range(10, 20)]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines))
    s = prepare_dapo(str(src), str(tmp_path / "out"))
    assert s.bad_rows == 3 and s.rows_out == 11
    assert s.bad_row_examples == [
        "row 1: problem is empty",
        "row 2: answer is empty",
        "row 3: answer is int, expected a string",
    ]
    with pytest.raises(DapoSchemaError, match="3 bad rows"):
        prepare_dapo(str(src), str(tmp_path / "strict"), max_bad_rows=0)
    assert not (tmp_path / "strict").exists()  # nothing half-written


def test_bad_parquet_rows_reported(tmp_path):
    rows = _published_form([{"problem": f"P{i}", "answer": str(i)} for i in range(5)], 1)
    rows[2]["reward_model"]["ground_truth"] = None
    rows[4]["prompt"] = []
    src = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    s = prepare_dapo(str(src), str(tmp_path / "out"))
    assert s.bad_row_examples == [  # the wording training uses when it refuses the same rows
        "row 2: reward_model.ground_truth is null",
        "row 4: prompt is empty (no messages)",
    ]
    assert s.rows_out == 3


def test_wrong_schema_fails_clearly(tmp_path):
    src = tmp_path / "other.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "q", "label": 1}]), src)
    with pytest.raises(DapoSchemaError, match=r"other.parquet: missing column\(s\) \['prompt', 'reward_model'\]"):
        prepare_dapo(str(src), str(tmp_path / "out"))
    pq.write_table(
        pa.Table.from_pylist([{"prompt": [{"content": "q", "role": "user"}], "reward_model": {"ground_truth": 3}}]), src
    )
    with pytest.raises(DapoSchemaError, match="reward_model.ground_truth' has type int64"):
        prepare_dapo(str(src), str(tmp_path / "out"))
    src.write_bytes(b"not parquet")
    with pytest.raises(DapoSchemaError, match="not a readable parquet"):
        prepare_dapo(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_s3_round_trip(sample_data, s3_server, tmp_path):
    rows = [json.loads(line) for line in (sample_data / "dapo_math_17k.sample.jsonl").read_text().splitlines()[:200]]
    storage.write_text("s3://dcgrpo-test/in/dapo.jsonl", "\n".join(json.dumps(r) for r in rows))
    s = prepare_dapo("s3://dcgrpo-test/in/dapo.jsonl", "s3://dcgrpo-test/prepared", seed=0)
    assert s.rows_out == len(_read("s3://dcgrpo-test/prepared/train.parquet")) + s.val_rows
    assert storage.exists("s3://dcgrpo-test/prepared/summary.json")


def hub_cache(hf_home, repo_id: str, files: dict[str, bytes], commit: str = "0" * 40) -> None:
    """A dataset repository in the standard Hugging Face cache layout (what a download leaves behind):
    ``hub/datasets--<owner>--<name>/{blobs,snapshots/<commit>,refs/main}``."""
    import hashlib

    repo = hf_home / "hub" / f"datasets--{repo_id.replace('/', '--')}"
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def _parquet_bytes(rows) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty HF_HOME with the hub offline; set after dcgrpo and huggingface_hub were imported, as a user's
    notebook or a pod's environment may do: the loaders read the environment at call time."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_benchmarks_load_from_the_hub_cache_offline(sample_data, offline_hub):
    math500 = [
        {"problem": r["problem"], "answer": r["answer"], "unique_id": r["id"]} for r in load_benchmark("math500")
    ]
    hub_cache(offline_hub, BENCHMARKS["math500"].hub_id, {"test.jsonl": "\n".join(map(json.dumps, math500)).encode()})
    amc = [
        {"question": r["problem"], "answer": float(r["answer"]), "id": i} for i, r in enumerate(load_benchmark("amc23"))
    ]
    decoy = [{"question": "not the test split", "answer": 1.0, "id": 0}]
    hub_cache(offline_hub, BENCHMARKS["amc23"].hub_id, {"data/test-00000-of-00001.parquet": _parquet_bytes(amc),
                                                        "data/train-00000-of-00001.parquet": _parquet_bytes(decoy)})  # fmt: skip
    rows = load_benchmark("math500", "hub")
    assert [(r["id"], r["problem"], r["answer"]) for r in rows] == [
        (r["id"], r["problem"], r["answer"]) for r in load_benchmark("math500", sample_data)
    ]
    rows = load_benchmark("amc", "hub")  # an alias; only the test split's file
    assert [r["problem"] for r in rows] == [r["problem"] for r in load_benchmark("amc23", sample_data)]
    assert [r["answer"] for r in rows] == [r["answer"] for r in load_benchmark("amc23", sample_data)]  # 27.0 -> 27


def test_an_offline_hub_miss_is_one_line_naming_the_id_and_the_fix(offline_hub):
    with pytest.raises(BenchmarkError) as err:
        load_benchmark("aime24", "hub")
    msg = str(err.value)
    assert "\n" not in msg and "HuggingFaceH4/aime_2024" in msg and "HF_HUB_OFFLINE=1" in msg
    assert str(offline_hub / "hub") in msg and "s3://" in msg  # where it looked, and the alternatives


def test_dapo_from_the_hub_cache_offline_in_its_published_form(sample_data, offline_hub, tmp_path):
    """``dcgrpo prepare --source hub`` in a fresh process, as a user runs it: the Hub's file (each problem 100x, the
    DAPO template, UUID indexes) from the cache prepares exactly like the de-duplicated copy."""
    rows = [json.loads(line) for line in (sample_data / "dapo_math_17k.sample.jsonl").read_text().splitlines()]
    hub_cache(offline_hub, dapo.HUB_REPO, {dapo.HUB_FILE: _parquet_bytes(_published_form(rows, 100))})
    cmd = [sys.executable, "-m", "dcgrpo.cli", "prepare", "--source", "hub", "--template", "dapo",
           "--out", str(tmp_path / "hub"), "--no-track",
           "--set", "data.max_prompt_length=1024"]  # every DAPO prompt fits: this test is about the hub cache  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"hf://{dapo.HUB_REPO}/{dapo.HUB_FILE} (published form" in proc.stdout
    local = prepare_dapo(str(sample_data / "dapo_math_17k.sample.jsonl"), str(tmp_path / "local"))
    hub = json.loads((tmp_path / "hub" / "summary.json").read_text())
    assert hub["rows_in"] == 100 * len(rows) and hub["rows_out"] == local.rows_out
    assert hub["conflict_groups"] == local.conflict_groups
    strip = lambda rs: [(r["prompt"], r["reward_model"]["ground_truth"]) for r in rs]  # noqa: E731
    assert strip(_read(tmp_path / "hub" / "train.parquet")) == strip(_read(tmp_path / "local" / "train.parquet"))

    miss = subprocess.run([*cmd[:5], "hf://someone/missing-set", "--out", str(tmp_path / "m"), "--no-track"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert miss.returncode != 0 and not (tmp_path / "m").exists()
    assert "someone/missing-set" in miss.stderr and "HF_HUB_OFFLINE=1" in miss.stderr
    assert "Traceback" not in miss.stderr


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_benchmarks_normalised(sample_data, name):
    rows = load_benchmark(name, sample_data)
    assert len(rows) == 24 and rows == load_benchmark(name, "samples")  # the default source is the same files
    for r in rows:
        assert isinstance(r["id"], str) and r["problem"] and isinstance(r["answer"], str) and r["answer"]


def test_benchmark_errors(tmp_path):
    (tmp_path / "aime24.jsonl").write_text('{"id": "a", "problem": "p", "answer": "1"}\n{"id": "b", "problem": "q"}\n')
    with pytest.raises(BenchmarkError, match=r"aime24.jsonl: line 2: field 'answer'"):
        load_benchmark("aime24", tmp_path)
    with pytest.raises(BenchmarkError, match="amc23.jsonl does not exist"):
        load_benchmark("amc23", tmp_path)
    with pytest.raises(BenchmarkError, match="unknown benchmark 'gsm9k'"):
        load_benchmark("gsm9k", tmp_path)


def test_synthetic_benchmark_carries_prompts():
    rows = load_benchmark("synthetic")
    assert rows and all(r["prompt"] and r["answer"] for r in rows)


# ------------------------------------------------------------------ prompt length (data.max_prompt_length)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from dcgrpo.config import load_config
    from dcgrpo.models import run_tokenizer

    return run_tokenizer(load_config())  # the tiny model's, as `dcgrpo prepare` uses it without model.path


def test_prompts_over_the_limit_are_dropped_and_counted_with_the_runs_tokenizer(sample_data, tmp_path, tiny_tokenizer):
    from dcgrpo.data.schema import prompt_lengths
    from dcgrpo.data.synthetic import read_rows

    src = str(sample_data / "dapo_math_17k.sample.parquet")
    full = prepare_dapo(src, str(tmp_path / "all"), template="boxed")
    s = prepare_dapo(src, str(tmp_path / "fit"), template="boxed", tokenizer=tiny_tokenizer, max_prompt_length=128)
    assert 0 < s.too_long < full.rows_out and s.rows_out == full.rows_out - s.too_long
    kept = read_rows(s.train_path) + read_rows(s.val_path)
    assert len(kept) == s.rows_out and max(prompt_lengths(kept, tiny_tokenizer)) <= 128
    assert "too_long" in s.table() and s.metrics()["data/too_long"] == s.too_long
    with pytest.raises(DapoSchemaError, match=r"every prompt is longer than data.max_prompt_length=16 tokens "
                                              r"\(shortest \d+"):  # fmt: skip
        prepare_dapo(src, str(tmp_path / "none"), template="boxed", tokenizer=tiny_tokenizer, max_prompt_length=16)
    assert not (tmp_path / "none").exists(), "nothing written"


def test_train_refuses_a_too_long_prompt_before_any_engine_or_run(sample_data, tmp_path):
    """The README's DAPO path without preparation for this model: one line naming file, rows and the limit."""
    prepared = prepare_dapo(str(sample_data / "dapo_math_17k.sample.parquet"), str(tmp_path / "dapo"))
    dcgrpo = str(Path(sys.executable).with_name("dcgrpo"))
    proc = subprocess.run(
        [dcgrpo, "train", "--set", f"data.train_path={prepared.train_path}", "--set", f"data.val_path={prepared.val_path}",
         "--set", f"storage.root={tmp_path / 'root'}", "--set", "model.sft_steps=0"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={k: v for k, v in os.environ.items()
                                                                         if k != "MLFLOW_TRACKING_URI"},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        f"{prepared.train_path}: " in proc.stderr
        and "prompts are longer than data.max_prompt_length=128" in proc.stderr
    )
    assert "row 0: " in proc.stderr and "Traceback" not in proc.stderr and "vLLM" not in proc.stderr
    db = tmp_path / "root" / "mlflow.db"
    if db.exists():  # the orphan check may open the local store; no run was created in it
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{db}")
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
