"""Tiny model factory, offline tokenizer, synthetic data, model loading (local, S3, Hugging Face ids)."""

from __future__ import annotations

import json
import shutil

import boto3
import pandas as pd
import pytest
import torch

from dcgrpo import storage
from dcgrpo.config import RunConfig
from dcgrpo.data.synthetic import make_synthetic, read_rows, write_synthetic_splits
from dcgrpo.errors import DcgrpoError
from dcgrpo.models import ModelFileError, build_tiny_model, load_model_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(RunConfig().model, tmp_path_factory.mktemp("tiny"))


def test_tokenizer_round_trip_and_chat_template(tiny_dir):
    from transformers import AutoTokenizer

    from dcgrpo.engines.vllm_engine import apply_chat_template, encode_prompt

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    text = "12 + 7 = 19. \\boxed{19}"
    ids = encode_prompt(tok, text)
    assert tok.decode(ids) == text
    assert [tok.decode([i]) for i in encode_prompt(tok, "1234")] == ["1", "2", "3", "4"]  # digits split
    prompt = apply_chat_template(tok, [{"role": "user", "content": "What is 1 + 2?"}])
    assert prompt == "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_tiny_qwen3_loads_and_is_deterministic(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.config.model_type == "qwen3" and not model.config.tie_word_embeddings
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, RunConfig().model.vocab_size) and torch.isfinite(logits).all()
    again = AutoModelForCausalLM.from_pretrained(build_tiny_model(RunConfig().model, tmp_path / "again"))
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_tiny_moe_builds(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = RunConfig().model.model_copy(update={"arch": "qwen3-moe"})
    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(cfg, tmp_path))
    assert model.config.model_type == "qwen3_moe" and model.config.num_experts == cfg.num_experts
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_load_model_dir_local_and_s3(tiny_dir, tmp_path, s3_server):
    assert load_model_dir(tiny_dir, tmp_path) == tiny_dir
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model_dir(tmp_path, tmp_path)
    uri = storage.upload_dir(tiny_dir, "s3://dcgrpo-test/models/tiny")
    local = load_model_dir(uri, tmp_path / "cache")
    assert (local / "config.json").read_bytes() == (tiny_dir / "config.json").read_bytes()
    assert load_model_dir(uri, tmp_path / "cache") == local  # cached


def test_load_model_dir_honours_the_configured_endpoint(tiny_dir, tmp_path, s3_server, monkeypatch):
    """model.path=s3://... on MinIO: the endpoint comes from the config (storage.s3_endpoint_url) alone."""
    uri = storage.upload_dir(tiny_dir, "s3://dcgrpo-test/models/tiny-endpoint")
    for var in ("DCGRPO_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    local = load_model_dir(uri, tmp_path / "cache", endpoint_url=s3_server)
    assert (local / "config.json").read_bytes() == (tiny_dir / "config.json").read_bytes()


COMMIT = "0123456789abcdef0123456789abcdef01234567"
HF_VARS = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DCGRPO_MODEL_CACHE", "HF_TOKEN")


@pytest.fixture
def hf_env(monkeypatch, tmp_path):
    """A clean Hugging Face environment with HF_HUB_OFFLINE=1 (read by load_model_dir at call time)."""
    for var in HF_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return monkeypatch


def place_in_hub_cache(model_dir, hub_cache, repo_id: str, commit: str = COMMIT):
    """``model_dir`` laid out as huggingface_hub caches a download: snapshots/<commit>/ and refs/main."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_id_loads_offline_from_hf_home(tiny_dir, tmp_path, hf_env):
    """qwen3-8b's model.path is a Hub id: with HF_HUB_OFFLINE=1 a model already in HF_HOME's cache loads."""
    hf_env.setenv("HF_HOME", str(tmp_path / "hf"))
    snapshot = place_in_hub_cache(tiny_dir, tmp_path / "hf" / "hub", "acme/tiny-qwen3")
    local = load_model_dir("acme/tiny-qwen3", tmp_path / "cache")
    assert local.resolve() == snapshot.resolve()
    assert (local / "config.json").read_bytes() == (tiny_dir / "config.json").read_bytes()
    assert load_model_dir(f"acme/tiny-qwen3@{COMMIT}", tmp_path / "cache").resolve() == snapshot.resolve()
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(local).model_type == "qwen3"


def test_hub_id_uses_the_model_cache_pvc(tiny_dir, tmp_path, hf_env):
    """In a pipeline pod $DCGRPO_MODEL_CACHE is the model-cache PVC: Hub snapshots live in its hub/ folder."""
    hf_env.setenv("DCGRPO_MODEL_CACHE", str(tmp_path / "pvc"))
    snapshot = place_in_hub_cache(tiny_dir, tmp_path / "pvc" / "hub", "acme/tiny-qwen3")
    assert load_model_dir("acme/tiny-qwen3", tmp_path / "unused").resolve() == snapshot.resolve()
    assert not (tmp_path / "unused").exists()


def test_hub_id_missing_offline_is_a_clear_error(tmp_path, hf_env):
    hf_env.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(DcgrpoError, match=r"model\.path: 'acme/no-such-model'.*HF_HUB_OFFLINE=1.*not in the Hub cache"):
        load_model_dir("acme/no-such-model", tmp_path / "cache")
    with pytest.raises(DcgrpoError, match=r"model_uri: 'acme/no-such-model@v2'"):
        load_model_dir("acme/no-such-model@v2", tmp_path / "cache", field="model_uri")


def test_hub_snapshot_without_weights_is_refused(tiny_dir, tmp_path, hf_env):
    hf_env.setenv("HF_HOME", str(tmp_path / "hf"))
    snapshot = place_in_hub_cache(tiny_dir, tmp_path / "hf" / "hub", "acme/tiny-qwen3")
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"hf://acme/tiny-qwen3: not an HF model directory \(no \*\.safetensors"
    ):
        load_model_dir("acme/tiny-qwen3", tmp_path / "cache")


def test_missing_local_path_names_model_path(tmp_path, hf_env):
    for spec in (str(tmp_path / "no-such-dir"), "./no-such-dir", "~/no/such/model"):
        with pytest.raises(DcgrpoError, match=r"model\.path: .*no such local directory, and not an s3:// URI or a "
                                              r"Hugging Face id"):  # fmt: skip
            load_model_dir(spec, tmp_path / "cache")


def test_model_path_config_and_preflight(tmp_path, hf_env):
    """model.path: a Hub id passes config and preflight (the Hub is asked at load time); other schemes do not."""
    from dcgrpo.config import ConfigError, load_config
    from dcgrpo.models import parse_hf_id
    from dcgrpo.preflight import check_run_environment
    from dcgrpo.storage import StorageError

    for preset in ("qwen3-8b", "qwen3-30b-a3b"):
        assert parse_hf_id(load_config(preset=preset).model.path) is not None, preset
    assert parse_hf_id("Qwen/Qwen3-8B-Base@main") == ("Qwen/Qwen3-8B-Base", "main")
    assert load_config(overrides=["model.path="]).model.path is None  # an empty UI field
    for bad, why in (("s3://", "must name a bucket"), ("gs://b/m", "gs:// is not supported"), ("hf://a/b", "hf://")):
        with pytest.raises(ConfigError, match=rf"model\.path: .*{why}"):
            load_config(overrides=[f"model.path={bad}"])
    root = f"storage.root={tmp_path / 'root'}"
    check_run_environment(load_config(overrides=[root, "model.path=acme/not-downloaded-yet"]))
    with pytest.raises(StorageError, match=r"model\.path: \./no-such-dir does not exist"):
        check_run_environment(load_config(overrides=[root, "model.path=./no-such-dir"]))


def _put_dir(local, bucket: str, prefix: str, endpoint: str, skip: tuple[str, ...] = ()) -> str:
    """Upload ``local`` as another tool would: plain put_object per file, no _COMPLETE marker."""
    client = boto3.client("s3", endpoint_url=endpoint)
    client.put_object(Bucket=bucket, Key=f"{prefix}/", Body=b"")  # an S3 console's folder placeholder
    for path in sorted(p for p in local.rglob("*") if p.is_file() and p.name not in skip):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(local).as_posix()}", Body=path.read_bytes())
    return f"s3://{bucket}/{prefix}"


def test_s3_hf_directory_without_our_marker_loads(tiny_dir, tmp_path, s3_server, monkeypatch):
    """An HF model copied to S3 by other tools (no _COMPLETE) is checked by its config and weights, then cached."""
    monkeypatch.setenv("DCGRPO_MODEL_CACHE", str(tmp_path / "pvc"))
    uri = _put_dir(tiny_dir, "dcgrpo-test", "foreign/tiny", s3_server)
    local = load_model_dir(uri, tmp_path / "unused", s3_server)
    assert local.parent == tmp_path / "pvc" and (local / ".download_complete").is_file()
    assert (local / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()
    assert sorted(p.name for p in (tmp_path / "pvc").iterdir()) == [local.name]  # no staging left behind
    assert load_model_dir(uri, tmp_path / "unused", s3_server) == local  # cached


def test_s3_directory_without_marker_or_weights_is_refused(tiny_dir, tmp_path, s3_server, monkeypatch):
    monkeypatch.delenv("DCGRPO_MODEL_CACHE", raising=False)
    uri = _put_dir(tiny_dir, "dcgrpo-test", "foreign/no-weights", s3_server, skip=("model.safetensors",))
    with pytest.raises(FileNotFoundError, match=r"s3://dcgrpo-test/foreign/no-weights: not an HF model directory"):
        load_model_dir(uri, tmp_path / "cache", s3_server)
    assert not any((tmp_path / "cache").iterdir())  # nothing stamped, no staging left


def test_s3_sharded_copy_missing_a_shard_is_refused(tiny_dir, tmp_path, s3_server, monkeypatch):
    """Without a marker, a half-copied sharded model is caught by its shard index."""
    monkeypatch.delenv("DCGRPO_MODEL_CACHE", raising=False)
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_dir, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    uri = _put_dir(sharded, "dcgrpo-test", "foreign/sharded", s3_server)
    with pytest.raises(ModelFileError, match=r"foreign/sharded/model-00002-of-00002\.safetensors: missing"):
        load_model_dir(uri, tmp_path / "cache", s3_server)


def test_synthetic_schema_determinism_and_disjoint_split(tmp_path):
    rows = make_synthetic(50, difficulty=3, seed=7)
    assert rows == make_synthetic(50, difficulty=3, seed=7)
    assert rows != make_synthetic(50, difficulty=3, seed=8)
    r = rows[0]
    assert set(r) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    assert r["prompt"][0]["role"] == "user" and "\\boxed{}" in r["prompt"][0]["content"]
    assert r["reward_model"]["style"] == "rule" and r["reward_model"]["ground_truth"].lstrip("-").isdigit()
    assert r["extra_info"]["solution"].endswith(f"\\boxed{{{r['reward_model']['ground_truth']}}}")
    for d in range(1, 6):
        for row in make_synthetic(20, difficulty=d, seed=0, template="dapo"):
            assert row["extra_info"]["solution"].endswith("Answer: " + row["reward_model"]["ground_truth"])
    cfg = RunConfig().data.model_copy(update={"synthetic_train_size": 300, "synthetic_val_size": 50})
    train_path, val_path = write_synthetic_splits(cfg, tmp_path)
    train, val = read_rows(train_path), read_rows(val_path)
    assert len(train) == 300 and len(val) == 50
    assert not {x["extra_info"]["question"] for x in train} & {x["extra_info"]["question"] for x in val}
    assert pd.read_parquet(train_path).columns.tolist() == [
        "data_source",
        "prompt",
        "ability",
        "reward_model",
        "extra_info",
    ]
    with pytest.raises(ValueError, match="difficulty"):
        make_synthetic(1, difficulty=9)
