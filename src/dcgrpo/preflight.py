"""Fail before the work: check what a training job needs before any engine starts.

A missing bucket, bad credentials, a wrong S3 endpoint, a mistyped input path
or a stopped MLflow server used to show only at the first checkpoint upload
or metric flush, after a round of compute (and after an MLflow run had been
created, left FAILED and empty). ``check_run_environment`` makes one cheap
request for each, with short timeouts and no retries (a few seconds in all),
and raises a ``DcgrpoError`` naming the config field and the URI:

- ``storage.root`` is writable: locally mkdir + write/delete a probe file; on
  S3 ``head_bucket`` + put/delete of a tiny probe object under the prefix
  (write permission is what a checkpoint needs; reading is not enough);
- the inputs exist: ``data.train_path``, ``data.val_path``, ``model.path``;
- the MLflow server answers ``GET /health`` (http(s) tracking URIs only).
"""

from __future__ import annotations

import contextlib
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from dcgrpo import storage
from dcgrpo.errors import ServiceUnavailable
from dcgrpo.models import parse_hf_id
from dcgrpo.storage import StorageError
from dcgrpo.tracking import tracking_uri as resolve_uri

TIMEOUT_S = 3.0
"""Per request: a healthy server answers in milliseconds; a wrong host should not cost minutes."""


def check_run_environment(cfg, *, tracking_uri: str | None = None, need_storage: bool = True,
                          check_inputs: bool = True) -> None:  # fmt: skip
    """Raise ``StorageError`` / ``ServiceUnavailable`` (naming field and URI) if the job cannot run.

    Args:
        cfg: the ``RunConfig``.
        tracking_uri: the MLflow URI the job will use (default: resolved from the config as ``start_run`` does).
        need_storage: check ``storage.root`` (a pipeline round writes to its artifact instead).
        check_inputs: check ``data.*_path`` and ``model.path`` (a pipeline round gets its inputs as artifacts).
    """
    endpoint = cfg.storage.s3_endpoint_url
    if need_storage:
        check_writable(cfg.storage.root, "storage.root", endpoint)
    if check_inputs:
        for field, uri in (("data.train_path", cfg.data.train_path), ("data.val_path", cfg.data.val_path),
                           ("model.path", cfg.model.path)):  # fmt: skip
            if uri and not (field == "model.path" and _is_hub_id(uri)):
                check_exists(uri, field, endpoint)
    if tracking_uri is None:
        tracking_uri = resolve_uri(cfg)
    field = "tracking.mlflow_uri" if cfg.tracking.mlflow_uri else "$MLFLOW_TRACKING_URI"
    check_mlflow(tracking_uri, field)


def _is_hub_id(spec: str) -> bool:
    """``model.path`` names a Hugging Face id, not a local path: the Hub is asked when the model is loaded
    (``dcgrpo.models.load_model_dir``, still before any run starts)."""

    return not storage.is_s3(spec) and not Path(spec).exists() and parse_hf_id(spec) is not None


def _client(endpoint: str | None):
    return storage.s3_client(endpoint, connect_timeout=TIMEOUT_S, read_timeout=TIMEOUT_S, max_attempts=1, fresh=True)


def _s3_reason(exc: Exception, endpoint: str | None) -> str:
    """What a botocore failure means for the user (which of bucket, credentials or endpoint to fix)."""
    # botocore: `dcgrpo submit` runs without it
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    where = f"endpoint {storage.resolve_endpoint(endpoint) or 'AWS default'}"
    if isinstance(exc, NoCredentialsError):
        return "no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            return f"no such bucket at {where}"
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"access denied at {where} ({code}: check the credentials and the bucket policy)"
        return f"S3 error {code} at {where}: {exc}"
    if isinstance(exc, EndpointConnectionError):
        return f"{where} unreachable (check storage.s3_endpoint_url / $DCGRPO_S3_ENDPOINT_URL)"
    return f"S3 failed at {where}: {exc}"


def check_writable(root: str, field: str, endpoint: str | None = None, keep_created: bool = True) -> None:
    """Write and delete a probe under ``root`` (a local directory, made if missing, or s3://bucket/prefix).
    ``keep_created=False``: folders made for the probe are removed again (an output folder appears only with
    its outputs)."""
    from botocore.exceptions import BotoCoreError, ClientError  # botocore: `dcgrpo submit` runs without it

    probe = f".dcgrpo-preflight-{uuid.uuid4().hex[:12]}"
    if not storage.is_s3(root):
        made = [p for p in (Path(root), *Path(root).parents) if not p.exists()]
        try:
            Path(root).mkdir(parents=True, exist_ok=True)
            (Path(root) / probe).write_bytes(b"ok")
            (Path(root) / probe).unlink()
        except OSError as exc:
            raise StorageError(f"{field}: cannot write to {root}: {exc.strerror or exc}") from None
        finally:
            for folder in made if not keep_created else []:  # deepest first
                with contextlib.suppress(OSError):
                    folder.rmdir()
        return
    bucket, prefix = storage.split_s3(storage.check_s3_uri(root, field))
    key = f"{prefix}/{probe}".lstrip("/")
    client = _client(endpoint)
    try:
        client.head_bucket(Bucket=bucket)
        client.put_object(Bucket=bucket, Key=key, Body=b"ok")
        client.delete_object(Bucket=bucket, Key=key)
    except (BotoCoreError, ClientError) as exc:
        raise StorageError(f"{field}: cannot write to {root}: {_s3_reason(exc, endpoint)}") from None


def check_exists(uri: str, field: str, endpoint: str | None = None) -> None:
    """``uri`` (a file, or a directory / S3 prefix) exists: one HEAD, plus one LIST for a prefix."""
    from botocore.exceptions import BotoCoreError, ClientError  # botocore: `dcgrpo submit` runs without it

    if not storage.is_s3(uri):
        if not Path(uri).exists():
            raise StorageError(f"{field}: {uri} does not exist")
        return
    bucket, key = storage.split_s3(storage.check_s3_uri(uri, field))
    client = _client(endpoint)
    try:
        try:
            client.head_object(Bucket=bucket, Key=key)
            return
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) not in ("404", "NoSuchKey", "NotFound"):
                raise
        listing = client.list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
    except (BotoCoreError, ClientError) as exc:
        raise StorageError(f"{field}: cannot read {uri}: {_s3_reason(exc, endpoint)}") from None
    if not listing.get("KeyCount", 0):
        raise StorageError(f"{field}: {uri} does not exist (no object or prefix of that name)")


def check_mlflow(uri: str, field: str) -> None:
    """An http(s) MLflow server answers ``/health``; other URIs (sqlite, file) are local and not checked."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S):
            return
    except urllib.error.HTTPError as exc:
        if exc.code < 500:  # it answered (an auth proxy may guard /health): reachable
            return
        reason = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = str(getattr(exc, "reason", exc))
    raise ServiceUnavailable(f"{field}: MLflow server {uri} is unreachable ({reason}); start it or fix the URI")
