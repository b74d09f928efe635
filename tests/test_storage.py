"""The storage layer against local disk and a real S3 endpoint (moto server)."""

import pytest

from dcgrpo import storage
from tests.conftest import TEST_BUCKET


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
