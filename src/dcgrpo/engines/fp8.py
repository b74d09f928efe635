"""FP8 (e4m3) weight quantisation shared by the rollout engines and the export.

One quantiser, two users: the CPU rollout engine rounds weights onto the FP8
grid to simulate an FP8 deployment (vLLM CPU has no FP8 kernels), and
``dcgrpo.export`` writes the same ``(q, scale)`` pairs into a
compressed-tensors checkpoint. Training-time and served numerics therefore
agree bit for bit.

Numerics follow compressed-tensors' ``FP8_BLOCK`` / ``FP8_DYNAMIC`` weight
schemes (what llm-compressor writes and vLLM loads), which are also verl's
FP8 rollout recipe:

    scale = amax(|W_block|) / 448          # in W's dtype; 0 -> finfo(dtype).eps
    q     = fp8_e4m3(clamp(W / scale, -448, 448))
    W'    = q.to(scale.dtype) * scale

Schemes
- ``fp8_block``: one scale per ``block_size x block_size`` tile (128x128 as
  DeepSeek-V3 / verl / vLLM block FP8); edge tiles that are not full are
  zero-padded for the amax, exactly as compressed-tensors pads them.
  ``scale`` has shape ``(ceil(out / b), ceil(in / b))``.
- ``fp8_channel``: one scale per output row; ``scale`` has shape ``(out, 1)``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
SCHEMES = ("fp8_block", "fp8_channel")


def _check(weight: Tensor, scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown FP8 scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    if weight.ndim != 2:
        raise ValueError(f"FP8 weight quantisation needs a 2-D (out, in) tensor, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point() or weight.dtype == FP8_DTYPE:
        raise ValueError(f"FP8 weight quantisation needs a high-precision float tensor, got {weight.dtype}")


def _to_blocks(weight: Tensor, block_size: int) -> Tensor:
    """(out, in) -> (out_blocks, in_blocks, b, b), zero-padding the edges."""
    out_f, in_f = weight.shape
    pad_r, pad_c = (-out_f) % block_size, (-in_f) % block_size
    if pad_r or pad_c:
        weight = torch.nn.functional.pad(weight, (0, pad_c, 0, pad_r))
    rows, cols = weight.shape[0] // block_size, weight.shape[1] // block_size
    return weight.reshape(rows, block_size, cols, block_size).transpose(1, 2)


def _from_blocks(blocks: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of ``_to_blocks``: (out_blocks, in_blocks, b, b) -> (out, in), dropping the padding."""
    rows, cols, b, _ = blocks.shape
    full = blocks.transpose(1, 2).reshape(rows * b, cols * b)
    return full[: shape[0], : shape[1]]


def _scale_from_amax(amax: Tensor) -> Tensor:
    """amax / 448 in amax's dtype; an all-zero block gets eps so the division stays finite."""
    scale = amax / FP8_MAX
    eps = torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype, device=scale.device)
    return torch.where(scale == 0, eps, scale)


def _cast(scaled: Tensor) -> Tensor:
    """Saturate onto [-448, 448] and round to nearest e4m3."""
    return torch.clamp(scaled, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)


@torch.no_grad()
def quantize_fp8(weight: Tensor, block_size: int = 128, scheme: str = "fp8_block") -> tuple[Tensor, Tensor]:
    """Quantise a Linear weight to FP8 e4m3.

    Args:
        weight: ``(out, in)`` float weight (fp32/bf16/fp16).
        block_size: tile edge for ``fp8_block`` (ignored for ``fp8_channel``).
        scheme: ``fp8_block`` or ``fp8_channel``.

    Returns:
        ``q``: ``(out, in)`` float8_e4m3fn; ``scale``: weight's dtype, shape
        ``(ceil(out/b), ceil(in/b))`` (block) or ``(out, 1)`` (channel).
    """
    _check(weight, scheme)
    if scheme == "fp8_channel":
        scale = _scale_from_amax(weight.abs().amax(dim=1, keepdim=True))  # (out, 1)
        return _cast(weight / scale), scale
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    blocks = _to_blocks(weight, block_size)  # (R, C, b, b)
    scale = _scale_from_amax(blocks.abs().amax(dim=(-2, -1)))  # (R, C)
    q_blocks = _cast(blocks / scale[..., None, None])
    return _from_blocks(q_blocks, weight.shape).contiguous(), scale


@torch.no_grad()
def dequantize_fp8(q: Tensor, scale: Tensor, block_size: int = 128, scheme: str = "fp8_block") -> Tensor:
    """``q.to(scale.dtype) * scale`` broadcast per block / per row; returns ``(out, in)`` in scale's dtype."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown FP8 scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    if scheme == "fp8_channel":
        return q.to(scale.dtype) * scale
    blocks = _to_blocks(q.to(scale.dtype), block_size)  # (R, C, b, b)
    if blocks.shape[:2] != scale.shape:
        raise ValueError(f"scale shape {tuple(scale.shape)} does not match {tuple(q.shape)} in {block_size}-blocks")
    return _from_blocks(blocks * scale[..., None, None], q.shape).contiguous()


def quantize_dequantize_fp8(weight: Tensor, block_size: int = 128, scheme: str = "fp8_block") -> Tensor:
    """Round a weight onto the FP8 grid it will have when served: same shape and dtype as the input."""
    q, scale = quantize_fp8(weight, block_size, scheme)
    return dequantize_fp8(q, scale, block_size, scheme).to(weight.dtype)


def matches_any(module_name: str, patterns: Iterable[str]) -> bool:
    """True when a module name matches one of ``patterns``.

    A plain pattern matches whole dotted components (``mlp.gate`` matches
    ``model.layers.0.mlp.gate`` but not ``...mlp.gate_proj``); ``re:<regex>``
    patterns (compressed-tensors' ``ignore`` syntax) use ``re.search``.
    """
    dotted = f".{module_name}."
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], module_name):
                return True
        elif f".{pattern.strip('.')}." in dotted:
            return True
    return False


def is_quantisable(name: str, tensor: Tensor, keep_high_precision: Iterable[str]) -> bool:
    """A 2-D float ``*.weight`` of a Linear not listed in ``keep_high_precision``.

    1-D tensors (norms, biases) and non-``weight`` tensors never qualify;
    embeddings, ``lm_head`` and MoE router gates are excluded by the patterns.
    """
    if not name.endswith(".weight") or tensor.ndim != 2 or not tensor.is_floating_point():
        return False
    if tensor.dtype == FP8_DTYPE:
        return False
    module = name.removesuffix(".weight")
    return not matches_any(module, keep_high_precision) and "norm" not in module.rsplit(".", 1)[-1]


def check_checkpoint_layout(state_dict: Mapping[str, Tensor], where: str = "state dict") -> None:
    """Refuse weights in transformers 5's fused in-memory MoE layout (3-D ``mlp.experts.gate_up_proj``
    (E, 2I, H), ``down_proj`` (E, H, I)): a grid or an export would skip them silently, leaving the
    experts, most of an MoE's weights, in high precision. The checkpoint layout (what ``save_pretrained``
    writes and vLLM loads; ``VLLMEngine.checkpoint_layout``) holds each expert's projection as its own
    2-D Linear weight, which is what is quantised, one expert at a time."""
    fused = [n for n, t in state_dict.items() if t.ndim == 3 and t.is_floating_point() and "experts" in n]
    if fused:
        raise ValueError(
            f"{where}: {fused[0]} has shape {tuple(state_dict[fused[0]].shape)}: fused MoE experts "
            f"({len(fused)} tensors) as transformers holds them in memory; pass the checkpoint layout "
            "(per-expert 2-D weights, as save_pretrained writes them)"
        )
