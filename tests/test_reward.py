"""dcgrpo.reward: extraction, math-verify scoring, hard timeouts, batch and benchmark self-checks."""

from __future__ import annotations

import multiprocessing as mp
import random
import sys
import threading
import time
from pathlib import Path

import pytest

from dcgrpo import reward
from dcgrpo.config import RewardConfig
from dcgrpo.data.benchmarks import BENCHMARKS, load_benchmark

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reward_sweep import perturb_answer  # noqa: E402  (a test and benchmark helper, not library code)

TIMEOUT = RewardConfig(timeout_s=1.5)


@pytest.fixture(scope="module", autouse=True)
def warm_pool():
    reward.get_pool()  # start the verifier processes once, outside the timed tests
    reward.score("\\boxed{\\frac{1}{2}}", "0.5")


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("so the answer is \\boxed{34}.", "34"),
        ("\\boxed{1} then \\boxed{\\frac{a}{b}}", "\\frac{a}{b}"),
        ("\\fbox{7}", "7"),
        ("\\boxed 5", "5"),
        ("work...\nAnswer: 42", "42"),
        ("Answer: 1\nmore\nAnswer: $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("no answer here", None),
        ("\\boxed{\\frac{1}{2}", None),  # unbalanced
        ("", None),
    ],
)
def test_extract_answer(completion, expected):
    assert reward.extract_answer(completion) == expected


@pytest.mark.parametrize(
    "completion, gt, expected",
    [
        ("... \\boxed{34}", "34", 1.0),
        ("... \\boxed{35}", "34", 0.0),
        ("Answer: 34", "34", 1.0),
        ("... \\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("... \\boxed{(3, \\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0),
        ("... \\boxed{(3, \\pi)}", "\\left( 3, \\frac{\\pi}{2} \\right)", 0.0),
        ("... \\boxed{C}", "\\text{(C)}", 1.0),
        ("... \\boxed{3, 2}", "2, 3", 1.0),
        ("no final answer", "34", 0.0),
        ("\\boxed{}", "34", 0.0),
    ],
)
def test_score(completion, gt, expected):
    assert reward.score(completion, gt) == expected


def test_score_batch_order_and_length_check():
    comps = ["\\boxed{1}", "\\boxed{\\sqrt{4}}", "\\boxed{x^2}", "Answer: 7"]
    assert reward.score_batch(comps, ["1", "2", "x^3", "7"]) == [1.0, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="2 completions but 1"):
        reward.score_batch(["a", "b"], ["1"])


def test_small_batch_is_cheap():
    """The RL loop calls score_batch every step: integer answers never reach the verifier pool, and
    harder ones reuse its running workers (counters, not wall clocks: CI machines are shared)."""
    pool = reward.get_pool()
    sent, restarts = pool.items_verified, pool.restarts
    comps = [f"... so \\boxed{{{i % 7}}}" for i in range(32)]
    assert sum(reward.score_batch(comps, [str(i % 5) for i in range(32)])) > 0
    assert pool.items_verified == sent  # integer answers: scored in-process
    comps = [f"\\boxed{{\\frac{{{2 * i}}}{{2}}}}" for i in range(32)]
    assert reward.score_batch(comps, [str(i) for i in range(32)]) == [1.0] * 32
    assert reward.get_pool() is pool and pool.restarts == restarts  # the same workers, none restarted
    assert pool.items_verified == sent + 32


ADVERSARIAL = {
    "power tower": "\\boxed{9^{9^{9^{9}}}}",
    "power tower answer line": "Answer: 9^{9^{9^{9^{9}}}}",
    "deep braces": "\\boxed{" + "{" * 20000 + "1" + "}" * 20000 + "}",
    "deep parens within length": "\\boxed{" + "(" * 300 + "1" + ")" * 300 + "}",
    "megabyte garbage": "x" * 1_000_000,
    "megabyte boxed": "\\boxed{" + "1+" * 500_000 + "1}",
    "megabyte then box": "y" * 1_000_000 + "\\boxed{2}",
    "unbalanced latex": "\\boxed{\\frac{1}{\\left( 2 \\right}",
    "unbalanced left right": "\\boxed{\\left( 3, \\frac{\\pi}{2}}",
    "huge factorial": "\\boxed{100000000!}",
}


@pytest.mark.timeout(60)  # a hang fails here; the exact seconds are benchmarks/reward_sweep.py's business
@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_returns_within_timeout(name):
    t = time.perf_counter()
    value = reward.score(ADVERSARIAL[name], "3", TIMEOUT)
    elapsed = time.perf_counter() - t
    assert value == 0.0
    # Loose on purpose (a shared CI core can stall a second or two): the point is the hard kill, not speed.
    assert elapsed < 4 * TIMEOUT.timeout_s + 5.0, f"{name}: {elapsed:.2f}s"


def test_adversarial_does_not_poison_the_batch():
    comps = [ADVERSARIAL["power tower"], "\\boxed{\\frac{6}{2}}", ADVERSARIAL["huge factorial"], "\\boxed{\\sqrt{9}}"]
    t = time.perf_counter()
    assert reward.score_batch(comps, ["3"] * 4, TIMEOUT) == [0.0, 1.0, 0.0, 1.0]
    assert time.perf_counter() - t < 4 * TIMEOUT.timeout_s + 5.0  # two timeouts, not a hang


def test_timeout_works_off_the_main_thread():
    out = {}

    def run():
        t = time.perf_counter()
        out["v"] = reward.score_batch([ADVERSARIAL["power tower"], "\\boxed{\\frac{6}{2}}"], ["3", "3"], TIMEOUT)
        out["t"] = time.perf_counter() - t

    th = threading.Thread(target=run)
    th.start()
    th.join(timeout=30)
    assert out["v"] == [0.0, 1.0]
    assert out["t"] < 4 * TIMEOUT.timeout_s + 5.0


def _score_in_child(q):
    t = time.perf_counter()
    v = reward.score_batch(
        [ADVERSARIAL["power tower"], "\\boxed{\\frac{6}{2}}"], ["3", "3"], RewardConfig(timeout_s=1.5)
    )
    q.put((v, time.perf_counter() - t))


def test_timeout_works_in_a_worker_process():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_score_in_child, args=(q,))
    p.start()
    v, elapsed = q.get(timeout=90)
    p.join(timeout=30)
    assert v == [0.0, 1.0]
    assert elapsed < 60  # includes the child's own pool start


def test_perturb_answer():
    assert perturb_answer("52_8") == "53_8"
    assert perturb_answer("\\text{(C)}") == "\\text{(D)}"
    assert perturb_answer("x") == "x+1"
    assert not hasattr(reward, "perturb_answer")  # a test helper, not part of the library


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_reference_scores_one_and_perturbed_zero(sample_data, name):
    """Deterministic sample per benchmark (the full sweep: benchmarks/reward_sweep.py)."""
    rows = load_benchmark(name, sample_data)
    rows = random.Random(0).sample(rows, min(len(rows), 60))
    gts = [r["answer"] for r in rows]
    ref = reward.score_batch([f"... so the answer is \\boxed{{{a}}}" for a in gts], gts)
    bad = reward.score_batch([f"... so the answer is \\boxed{{{perturb_answer(a)}}}" for a in gts], gts)
    assert sum(ref) / len(rows) >= 0.99, [r["id"] for r, s in zip(rows, ref, strict=True) if s != 1.0]
    # >= 99% over all rows (reward_sweep.py); a 60-row sample allows one math-verify false positive
    assert 1 - sum(bad) / len(rows) >= 0.98, [r["id"] for r, s in zip(rows, bad, strict=True) if s != 0.0]


def test_a_ground_truth_math_verify_cannot_evaluate_is_named_once(caplog):
    """10^{10^{10}} as a ground truth: every comparison hits the limit (21 s a step was seen, silently)."""
    truth = "10^{10^{10}}"
    batch = ["\\boxed{5}", "\\boxed{7}"]  # a plain wrong answer: the comparison still evaluates the tower
    with caplog.at_level("WARNING", logger="dcgrpo.reward"):
        assert reward.score_batch(batch, [truth, "7"], TIMEOUT) == [0.0, 1.0]
        reward.score_batch(batch, [truth, "7"], TIMEOUT)
    warned = [r.getMessage() for r in caplog.records if "hit reward.timeout_s" in r.getMessage()]
    assert len(warned) == 1 and repr(truth) in warned[0] and "1 of 2 in this batch" in warned[0]
