"""SIGTERM (Kubernetes eviction, ``docker stop``, a CI timeout): stop cleanly instead of vanishing.

Python's default for SIGTERM ends the process at once: no ``finally`` runs, so
an MLflow run stays RUNNING, a local MLflow server or a child step keeps
running, and the training step in flight is lost. ``install`` (called by the
CLI) replaces it:

- by default SIGTERM raises ``Terminated`` where the main thread is, so every
  ``finally`` and context manager unwinds (the demo stops its MLflow server,
  ``tracking.start_run`` marks its run KILLED) and the command's children get
  SIGTERM too;
- between ``defer_sigterm()`` and ``undefer_sigterm()`` (the training loop) it only sets a flag; the loop
  polls ``requested()`` after each step, writes a checkpoint of that step and
  raises ``Terminated`` itself. A tiny-model step takes seconds, well inside
  Kubernetes' 30 s grace period; a second SIGTERM raises at once.

The CLI exits 143 (128 + SIGTERM) with one line naming where to resume.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

from dcgrpo.errors import DcgrpoError

log = logging.getLogger(__name__)

EXIT_CODE = 128 + signal.SIGTERM
_requested = threading.Event()
_graceful_depth = 0


class Terminated(DcgrpoError):
    """The process received SIGTERM; the message says what was saved and how to continue."""


def _children() -> list[int]:
    """Direct child processes of this one (Linux /proc; none elsewhere)."""
    pids: list[int] = []
    for task in os.listdir(f"/proc/{os.getpid()}/task") if os.path.isdir("/proc") else []:
        with contextlib.suppress(OSError):
            with open(f"/proc/{os.getpid()}/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
    return pids


def _on_sigterm(signum, frame) -> None:
    first = not _requested.is_set()
    _requested.set()
    if _graceful_depth and first:
        log.warning("SIGTERM: finishing the current step, then writing a checkpoint")
        return
    for pid in _children():  # a step subprocess (kfp.local), vLLM workers: they get the same notice
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    raise Terminated("SIGTERM received")


def install() -> None:
    """Route SIGTERM through ``_on_sigterm`` (main thread only; elsewhere Python's default stays)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def requested() -> bool:
    """Whether SIGTERM arrived (the training loop polls this at step boundaries)."""
    return _requested.is_set()


def defer_sigterm() -> None:
    """From now on the first SIGTERM only sets ``requested()``: the caller stops at a safe point it chooses.
    Pair with ``undefer_sigterm`` in a ``finally``."""
    global _graceful_depth
    _graceful_depth += 1


def undefer_sigterm() -> None:
    global _graceful_depth
    _graceful_depth -= 1
