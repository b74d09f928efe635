"""The storage layer against local disk and a real S3 endpoint (moto server)."""

import subprocess
import sys
from pathlib import Path

import pytest

from dcgrpo import storage
from dcgrpo.config import ConfigError, load_config
from dcgrpo.data.synthetic import read_rows, write_synthetic_splits
from tests.conftest import TEST_BUCKET

DCGRPO = str(Path(sys.executable).with_name("dcgrpo"))


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    request.getfixturevalue("s3_server")
    return f"s3://{TEST_BUCKET}/{request.node.name.replace('[', '-').rstrip(']')}"


def test_write_read_exists_round_trip(root):
    uri = storage.join(root, "a", "b.txt")
    assert not storage.exists(uri)
    storage.write_text(uri, "hello")
    assert storage.exists(uri)
    assert storage.read_text(uri) == "hello"
    with pytest.raises(FileNotFoundError, match="b2.txt"):
        storage.read_text(storage.join(root, "a", "b2.txt"))


def test_directory_round_trip_with_completion_marker(root, tmp_path):
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(b"\x00\x01" * 1000)
    (src / "sub" / "config.json").write_text("{}")
    uri = storage.join(root, "ckpt")
    storage.upload_dir(src, uri)
    out = storage.download_dir(uri, tmp_path / "back")
    assert (out / "model.safetensors").read_bytes() == b"\x00\x01" * 1000
    assert (out / "sub" / "config.json").read_text() == "{}"
    with storage.local_copy(uri) as local:
        assert (local / "sub" / "config.json").is_file()


def test_half_uploaded_s3_directory_is_refused(s3_server, tmp_path):
    uri = f"s3://{TEST_BUCKET}/half/ckpt"
    storage.write_bytes(uri + "/model.safetensors", b"partial")  # no _COMPLETE marker
    with pytest.raises(storage.StorageError, match="incomplete upload"):
        storage.download_dir(uri, tmp_path / "x")


def test_unreachable_endpoint_and_missing_bucket_fail_clearly(s3_server, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such bucket"):
        storage.read_text("s3://no-such-bucket/x.txt")
    monkeypatch.setenv("DCGRPO_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(storage.StorageError, match="s3://dcgrpo-test/x.txt: S3 unreachable"):
        storage.read_text(f"s3://{TEST_BUCKET}/x.txt")


def test_local_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    storage.write_text(target, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(storage.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        storage.write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"], "no temp file left behind"


@pytest.mark.parametrize("uri", ["s3://", "s3:///runs", "s3:/bucket/runs"])
def test_s3_uri_without_bucket_is_refused_not_made_local(uri):
    with pytest.raises(storage.StorageError, match="names no bucket"):
        storage.join(uri, "runs", "x")
    with pytest.raises(storage.StorageError, match="names no bucket"):
        storage.split_s3(uri)
    with pytest.raises(ConfigError, match="storage.root: an s3:// root must name a bucket"):
        load_config(overrides=[f"storage.root={uri}"])


def test_train_with_a_bucketless_root_exits_2_naming_the_field(tmp_path):
    proc = subprocess.run([DCGRPO, "train", "--set", "storage.root=s3://"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "storage.root" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == [], "nothing written locally"


def test_every_read_honours_the_configured_endpoint(s3_server, tmp_path, monkeypatch):
    """Data on MinIO: the endpoint comes from the config (or $AWS_ENDPOINT_URL_S3), not only $DCGRPO_S3_ENDPOINT_URL."""
    cfg = load_config(overrides=["data.synthetic_train_size=8", "data.synthetic_val_size=4"])
    train, _ = write_synthetic_splits(cfg.data, tmp_path)
    uri = f"s3://{TEST_BUCKET}/endpoint/train.parquet"
    storage.write_bytes(uri, train.read_bytes())
    monkeypatch.delenv("DCGRPO_S3_ENDPOINT_URL")  # what a user with only storage.s3_endpoint_url set has
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert len(read_rows(uri, endpoint_url=s3_server)) == 8
    assert "endpoint" in storage.list_dirs(f"s3://{TEST_BUCKET}", endpoint_url=s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    assert storage.read_bytes(uri) == train.read_bytes()
