"""Weight grids of low-cost deployment formats, simulated on the rollout engine.

The rollout engine serves bf16 weights that were first rounded onto the grid a
deployment format would give them ("fake quantisation"), so a run sees the
numerics of that format without its kernels. The FP8 grids are
``dcgrpo.engines.fp8``'s; the 4-bit ones use compressed-tensors' own numerics
(``calculate_qparams`` + ``fake_quantize`` with its preset schemes, i.e. what
llm-compressor writes), computed in float32 and cast back:

- ``fp8_block`` / ``fp8_channel``: FP8 e4m3, see ``dcgrpo.engines.fp8``.
- ``int4_g32`` / ``int4_g128``: ``W4A16`` (INT4, symmetric) with 32- or
  128-element groups along ``in``: ``scale = amax / 7.5`` per group, codes
  ``clamp(round_half_even(w / scale), -8, 7)``.
- ``mxfp4``: OCP MX (``MXFP4A16``), 32-element groups of e2m1 elements under a
  power-of-two E8M0 scale ``2^(floor(log2 amax) - 2)``; compressed-tensors
  first rounds ``amax`` to a power of two upwards when its mantissa is
  >= 1.75 (vLLM's reference MXFP4), so such groups get twice that scale.
- ``nvfp4``: ``NVFP4A16``, 16-element groups of e2m1 elements; each group's
  scale ``e4m3(group_amax / 6 * global)`` lives under a per-tensor fp32
  ``global = 448 * 6 / amax``, the effective scale being ``scale / global``.

vLLM serves these formats from compressed-tensors checkpoints on GPU; here
they are only simulated on the rollout engine (the export still writes FP8).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.quant_scheme import MXFP4A16, NVFP4A16, W4A16
from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam
from torch import Tensor

from dcgrpo.engines import fp8

GRIDS = ("fp8_block", "fp8_channel", "int4_g32", "int4_g128", "mxfp4", "nvfp4")
FOUR_BIT_GRIDS = GRIDS[2:]
_PRESETS = {"int4_g32": W4A16, "int4_g128": W4A16, "mxfp4": MXFP4A16, "nvfp4": NVFP4A16}


def grid_args(grid: str) -> QuantizationArgs:
    """compressed-tensors' weight ``QuantizationArgs`` of a 4-bit grid (a copy; the presets stay untouched)."""
    if grid not in FOUR_BIT_GRIDS:
        raise ValueError(
            f"no 4-bit grid {grid!r}; choose from {', '.join(FOUR_BIT_GRIDS)} (fp8_* grids live in dcgrpo.engines.fp8)"
        )
    args = _PRESETS[grid]["weights"].model_copy(deep=True)
    if grid == "int4_g32":
        args.group_size = 32  # the strategy (GROUP) is already set, so no re-validation is needed
    return args


@torch.no_grad()
def round_to_grid(weight: Tensor, grid: str, block_size: int = 128) -> Tensor:
    """Round an ``(out, in)`` Linear weight onto ``grid``: the values it would have when served.

    Same shape and dtype as ``weight``. ``block_size`` is the FP8 tile edge
    (``fp8_block`` only); the 4-bit grids group ``in`` by their own group size.
    """
    if grid not in GRIDS:
        raise ValueError(f"unknown weight grid {grid!r}; choose from {', '.join(GRIDS)}")
    if grid in fp8.SCHEMES:
        return fp8.quantize_dequantize_fp8(weight, block_size, grid)
    args = grid_args(grid)
    if weight.ndim != 2:
        raise ValueError(f"{grid} needs a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point() or weight.dtype == fp8.FP8_DTYPE:
        raise ValueError(f"{grid} needs a high-precision float weight, got {weight.dtype}")
    if weight.shape[1] % args.group_size:
        raise ValueError(
            f"{grid} needs `in` features divisible by its group size {args.group_size}, got shape {tuple(weight.shape)}"
        )
    w = weight.float()
    # Per-group min/max laid out (out, in // group) as llm-compressor's observers give them.
    groups = w.unflatten(-1, (-1, args.group_size))
    global_scale = None
    if args.strategy == QuantizationStrategy.TENSOR_GROUP:  # NVFP4: one fp32 global scale from the whole tensor
        global_scale = generate_gparam(w.amin(), w.amax())
    scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args, global_scale=global_scale)
    return fake_quantize(w, scale, zero_point, args, global_scale=global_scale).to(weight.dtype)


def round_state_dict(
    state_dict: Mapping[str, Tensor],
    grid: str,
    keep_high_precision: list[str],
    block_size: int = 128,
) -> dict[str, Tensor]:
    """A copy of ``state_dict`` with every quantisable Linear weight on ``grid``.

    Only tensors ``fp8.is_quantisable`` accepts change; ``lm_head``, router
    gates, embeddings, norms and biases pass through as the same objects.
    MoE experts are rounded one expert's projection at a time, as a
    per-expert checkpoint stores them; fused 3-D experts (transformers'
    in-memory layout) are refused (``fp8.check_checkpoint_layout``).
    """
    if grid not in GRIDS:  # fail even when nothing in the state dict is quantisable
        raise ValueError(f"unknown weight grid {grid!r}; choose from {', '.join(GRIDS)}")
    fp8.check_checkpoint_layout(state_dict)
    return {
        name: round_to_grid(t, grid, block_size) if fp8.is_quantisable(name, t, keep_high_precision) else t
        for name, t in state_dict.items()
    }
