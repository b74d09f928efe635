"""MLflow model registry: register, gate against the champion, promote (with a serve hook), roll back.

Lifecycle of a model version (aliases, not the deprecated stages):

    register  -> version N with its gate tags, alias ``challenger``        (``registration``)
    promote N -> under the model's promotion lock (``lock``), gate N against the champion, tag the decision,
                 run the caller's ``serve`` hook, then move ``champion`` in one call  (``promotion``)
    rollback  -> the same hook-then-move for an older version, without the gate

Modules, bottom up: ``connection`` (the client, its health check, lookups, ``RegistryError``), ``tags`` (the
tag keys the gate and the UI read), ``lock``, ``promotion``, ``registration``.

The registry sits below serving and the driver layer: it takes plain values (names, thresholds, timeouts) and
imports neither the run config's ``RunConfig`` nor ``dcgrpo.serving``. ``dcgrpo.stages.registration`` unpacks
the run config and passes ``dcgrpo.serving.server`` as the hook (serve-on-promote); rendering and applying
serving manifests live in ``dcgrpo.serving``.
"""

from dcgrpo.registry.connection import (
    CHALLENGER_ALIAS,
    CHAMPION_ALIAS,
    RegistryError,
    alias_version,
    check_model_name,
    check_server,
    client,
    version_by_alias,
)
from dcgrpo.registry.lock import GUARD_SUFFIX, LOCK_STALE_S, LOCK_SUFFIX, LOCK_WAIT_S, promotion_lock
from dcgrpo.registry.promotion import ALREADY, Decision, Serve, gate, promote, rank_methods, rollback
from dcgrpo.registry.registration import Registered, register_candidate, register_model
from dcgrpo.registry.tags import (
    TAG_COMPARED_TO,
    TAG_CONFIG_HASH,
    TAG_DECIDED_AT,
    TAG_DECISION,
    TAG_DISCREPANCY,
    TAG_ENGINE_PREFIX,
    TAG_LAMBDA,
    TAG_METRICS,
    TAG_QUANTIZATION,
    TAG_REASON,
    TAG_RUN_ID,
    TAG_SOURCE_DIR,
    TAG_STORAGE_URI,
    engine_tags,
    load_metrics,
    one_spelling,
    version_tags,
)

__all__ = [
    "ALREADY",
    "CHALLENGER_ALIAS",
    "CHAMPION_ALIAS",
    "GUARD_SUFFIX",
    "LOCK_STALE_S",
    "LOCK_SUFFIX",
    "LOCK_WAIT_S",
    "TAG_COMPARED_TO",
    "TAG_CONFIG_HASH",
    "TAG_DECIDED_AT",
    "TAG_DECISION",
    "TAG_DISCREPANCY",
    "TAG_ENGINE_PREFIX",
    "TAG_LAMBDA",
    "TAG_METRICS",
    "TAG_QUANTIZATION",
    "TAG_REASON",
    "TAG_RUN_ID",
    "TAG_SOURCE_DIR",
    "TAG_STORAGE_URI",
    "Decision",
    "Registered",
    "RegistryError",
    "Serve",
    "alias_version",
    "check_model_name",
    "check_server",
    "client",
    "engine_tags",
    "gate",
    "load_metrics",
    "one_spelling",
    "promote",
    "promotion_lock",
    "rank_methods",
    "register_candidate",
    "register_model",
    "rollback",
    "version_by_alias",
    "version_tags",
]
