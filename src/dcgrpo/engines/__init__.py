"""Inference/training engines: vLLM rollout + eval, HF log-probs, shared FP8 quantiser."""
