"""Launch verl training: a KubeRay ``RayJob`` on the GPU node pool, or verl in this pod.

``render_rayjob`` turns the run config (+ the rendered verl overrides) into a
``ray.io/v1`` RayJob: the trainer image on a head group and a GPU worker group
(``verl.nnodes`` nodes in all; the head trains too), pinned to the GPU pool
with nodeSelector/tolerations, a memory-backed /dev/shm, the checkpoint PVC
and secrets as env through secretKeyRef: the names come from the deployment
contract (``dcgrpo.deploy``), the sizes from the run config. ``follow_rayjob`` polls it through
the Kubernetes ``CustomObjectsApi`` until it finishes, logging each status
change, and raises ``RayJobFailed`` with KubeRay's message when it fails.
``run_single_node`` is the one-machine variant: verl started as a child process
of the pipeline step (Ray runs locally inside the pod).

Imports nothing from verl (the pipeline step only needs the kubernetes client).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from dcgrpo import deploy
from dcgrpo.config import ConfigError, RunConfig
from dcgrpo.deploy import DeploymentContract
from dcgrpo.verl_plugin.config import TRAIN_MAIN, ray_env_overrides, train_command

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
API_VERSION = f"{GROUP}/{VERSION}"
# KubeRay's RayJob status (ray-operator/apis/ray/v1/rayjob_types.go)
JOB_SUCCEEDED, JOB_FAILED, JOB_STOPPED = "SUCCEEDED", "FAILED", "STOPPED"
DEPLOY_COMPLETE, DEPLOY_FAILED, DEPLOY_INVALID = "Complete", "Failed", "ValidationFailed"


class RayJobFailed(RuntimeError):
    """The RayJob (or the single-node verl run) ended without success."""


MAX_NAME = 47
"""KubeRay (v1.4+) refuses a RayJob whose name is longer (``ValidationFailed``): it derives its RayCluster's and
pods' names from it. 47 also keeps the name a valid label value (<= 63), which KubeRay copies it into."""


def job_name(run_name: str) -> str:
    """A DNS-1035 label (KubeRay's other name rule: it must start with a letter) of at most ``MAX_NAME``
    characters, distinct for distinct ``run_name``: a name starting with a digit gets ``dcgrpo-`` in front, and a
    name that must be cut keeps its first 40 characters and ends in 6 hex digits of its full text's hash."""
    name = re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-") or "dcgrpo-verl"
    if not name[0].isalpha():
        name = f"dcgrpo-{name}"
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    return f"{name[: MAX_NAME - 7].rstrip('-')}-{digest}"


def _secret_env(contract: DeploymentContract) -> list[dict[str, Any]]:
    """S3 and MLflow credentials as secretKeyRefs, optional like the pipeline's: a key the cluster does
    not use (IRSA, an open MLflow) is left out of the Secret and the pod still starts."""
    return [
        {"name": env, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}
        for env, (secret, key) in sorted(contract.secret_env().items())
    ]


def _pod_template(cfg: RunConfig, contract: DeploymentContract, role: str, env: dict[str, str]) -> dict[str, Any]:
    v, c = cfg.verl, contract
    resources = {
        "cpu": str(v.cpu_per_node),
        "memory": f"{v.memory_gib_per_node}Gi",
        c.gpu_resource: str(v.gpus_per_node),
    }
    container_env = [{"name": k, "value": val} for k, val in sorted(env.items())] + _secret_env(c)
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{v.shm_gib}Gi"}}]
    if c.checkpoint_pvc:
        mounts.append({"name": "checkpoints", "mountPath": v.checkpoint_dir})
        volumes.append({"name": "checkpoints", "persistentVolumeClaim": {"claimName": c.checkpoint_pvc}})
    return {
        "metadata": {"labels": {"app.kubernetes.io/name": "dcgrpo-verl", "dcgrpo/role": role}},
        "spec": {
            "nodeSelector": dict(c.gpu_node_selector),
            "tolerations": [dict(t) for t in c.gpu_tolerations],
            "containers": [
                {
                    "name": f"ray-{role}",
                    "image": c.verl_image,
                    "imagePullPolicy": "IfNotPresent",
                    "env": container_env,
                    "resources": {"requests": dict(resources), "limits": dict(resources)},
                    "volumeMounts": mounts,
                }
            ],
            "volumes": volumes,
        },
    }


def render_rayjob(
    cfg: RunConfig,
    overrides: list[str],
    *,
    name: str,
    env: dict[str, str] | None = None,
    stop_at_step: int | None = None,
    contract: DeploymentContract | None = None,
) -> dict[str, Any]:
    """The RayJob for one verl training run (or one round of it, ending after ``stop_at_step``).

    Args:
        cfg: run config (``verl`` section: sizes and launch).
        overrides: verl Hydra overrides (``config.render_overrides``).
        name: RayJob name (made DNS-safe).
        env: plain env for every node and forwarded to Ray actors (MLflow URI, run id).
        contract: image, namespace, GPU pool, secrets, checkpoint PVC; default ``deploy.current()``
            (the pipeline's, in a pipeline pod).
    """
    v, c = cfg.verl, contract or deploy.current()
    if v.nnodes > 1 and not c.checkpoint_pvc:
        raise ConfigError(
            f"verl.nnodes={v.nnodes} needs the deployment's checkpoint_pvc: every node must see one checkpoint_dir"
        )
    env = dict(env or {})
    entrypoint = shlex.join(train_command(overrides + ray_env_overrides(env), stop_at_step=stop_at_step))
    head_params = {"dashboard-host": "0.0.0.0", "num-gpus": str(v.gpus_per_node)}
    cluster: dict[str, Any] = {
        "rayVersion": v.ray_version,
        "headGroupSpec": {"rayStartParams": head_params, "template": _pod_template(cfg, c, "head", env)},
    }
    workers = v.nnodes - 1
    if workers:
        cluster["workerGroupSpecs"] = [
            {
                "groupName": "gpu",
                "replicas": workers,
                "minReplicas": workers,
                "maxReplicas": workers,
                "rayStartParams": {"num-gpus": str(v.gpus_per_node)},
                "template": _pod_template(cfg, c, "worker", env),
            }
        ]
    return {
        "apiVersion": API_VERSION,
        "kind": "RayJob",
        "metadata": {
            "name": job_name(name),
            "namespace": c.namespace,
            "labels": {"app.kubernetes.io/name": "dcgrpo-verl", "dcgrpo/config-hash": cfg.config_hash()},
        },
        "spec": {
            "entrypoint": entrypoint,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            "activeDeadlineSeconds": v.timeout_s,
            "backoffLimit": 0,  # a failed step fails the pipeline step; resume is the next submission's job
            "rayClusterSpec": cluster,
        },
    }


def submit_rayjob(api: Any, body: dict[str, Any], max_attempts: int = 5) -> str:
    """Create the RayJob through a ``kubernetes.client.CustomObjectsApi``; returns its name.

    A RayJob of that name already there (the step's pod was retried or
    preempted) is re-attached to while it runs or after it succeeded; after a
    failed one the job is submitted again as ``<name>-a2``, ``-a3``, ... (verl
    resumes from its checkpoint), so no delete permission is needed.
    """
    # kubernetes: 0.9 s to load; only a RayJob's API calls need it
    from kubernetes.client.exceptions import ApiException

    ns, base = body["metadata"]["namespace"], body["metadata"]["name"]
    for attempt in range(1, max_attempts + 1):
        name = base if attempt == 1 else job_name(f"{base}-a{attempt}")
        try:
            api.create_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, {**body, "metadata": {**body["metadata"], "name": name}}
            )
        except ApiException as exc:
            if exc.status != 409:
                raise
            status = api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name).get("status") or {}
            if _failure(status) is None:
                log.info("rayjob %s/%s exists (%s): re-attaching", ns, name, status.get("jobStatus") or "starting")
                return name
            log.info("rayjob %s/%s failed earlier (%s): submitting the next attempt", ns, name, _failure(status))
            continue
        log.info("rayjob %s/%s submitted (%d nodes, image %s)", ns, name, _node_count(body), _image(body))
        return name
    raise RayJobFailed(f"RayJob {ns}/{base}: {max_attempts} attempts exist and all failed; delete them to retry")


def _node_count(body: dict[str, Any]) -> int:
    return 1 + sum(g.get("replicas", 0) for g in body["spec"]["rayClusterSpec"].get("workerGroupSpecs", []))


def _image(body: dict[str, Any]) -> str:
    return body["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]


def _failure(status: dict[str, Any]) -> str | None:
    """KubeRay's reason for a terminal failure, or None if not failed."""
    deploy, job = status.get("jobDeploymentStatus", ""), status.get("jobStatus", "")
    if deploy in (DEPLOY_FAILED, DEPLOY_INVALID) or job in (JOB_FAILED, JOB_STOPPED):
        return status.get("reason") or job or deploy
    return None


def follow_rayjob(
    api: Any,
    name: str,
    namespace: str,
    *,
    poll_s: float = 10.0,
    timeout_s: float = 86_400.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Poll the RayJob until it ends; log every status change; return the final status.

    Raises:
        RayJobFailed: the job failed, was stopped or rejected (message from
            KubeRay's ``status.message``), or is still running after ``timeout_s``.
    """
    start = clock()
    last: tuple[str, str, str] | None = None
    while True:
        obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        status = obj.get("status") or {}
        seen = (status.get("jobDeploymentStatus", ""), status.get("jobStatus", ""), status.get("message", ""))
        if seen != last:
            log.info("rayjob %s: deployment=%s job=%s %s", name, seen[0] or "New", seen[1] or "-", seen[2])
            last = seen
        reason = _failure(status)
        if reason is not None:
            raise RayJobFailed(f"RayJob {namespace}/{name} failed ({reason}): {status.get('message') or 'no message'}")
        if status.get("jobStatus") == JOB_SUCCEEDED:
            log.info("rayjob %s succeeded in %.0f s", name, clock() - start)
            return status
        if clock() - start > timeout_s:
            raise RayJobFailed(f"RayJob {namespace}/{name} still {seen[0] or 'New'} after {timeout_s:.0f} s")
        sleep(poll_s)


def kube_custom_objects_api() -> Any:
    """A CustomObjectsApi from the in-cluster service account, else ~/.kube/config."""
    from kubernetes import client, config  # kubernetes: 0.9 s to load; only a RayJob's API calls need it

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def run_rayjob(
    cfg: RunConfig,
    overrides: list[str],
    *,
    name: str,
    env: dict[str, str] | None = None,
    api: Any = None,
    stop_at_step: int | None = None,
    contract: DeploymentContract | None = None,
) -> dict[str, Any]:
    """Render, submit and follow one RayJob to completion (the pipeline's verl backend)."""
    api = api or kube_custom_objects_api()
    body = render_rayjob(cfg, overrides, name=name, env=env, stop_at_step=stop_at_step, contract=contract)
    submitted = submit_rayjob(api, body)
    return follow_rayjob(
        api, submitted, body["metadata"]["namespace"], poll_s=cfg.verl.poll_s, timeout_s=cfg.verl.timeout_s
    )


def run_single_node(
    overrides: list[str],
    *,
    env: dict[str, str] | None = None,
    python: str = sys.executable,
    tail_lines: int = 40,
    stop_at_step: int | None = None,
) -> None:
    """Run verl on this machine (the step's pod): its output streams into our log.

    Raises ``RayJobFailed`` with the last lines of verl's output on a non-zero exit.
    """
    argv = train_command(overrides, python=python, stop_at_step=stop_at_step)
    log.info(
        "verl single-node: %s", shlex.join(argv[: len(argv) - len(overrides)]) + f" ... ({len(overrides)} overrides)"
    )
    tail: deque[str] = deque(maxlen=tail_lines)
    with subprocess.Popen(
        argv, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            log.info("verl| %s", line.rstrip())
        rc = proc.wait()
    if rc != 0:
        raise RayJobFailed(f"{TRAIN_MAIN} exited with {rc}:\n" + "\n".join(tail))
