"""One storage layer: local paths and ``s3://bucket/key`` through boto3.

Everything that reads or writes artifacts (datasets, checkpoints, exports,
reports) goes through here, so a pipeline step works the same on a laptop
(local disk), in tests (moto server) and on a cluster (S3/MinIO).

Writes are atomic: a local file is written to a temporary name and renamed;
an S3 object appears only when its upload completes. A directory upload to
S3 writes a ``_COMPLETE`` marker last, and ``download_dir`` refuses a prefix
without it, so a half-uploaded checkpoint is never mistaken for a whole one.

The S3 endpoint comes from the argument (callers pass
``cfg.storage.s3_endpoint_url``), else ``$DCGRPO_S3_ENDPOINT_URL``, else
``$AWS_ENDPOINT_URL_S3``, else boto3's own resolution (config files, AWS).
Every reader and writer takes ``endpoint_url``: data on MinIO must not be
looked for on the public AWS endpoint.

``s3://`` URIs must name a bucket: ``s3://`` or ``s3:///x`` is refused rather
than joined into a local path such as ``./s3:/runs``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dcgrpo.errors import DcgrpoError

COMPLETE_MARKER = "_COMPLETE"


class StorageError(DcgrpoError, RuntimeError):
    """A path cannot be read or written (names the URI and the reason)."""


def is_s3(uri: str | os.PathLike) -> bool:
    """True for anything spelled ``s3:...``: a malformed S3 URI is an error, never a local path."""
    return str(uri).startswith("s3:")


def check_s3_uri(uri: str, field: str | None = None) -> str:
    """Return ``uri`` if it is ``s3://bucket[/key]``; else raise naming ``field`` (or the URI)."""
    bucket = uri[len("s3://") :].partition("/")[0] if uri.startswith("s3://") else ""
    if not bucket:
        where = f"{field}: " if field else ""
        raise StorageError(f"{where}{uri!r} names no bucket (expected s3://bucket/prefix)")
    return uri


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_s3(uri):
        raise StorageError(f"{uri}: not an s3:// URI")
    bucket, _, key = check_s3_uri(uri)[len("s3://") :].partition("/")
    return bucket, key.strip("/")


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts for local paths and s3:// URIs alike (an s3:// base must name a bucket)."""
    base = str(base)
    if is_s3(base):
        check_s3_uri(base)
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def local_root(root: str | os.PathLike) -> Path:
    """Where local-only state of a run lives (work dirs, sqlite MLflow store): ``root``, or ``./outputs``
    when ``root`` is on S3 (a sqlite file or a vLLM model directory cannot live in a bucket)."""
    return Path("outputs") if is_s3(root) else Path(root)


def resolve_endpoint(endpoint_url: str | None = None) -> str | None:
    """The S3 endpoint: the argument, else ``$DCGRPO_S3_ENDPOINT_URL``, else ``$AWS_ENDPOINT_URL_S3``."""
    return endpoint_url or os.environ.get("DCGRPO_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or None


def s3_client(endpoint_url: str | None = None, *, connect_timeout: float = 5, read_timeout: float = 60,
              max_attempts: int = 3, fresh: bool = False):  # fmt: skip
    """A boto3 S3 client on the resolved endpoint. Short connect timeout: an unreachable endpoint
    fails in seconds, not minutes (preflight uses even shorter ones). ``fresh``: a new session, which
    resolves the credentials again (the default session caches the first ones it found)."""
    import boto3  # boto3: `dcgrpo submit` runs without it
    from botocore.config import Config  # botocore: `dcgrpo submit` runs without it

    config = Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                    retries={"max_attempts": max_attempts, "mode": "standard"})  # fmt: skip
    factory = boto3.session.Session().client if fresh else boto3.client
    return factory("s3", endpoint_url=resolve_endpoint(endpoint_url), config=config)


def _s3_call(uri: str, fn, *args, **kwargs):
    from botocore.exceptions import BotoCoreError, ClientError  # botocore: `dcgrpo submit` runs without it

    try:
        return fn(*args, **kwargs)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NotFound"):
            raise FileNotFoundError(f"{uri}: no such object") from exc
        if code == "NoSuchBucket":
            raise FileNotFoundError(f"{uri}: no such bucket") from exc
        raise StorageError(f"{uri}: S3 error {code}: {exc}") from exc
    except BotoCoreError as exc:
        raise StorageError(f"{uri}: S3 unreachable or misconfigured: {exc}") from exc


def exists(uri: str | os.PathLike, endpoint_url: str | None = None) -> bool:
    uri = str(uri)
    if not is_s3(uri):
        return Path(uri).exists()
    bucket, key = split_s3(uri)
    client = s3_client(endpoint_url)
    try:
        _s3_call(uri, client.head_object, Bucket=bucket, Key=key)
        return True
    except FileNotFoundError:
        listing = _s3_call(uri, client.list_objects_v2, Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
        return listing.get("KeyCount", 0) > 0


def list_dirs(uri: str | os.PathLike, endpoint_url: str | None = None) -> list[str]:
    """Names of the immediate subdirectories of ``uri`` (S3: common prefixes); [] if there is none."""
    uri = str(uri)
    if not is_s3(uri):
        path = Path(uri)
        return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
    bucket, key = split_s3(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    names: list[str] = []
    pages = (
        s3_client(endpoint_url).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
    )
    for page in _s3_call(uri, list, pages):
        names += [p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
    return sorted(names)


def read_bytes(uri: str | os.PathLike, endpoint_url: str | None = None) -> bytes:
    uri = str(uri)
    if not is_s3(uri):
        path = Path(uri)
        if not path.is_file():
            raise FileNotFoundError(f"{uri}: no such file")
        return path.read_bytes()
    bucket, key = split_s3(uri)
    obj = _s3_call(uri, s3_client(endpoint_url).get_object, Bucket=bucket, Key=key)
    return obj["Body"].read()


def read_text(uri: str | os.PathLike, endpoint_url: str | None = None) -> str:
    return read_bytes(uri, endpoint_url).decode("utf-8")


def write_bytes(uri: str | os.PathLike, data: bytes, endpoint_url: str | None = None) -> str:
    """Write atomically (temp file + rename locally; single PUT on S3). Returns the URI."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _s3_call(uri, s3_client(endpoint_url).put_object, Bucket=bucket, Key=key, Body=data)
        return uri
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return uri


def write_text(uri: str | os.PathLike, text: str, endpoint_url: str | None = None) -> str:
    return write_bytes(uri, text.encode("utf-8"), endpoint_url)


def upload_dir(local_dir: str | os.PathLike, uri: str, endpoint_url: str | None = None) -> str:
    """Copy a local directory to ``uri`` (local or S3); the completion marker is written last.

    A failed copy (a full disk, a lost endpoint) removes what it wrote (the local staging folder, the S3 objects
    it put) and raises ``StorageError`` naming ``uri``: nothing half-written stays behind to fill the disk.
    """
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise FileNotFoundError(f"{local_dir}: not a directory")
    if not is_s3(uri):
        dest = Path(uri)
        staging = dest.with_name(f".{dest.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            shutil.copytree(local_dir, staging)
            (staging / COMPLETE_MARKER).touch()
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(staging, dest)
        except OSError as exc:  # shutil.Error (an OSError) carries a list of (src, dst, reason) from copytree
            shutil.rmtree(staging, ignore_errors=True)
            why = exc.args[0][0][2] if isinstance(exc, shutil.Error) and exc.args and exc.args[0] else exc.strerror
            raise StorageError(f"{uri}: could not write ({why or exc}); the partial copy was removed") from exc
        return str(dest)
    bucket, prefix = split_s3(uri)
    client = s3_client(endpoint_url)
    written: list[str] = []
    try:
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            key = f"{prefix}/{path.relative_to(local_dir).as_posix()}".lstrip("/")
            _s3_call(f"s3://{bucket}/{key}", client.upload_file, str(path), bucket, key)
            written.append(key)
        marker = f"{prefix}/{COMPLETE_MARKER}".lstrip("/")
        _s3_call(uri, client.put_object, Bucket=bucket, Key=marker, Body=b"")
    except (StorageError, FileNotFoundError, OSError):
        for key in written:  # best effort: the endpoint may be what failed; without the marker it is incomplete
            with contextlib.suppress(Exception):
                client.delete_object(Bucket=bucket, Key=key)
        raise
    return uri


def remove_dir(uri: str | os.PathLike, endpoint_url: str | None = None) -> None:
    """Delete a directory written by ``upload_dir``: on S3 the completion marker goes first, so a deletion cut
    short never leaves something that looks complete."""
    uri = str(uri)
    if not is_s3(uri):
        shutil.rmtree(uri, ignore_errors=True)
        return
    bucket, prefix = split_s3(uri)
    client = s3_client(endpoint_url)
    _s3_call(uri, client.delete_object, Bucket=bucket, Key=f"{prefix}/{COMPLETE_MARKER}".lstrip("/"))
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
    for page in _s3_call(uri, list, pages):
        for obj in page.get("Contents", []):
            _s3_call(uri, client.delete_object, Bucket=bucket, Key=obj["Key"])


def download_dir(
    uri: str, local_dir: str | os.PathLike, endpoint_url: str | None = None, *, require_marker: bool = True
) -> Path:
    """Copy a directory written by ``upload_dir`` (or any local directory) to ``local_dir``.

    ``require_marker=False``: also a prefix other tools wrote (an HF model copied to S3), which has no
    ``_COMPLETE`` marker; the caller then checks the files themselves (``dcgrpo.models``).
    """
    local_dir = Path(local_dir)
    if not is_s3(uri):
        src = Path(uri)
        if not src.is_dir():
            raise FileNotFoundError(f"{uri}: no such directory")
        if src.resolve() != local_dir.resolve():
            shutil.copytree(src, local_dir, dirs_exist_ok=True)
        return local_dir
    bucket, prefix = split_s3(uri)
    client = s3_client(endpoint_url)
    keys: list[str] = []
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
    for page in _s3_call(uri, list, pages):
        keys += [obj["Key"] for obj in page.get("Contents", [])]
    if not keys:
        raise FileNotFoundError(f"{uri}: no objects under this prefix")
    rel_keys = [k[len(prefix) :].lstrip("/") for k in keys]
    if require_marker and COMPLETE_MARKER not in rel_keys:
        raise StorageError(f"{uri}: incomplete upload (no {COMPLETE_MARKER} marker); refusing to use it")
    for key, rel in zip(keys, rel_keys, strict=True):
        if rel == COMPLETE_MARKER or not rel or rel.endswith("/"):  # folder placeholders of S3 consoles
            continue
        target = local_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        _s3_call(f"s3://{bucket}/{key}", client.download_file, bucket, key, str(target))
    return local_dir


@contextmanager
def local_copy(uri: str | os.PathLike, endpoint_url: str | None = None) -> Iterator[Path]:
    """A local path for ``uri``: the path itself when local, a temporary download for S3."""
    uri = str(uri)
    if not is_s3(uri):
        if not Path(uri).exists():
            raise FileNotFoundError(f"{uri}: no such file or directory")
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory(prefix="dcgrpo-") as tmp:
        bucket, key = split_s3(uri)
        client = s3_client(endpoint_url)
        try:
            _s3_call(uri, client.head_object, Bucket=bucket, Key=key)
            is_object = True
        except FileNotFoundError:
            is_object = False
        if is_object:
            target = Path(tmp) / Path(key).name
            _s3_call(uri, client.download_file, bucket, key, str(target))
        else:
            target = download_dir(uri, Path(tmp) / "dir", endpoint_url)
        yield target
