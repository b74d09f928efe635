"""Tiny model factory, offline tokenizer, synthetic data, model loading from S3."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from dcgrpo import storage
from dcgrpo.config import RunConfig
from dcgrpo.data.synthetic import make_synthetic, read_rows, write_synthetic_splits
from dcgrpo.models import build_tiny_model, load_model_dir


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
