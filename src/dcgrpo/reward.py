"""Rule-based math reward: extract the final answer, verify it with math-verify.

    score(completion, ground_truth) -> 1.0 | 0.0
    score_batch(completions, ground_truths) -> [1.0 | 0.0, ...]

The final answer is the content of the last ``\\boxed{...}`` (or ``\\fbox``),
else the rest of the last DAPO ``Answer:`` line. It is compared with the
ground truth by ``math_verify.parse`` + ``math_verify.verify``.

Never hangs, never crashes a batch:
- math-verify's own timeout is ``signal.alarm`` (main thread only, whole
  seconds) and cannot interrupt C code such as Python's big-int ``pow`` in
  ``\\boxed{9^{9^{9^{9}}}}``. So parsing runs in a small pool of persistent
  verifier *processes* (plain subprocesses speaking JSON lines); the parent
  enforces a hard per-item wall-clock limit by killing a worker that overruns
  and starting a fresh one. This works from any thread and from inside other
  worker processes.
- Inputs are bounded before any parsing: long completions keep only their
  tail, over-long answers score 0 unparsed.
- Cheap cases never leave the calling process: no answer (0), an answer
  string equal to the ground truth (1), two plain integers (compared as ints).
  For DAPO-Math (all-integer answers) a training step's batch is scored
  in-process in microseconds; only the rest pays an IPC round trip (~1 ms).

Defaults come from ``dcgrpo.config.RewardConfig``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from dcgrpo.config import RewardConfig

log = logging.getLogger(__name__)

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*")
_ANSWER_RE = re.compile(r"Answer\s*:", re.IGNORECASE)
_INT_RE = re.compile(r"-?\d{1,64}")
STARTUP_S = 60.0
"""Grace for a verifier process to import math-verify before its first item's clock starts."""


# ----------------------------------------------------------------------------- extraction


def _balanced(text: str, start: int) -> str | None:
    """Content of the brace group opening at ``text[start] == "{"``; None if unbalanced."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif c == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


def extract_answer(completion: str, max_chars: int | None = None) -> str | None:
    """The final answer of a completion: last ``\\boxed{}``, else the last ``Answer:`` line.

    Only the last ``max_chars`` characters are searched. Returns None when there
    is no answer (or the last box is unbalanced).
    """
    if not isinstance(completion, str) or not completion:
        return None
    max_chars = max_chars or RewardConfig().max_completion_chars
    text = completion[-max_chars:]
    boxes = list(_BOX_RE.finditer(text))
    if boxes:
        m = boxes[-1]
        end = m.end()
        if end < len(text) and text[end] == "{":
            return _balanced(text, end)
        # "\boxed 5": the next token
        tok = re.match(r"[^\s$]+", text[end:])
        return tok.group(0) if tok else None
    answers = list(_ANSWER_RE.finditer(text))
    if answers:
        line = text[answers[-1].end() :].split("\n", 1)[0].strip()
        line = line.rstrip(".").strip()
        if len(line) >= 2 and line[0] == "$" and line[-1] == "$":
            line = line.strip("$").strip()
        return line or None
    return None


def _normalise(ans: str) -> str:
    return re.sub(r"\s+", "", ans).strip("$").rstrip(".")


def _fast_score(answer: str | None, ground_truth: str, max_answer_chars: int) -> float | None:
    """A decision without math-verify, or None when it has to parse."""
    if answer is None or not isinstance(ground_truth, str):
        return 0.0
    if len(answer) > max_answer_chars or len(ground_truth) > max_answer_chars:
        return 0.0
    a, g = _normalise(answer), _normalise(ground_truth)
    if not a:
        return 0.0
    if a == g:
        return 1.0
    if _INT_RE.fullmatch(a) and _INT_RE.fullmatch(g):
        return float(int(a) == int(g))
    return None


# ----------------------------------------------------------------------------- verifier (worker side)


def verify_answer(answer: str, ground_truth: str) -> float:
    """math-verify comparison of an extracted answer with the ground truth, no timeout.

    Runs inside a verifier worker process; call it directly only on trusted input.
    """
    from math_verify import LatexExtractionConfig, parse, verify  # math_verify: `dcgrpo submit` runs without it

    cfg = [LatexExtractionConfig(boxed_match_priority=0)]
    # "$\\boxed{..}$": a bare \\boxed{} lets math-verify fall back to a partial match
    # (it reads "\\frac{1}{3}E_1+\\frac{2}{3}E_2" as 2/3).
    gold = parse("$\\boxed{" + ground_truth.strip().strip("$") + "}$", extraction_config=cfg, parsing_timeout=None)
    pred = parse("$\\boxed{" + answer.strip().strip("$") + "}$", extraction_config=cfg, parsing_timeout=None)
    if not gold or not pred:
        return 0.0
    return float(bool(verify(gold, pred, timeout_seconds=None)))


def _worker_main() -> None:
    """Verifier loop: one JSON ``[answer, ground_truth]`` per stdin line -> one score per stdout line."""
    logging.disable(logging.WARNING)  # math-verify warns once per process that its timeout is off: we own it
    import math_verify  # noqa: F401  (import cost paid at start, not on the first item)

    sys.setrecursionlimit(10_000)
    out = sys.stdout
    out.write("ready\n")  # the parent starts an item's clock only once this arrives
    out.flush()
    for line in sys.stdin:
        try:
            answer, gt = json.loads(line)
            value = verify_answer(answer, gt)
        except BaseException:  # noqa: BLE001  (RecursionError, sympy errors, ...: a wrong answer, not a crash)
            value = 0.0
        out.write(f"{value}\n")
        out.flush()


# ----------------------------------------------------------------------------- pool (parent side)


class _Worker:
    """One verifier subprocess; replies are read from its raw stdout fd into ``buf``."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from dcgrpo.reward import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            bufsize=0,
        )
        self.fd = self.proc.stdout.fileno()
        self.buf = b""
        self.ready = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, answer: str, ground_truth: str) -> None:
        self.proc.stdin.write((json.dumps([answer, ground_truth]) + "\n").encode())

    def read_lines(self) -> list[str] | None:
        """Complete lines available now; None at EOF (the worker died)."""
        chunk = os.read(self.fd, 65536)
        if not chunk:
            return None
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return [line.decode() for line in lines]

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:  # noqa: BLE001
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:  # noqa: BLE001
                pass


class VerifierPool:
    """Persistent verifier processes with a hard per-item wall-clock timeout.

    Thread-safe (one batch at a time). A worker that overruns its item's
    deadline, dies or garbles its reply is killed and replaced; its item
    scores 0. Workers start once and are reused by every later call.
    """

    def __init__(self, num_workers: int) -> None:
        self.num_workers = num_workers
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._workers = [_Worker() for _ in range(num_workers)]
        self.restarts = 0
        """Workers killed and replaced (an item overran its deadline, or its worker died)."""
        self.items_verified = 0
        """Items sent to a worker: what the in-process fast path saves (tests count these, not seconds)."""
        self.timed_out: list[int] = []
        """Items of the last ``verify`` call that hit the time limit (``score_batch`` names their ground truths)."""

    def close(self) -> None:
        for w in self._workers:
            w.kill()
        self._workers = []

    def _replace(self, i: int) -> None:
        self._workers[i].kill()
        self._workers[i] = _Worker()
        self.restarts += 1

    def verify(self, items: Sequence[tuple[str, str]], timeout_s: float) -> list[float]:
        """Score ``(answer, ground_truth)`` pairs; each gets ``timeout_s`` of wall clock once its worker is ready."""
        results = [0.0] * len(items)
        self.timed_out = []  # item indices that hit the time limit in this call
        pending = list(range(len(items)))[::-1]
        busy: dict[int, tuple[int, float]] = {}  # worker index -> (item index, deadline)
        with self._lock:
            while pending or busy:
                # Dispatch: one item per idle worker, ready ones first (a replacement is still importing).
                for wi in sorted(range(len(self._workers)), key=lambda i: not self._workers[i].ready):
                    if not pending:
                        break
                    if wi in busy:
                        continue
                    if not self._workers[wi].alive():
                        self._replace(wi)
                    w = self._workers[wi]
                    item = pending.pop()
                    self.items_verified += 1
                    try:
                        w.send(*items[item])
                    except OSError:  # broken pipe: the item scores 0
                        self._replace(wi)
                        continue
                    # A worker still importing math-verify gets STARTUP_S more:
                    # its start is not the item's fault.
                    busy[wi] = (item, time.monotonic() + timeout_s + (0.0 if w.ready else STARTUP_S))
                # Wait for the first reply or the first deadline.
                wait = max(0.0, min(dl for _, dl in busy.values()) - time.monotonic())
                readable, _, _ = select.select([self._workers[wi].fd for wi in busy], [], [], wait)
                for wi in [wi for wi in busy if self._workers[wi].fd in readable]:
                    w = self._workers[wi]
                    lines = w.read_lines()
                    if lines is None:  # died mid-item
                        results[busy.pop(wi)[0]] = 0.0
                        self._replace(wi)
                        continue
                    for line in lines:
                        if line == "ready":
                            w.ready = True
                            busy[wi] = (busy[wi][0], time.monotonic() + timeout_s)
                        elif wi in busy:
                            item, _ = busy.pop(wi)
                            try:
                                results[item] = float(line)
                            except ValueError:
                                results[item] = 0.0
                # Kill overrunning workers (C code such as big-int pow ignores signals).
                now = time.monotonic()
                for wi, (item, deadline) in list(busy.items()):
                    if now >= deadline:
                        log.debug("reward item %d over %.1fs: killing verifier %d", item, timeout_s, wi)
                        busy.pop(wi)
                        self._replace(wi)
                        results[item] = 0.0
                        self.timed_out.append(item)
        return results


_POOL: VerifierPool | None = None
_POOL_LOCK = threading.Lock()


def get_pool(num_workers: int | None = None) -> VerifierPool:
    """The process-wide verifier pool (started on first use, rebuilt after a fork)."""
    global _POOL
    num_workers = num_workers or RewardConfig().num_workers
    with _POOL_LOCK:
        if _POOL is not None and (_POOL.pid != os.getpid() or _POOL.num_workers != num_workers):
            if _POOL.pid == os.getpid():
                _POOL.close()
            _POOL = None
        if _POOL is None:
            _POOL = VerifierPool(num_workers)
        return _POOL


def shutdown() -> None:
    """Stop the verifier workers (also runs at interpreter exit)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None and _POOL.pid == os.getpid():
            _POOL.close()
        _POOL = None


atexit.register(shutdown)


# ----------------------------------------------------------------------------- public API


def score_batch(
    completions: Sequence[str],
    ground_truths: Sequence[str],
    cfg: RewardConfig | None = None,
) -> list[float]:
    """1.0 / 0.0 per completion. Fast cases in-process, the rest on the persistent pool."""
    if len(completions) != len(ground_truths):
        raise ValueError(f"score_batch: {len(completions)} completions but {len(ground_truths)} ground truths")
    cfg = cfg or RewardConfig()
    results: list[float] = [0.0] * len(completions)
    slow: list[int] = []
    slow_items: list[tuple[str, str]] = []
    for i, (c, g) in enumerate(zip(completions, ground_truths, strict=True)):
        g = str(g) if isinstance(g, int | float) else g
        answer = extract_answer(c, cfg.max_completion_chars)
        fast = _fast_score(answer, g, cfg.max_answer_chars)
        if fast is None:
            slow.append(i)
            slow_items.append((answer, g))
        else:
            results[i] = fast
    if slow_items:
        pool = get_pool(cfg.num_workers)
        for i, value in zip(slow, pool.verify(slow_items, cfg.timeout_s), strict=True):
            results[i] = value
        _warn_slow_truths([slow_items[j][1] for j in pool.timed_out], len(completions), cfg.timeout_s)
    return results


_WARNED_TRUTHS: set[str] = set()


def _warn_slow_truths(truths: list[str], batch: int, timeout_s: float) -> None:
    """One warning per ground truth that math-verify cannot compare within the limit (a power tower such as
    ``10^{10^{10}}``): each such comparison costs the whole ``timeout_s`` and a verifier restart, every step."""
    for truth in sorted(set(truths) - _WARNED_TRUTHS):
        _WARNED_TRUTHS.add(truth)
        log.warning(
            "reward: comparisons with ground truth %r hit reward.timeout_s=%.1fs (%d of %d in this batch; each "
            "scores 0 and restarts a verifier): math-verify cannot evaluate it quickly; drop such rows from the "
            "data or expect slow steps", truth[:80], timeout_s, truths.count(truth), batch,
        )  # fmt: skip


def score(completion: str, ground_truth: str, cfg: RewardConfig | None = None) -> float:
    """1.0 if the completion's final answer equals ``ground_truth`` (math-verify), else 0.0."""
    return score_batch([completion], [ground_truth], cfg)[0]
