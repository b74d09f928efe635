"""The registry's MLflow connection: the client (after a health check), its errors, version lookups.

Nothing here knows the run config: callers pass names and values (``dcgrpo.stages.registration`` unpacks the
config). Defaults that the config also declares are read from ``RegistryConfig``, the only copy.
"""

from __future__ import annotations

import urllib.error
import urllib.request

from dcgrpo import tracking
from dcgrpo.config import RegistryConfig
from dcgrpo.errors import DcgrpoError, ServiceUnavailable

HEALTH_TIMEOUT_S = 5.0
MISSING = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")
"""MLflow error codes that mean "no such run, version, alias or model"."""

_FIELDS = RegistryConfig.model_fields
CHAMPION_ALIAS: str = _FIELDS["champion_alias"].default
CHALLENGER_ALIAS: str = _FIELDS["challenger_alias"].default


class RegistryError(DcgrpoError, RuntimeError):
    """Registration or promotion cannot proceed (names the model, version and reason)."""


def client(tracking_uri: str | None = None):
    """The registry's MLflow client (``tracking.mlflow_client``: bounded HTTP retries), after one ``/health``
    request, so that a server that is down fails in seconds naming the URI rather than after the retries."""
    import mlflow  # the heavy import only where a client is made

    check_server(tracking_uri or mlflow.get_tracking_uri())
    return tracking.mlflow_client(tracking_uri, registry_uri=tracking_uri)


def check_server(uri: str, timeout: float = HEALTH_TIMEOUT_S) -> None:
    """One GET ``<uri>/health`` for http(s) URIs; ``ServiceUnavailable`` naming the URI if nobody answers.

    Any HTTP answer below 500 counts as up (a proxy may guard /health); other
    URI schemes (sqlite, file) have no server to ask.
    """
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return
    except urllib.error.HTTPError as exc:
        if exc.code < 500:
            return
        reason = f"HTTP {exc.code} {exc.reason}"
    except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections, malformed URLs
        reason = str(getattr(exc, "reason", exc))
    raise ServiceUnavailable(f"MLflow server {uri} unreachable ({reason}); check the tracking URI")


def check_model_name(name: str) -> str:
    """Refuse a registered-model name MLflow's search filters cannot hold (a quote), before anything is written."""
    if not name or any(q in name for q in "'\"`"):
        raise RegistryError(f"registered model name {name!r}: must be non-empty and contain no quotes")
    return name


def alias_version(mlflow_client, name: str, alias: str):
    """The model version ``alias`` points at, or None if no version has it (or the model does not exist)."""
    from mlflow.exceptions import MlflowException  # mlflow: `dcgrpo submit` runs without it

    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in MISSING:
            return None
        raise


def version_by_alias(mlflow_client, name: str, alias: str) -> str:
    """The version number ``alias`` points at now (resolved once, e.g. for ``dcgrpo promote``)."""
    mv = alias_version(mlflow_client, name, alias)
    if mv is None:
        raise RegistryError(f"{name}: no version has alias {alias!r}; register one first")
    return str(mv.version)


def model_version(mlflow_client, name: str, version: str):
    """Version ``version`` of ``name``; ``RegistryError`` if there is none."""
    from mlflow.exceptions import MlflowException  # mlflow: `dcgrpo submit` runs without it

    try:
        return mlflow_client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code in MISSING:
            raise RegistryError(f"{name}: no version {version!r} to promote") from exc
        raise
