"""4-bit weight grids (engines/weight_grids.py) against the format definitions.

The references below are written from the format definitions (INT4 symmetric,
OCP MX, NVFP4; e2m1 and e4m3 round-to-nearest-even with saturation), not with
compressed-tensors, which the module under test uses. One place where
compressed-tensors departs from the definition is pinned down rather than
hidden: its MXFP4 scale (``test_mxfp4_scale_rounds_up_from_mantissa_1_75``).
"""

from __future__ import annotations

import pytest
import torch

from dcgrpo.config import ExportConfig
from dcgrpo.engines.weight_grids import GRIDS, grid_args, round_state_dict, round_to_grid

FOUR_BIT = ("int4_g32", "int4_g128", "mxfp4", "nvfp4")
GROUP = {"int4_g32": 32, "int4_g128": 128, "mxfp4": 32, "nvfp4": 16}
KEEP = ExportConfig().keep_high_precision

# e2m1 magnitudes by code 0..7; the code's low bit is the mantissa bit, so "ties to even" = even code.
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def fp4_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 value, ties to the even mantissa, saturating at +-6."""
    dist = (x.abs().clamp(max=6.0)[..., None] - FP4_VALUES).abs()
    nearest = dist == dist.amin(-1, keepdim=True)
    prefer_even = nearest * (2 - torch.arange(8) % 2)  # a tie has two nearest codes: take the even one
    return torch.copysign(FP4_VALUES[prefer_even.argmax(-1)], x)


def fp8_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Nearest e4m3fn value of ``x >= 0``: 3 mantissa bits, min normal exponent -6, saturating at 448."""
    x = x.clamp(max=448.0)
    exponent = (torch.frexp(x).exponent - 1).clamp(min=-6)  # floor(log2 x); subnormals share 2^-6's quantum
    quantum = torch.ldexp(torch.ones_like(x), exponent - 3)
    return torch.round(x / quantum) * quantum  # torch.round is round-half-even


def _groups(w: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = w.unflatten(-1, (-1, size))
    return g, g.abs().amax(-1, keepdim=True)


def ref_int4(w: torch.Tensor, size: int) -> torch.Tensor:
    g, amax = _groups(w, size)
    scale = amax / 7.5
    q = torch.round(g / scale).clamp(-8, 7)
    return torch.where(scale == 0, 0.0, q * scale).flatten(-2)


def ref_mxfp4(w: torch.Tensor, compressed_tensors_scale: bool = True) -> torch.Tensor:
    """OCP MX: scale 2^(floor(log2 amax) - 2). compressed-tensors rounds amax up to the next
    power of two first when its mantissa is >= 1.75 (``compressed_tensors_scale``)."""
    g, amax = _groups(w, 32)
    frac, exp = torch.frexp(amax)  # amax = frac * 2^exp, frac in [0.5, 1): floor(log2 amax) = exp - 1
    if compressed_tensors_scale:
        exp = exp + (frac >= 0.875).int()  # mantissa 2 * frac >= 1.75
    scale = torch.ldexp(torch.ones_like(amax), exp - 1 - 2)
    return torch.where(amax == 0, 0.0, fp4_e2m1(g / scale) * scale).flatten(-2)


def ref_nvfp4(w: torch.Tensor) -> torch.Tensor:
    g, amax = _groups(w, 16)
    global_scale = 448 * 6 / w.abs().amax()
    scale = fp8_e4m3(amax / 6 * global_scale)
    effective = scale / global_scale
    return torch.where(scale == 0, 0.0, fp4_e2m1(g / effective) * effective).flatten(-2)


def reference(w: torch.Tensor, grid: str) -> torch.Tensor:
    if grid.startswith("int4"):
        return ref_int4(w, GROUP[grid])
    return ref_mxfp4(w) if grid == "mxfp4" else ref_nvfp4(w)


def _weight(seed: int) -> torch.Tensor:
    """Random fp32 (64, 256) weights at three magnitudes, the last with a few outliers."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 256, generator=gen) * (1.0, 0.02, 0.003)[seed % 3]
    if seed % 3 == 2:
        w[torch.randint(0, 64, (8,), generator=gen), torch.randint(0, 256, (8,), generator=gen)] *= 40
    return w


# ---- bit-exact against the definitions -------------------------------------------------------------


def test_references_agree_with_their_definitions():
    """The test's own roundings: e4m3 against torch's cast, e2m1 against hand values."""
    ties = torch.tensor([1.0625, 1.1875, 17.0, 19.0, 2.0**-10, 3 * 2.0**-10, 464.0])  # midpoints (464: saturates)
    assert torch.equal(fp8_e4m3(ties), torch.tensor([1.0, 1.25, 16.0, 20.0, 0.0, 2.0**-8, 448.0]))
    x = torch.rand(10_000) * 500
    assert torch.equal(fp8_e4m3(x), x.clamp(max=448).to(torch.float8_e4m3fn).float())
    x, want = torch.tensor([0.2, 0.3, 0.8, 2.6, 4.9, 5.1, 7.0, -7.0]), torch.tensor([0, 0.5, 1, 3, 4, 6, 6, -6.0])
    assert torch.equal(fp4_e2m1(x), want)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("grid", FOUR_BIT)
def test_bit_exact_on_random_weights(grid, seed):
    w = _weight(seed)
    out = round_to_grid(w, grid)
    assert torch.equal(out, reference(w, grid))
    assert not torch.equal(out, w)


@pytest.mark.parametrize("grid", ["int4_g32", "int4_g128"])
def test_int4_ties_round_half_even(grid):
    # Every 32-group holds 7.5, so scale = 7.5 / 7.5 = 1 exactly and w / scale hits the ties.
    ties = torch.tensor([0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5])
    want = torch.tensor([0.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 7.0])  # 7.5 -> 8 saturates to 7
    w = torch.cat([ties, -ties]).repeat(4, 8)  # (4, 128)
    want = torch.cat([want, -torch.tensor([0.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 8.0])]).repeat(4, 8)
    out = round_to_grid(w, grid)
    assert torch.equal(out, want)
    assert torch.equal(out, reference(w, grid))


@pytest.mark.parametrize("grid", ["mxfp4", "nvfp4"])
def test_fp4_ties_round_to_even_mantissa(grid):
    # Every 16-group holds 6: MX scale 2^(2 - 2) = 1; NVFP4 global 448, group scale e4m3(448) / 448 = 1.
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    want = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0])
    w = torch.cat([ties, -ties]).repeat(4, 8)
    out = round_to_grid(w, grid)
    assert torch.equal(out, torch.cat([want, -want]).repeat(4, 8))
    assert torch.equal(out, reference(w, grid))


def test_nvfp4_group_scale_ties_to_even():
    """Group scales that land midway between e4m3 values: tensor amax 5.25 makes the global
    scale 2688 / 5.25 = 512, so a group amax of 51/256 gives 51/256 / 6 * 512 = 17 exactly,
    between 16 and 18 (even: 16), and 57/256 gives 19, between 18 and 20 (even: 20)."""
    w = torch.zeros(1, 48)
    w[0, 0], w[0, 16], w[0, 32] = 5.25, 51 / 256, 57 / 256
    out = round_to_grid(w, "nvfp4")
    # 5.25 / (448 / 512) = 6 -> 6; 51/256 / (16 / 512) = 6.375 -> 6; 57/256 / (20 / 512) = 5.7 -> 6.
    assert torch.equal(out[0, ::16], torch.tensor([5.25, 6 * 16 / 512, 6 * 20 / 512]))
    assert torch.equal(out, ref_nvfp4(w))


def test_mxfp4_scale_rounds_up_from_mantissa_1_75():
    """compressed-tensors departs from the OCP MX scale 2^(floor(log2 amax) - 2): an amax
    whose mantissa is >= 1.75 first rounds up to the next power of two (vLLM's reference
    MXFP4), doubling the scale. amax 7.5 = 1.875 * 2^2: OCP scale 1 clips 7.5 and 7 to 6;
    compressed-tensors' scale 2 gives 8 and 8 but flushes 0.5 to 0."""
    w = torch.zeros(2, 32)
    w[:, :3] = torch.tensor([7.5, 7.0, 0.5])
    assert torch.equal(ref_mxfp4(w, compressed_tensors_scale=False)[0, :3], torch.tensor([6.0, 6.0, 0.5]))
    assert torch.equal(round_to_grid(w, "mxfp4")[0, :3], torch.tensor([8.0, 8.0, 0.0]))
    # On random weights the two scales disagree exactly in the groups with amax mantissa >= 1.75.
    w = _weight(0)
    out, ocp = round_to_grid(w, "mxfp4"), ref_mxfp4(w, compressed_tensors_scale=False)
    frac = torch.frexp(_groups(w, 32)[1]).mantissa.squeeze(-1)
    differs = (out != ocp).unflatten(-1, (-1, 32)).any(-1)
    assert differs.any() and torch.equal(differs, frac >= 0.875)


# ---- properties ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grid", GRIDS)
def test_shape_dtype_and_at_most_16_values_per_group(grid, dtype):
    w = _weight(1).to(dtype)
    out = round_to_grid(w, grid)
    assert out.shape == w.shape and out.dtype == dtype and torch.isfinite(out).all()
    if grid in FOUR_BIT:
        groups = out.unflatten(-1, (-1, GROUP[grid]))
        assert max(len(torch.unique(g)) for g in groups.reshape(-1, GROUP[grid])) <= 16


@pytest.mark.parametrize("grid", ["int4_g32", "int4_g128"])
def test_int4_codes_are_integers_in_range(grid):
    w = _weight(0)
    g, amax = _groups(w, GROUP[grid])
    codes = round_to_grid(w, grid).unflatten(-1, (-1, GROUP[grid])) / (amax / 7.5)
    # q * scale / scale is q only up to fp32 rounding; off-grid values would be ~0.5 away.
    assert torch.allclose(codes, codes.round(), rtol=0, atol=1e-5)
    codes = codes.round()
    assert codes.min() >= -8 and codes.max() <= 7
    assert codes.min() < -6 and codes.max() > 6  # the range is used, not just respected


@pytest.mark.parametrize("grid", FOUR_BIT)
def test_zero_groups_stay_zero_and_finite(grid):
    w = _weight(1)
    w[:, :128] = 0.0  # whole groups of zeros
    w[0, 128:144] = 1e-7  # nvfp4: a group whose e4m3 scale underflows to 0 next to amax ~0.1
    out = round_to_grid(w, grid)
    assert torch.isfinite(out).all() and (out[:, :128] == 0).all()
    assert torch.equal(out, reference(w, grid))
    zeros = torch.zeros(8, 128, dtype=torch.bfloat16)
    assert torch.equal(round_to_grid(zeros, grid), zeros)


def test_smaller_groups_round_more_accurately():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(3))
    err = {grid: (w - round_to_grid(w, grid)).abs().mean().item() for grid in ("int4_g32", "int4_g128")}
    assert err["int4_g32"] < err["int4_g128"]


# ---- state dicts --------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", GRIDS)
def test_round_state_dict_only_touches_linear_weights(grid):
    gen = torch.Generator().manual_seed(0)
    kept = {
        "model.embed_tokens.weight": torch.randn(64, 128, generator=gen),
        "lm_head.weight": torch.randn(64, 128, generator=gen),
        "model.layers.0.mlp.gate.weight": torch.randn(8, 128, generator=gen),
        "model.layers.0.input_layernorm.weight": torch.randn(128, generator=gen),
        "model.layers.0.self_attn.q_norm.weight": torch.randn(32, generator=gen),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(128, generator=gen),
    }
    changed = {
        f"model.layers.0.{m}.weight": torch.randn(128, 128, generator=gen).to(torch.bfloat16)
        for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.experts.0.down_proj")
    }
    out = round_state_dict({**kept, **changed}, grid, KEEP)
    assert out.keys() == kept.keys() | changed.keys()
    assert all(out[k] is t for k, t in kept.items())
    for k, t in changed.items():
        assert out[k] is not t and not torch.equal(out[k], t)
        assert torch.equal(out[k], round_to_grid(t, grid))


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """A Qwen3-MoE (2 layers, 4 experts) in memory and as save_pretrained writes it (the checkpoint layout)."""
    from safetensors.torch import load_file
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=256, num_experts=4,
        num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
    )  # fmt: skip
    model = Qwen3MoeForCausalLM(cfg)
    out = tmp_path_factory.mktemp("moe")
    model.save_pretrained(out)
    return model.state_dict(), load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("grid", FOUR_BIT)
def test_moe_experts_are_rounded_one_expert_at_a_time(tiny_moe, grid):
    """Every expert's gate/up/down projection on the grid, bit for bit against the definition (its own
    groups and scales: no expert shares a scale with another); router gates, norms, embeddings, head kept."""
    _, on_disk = tiny_moe
    out = round_state_dict(on_disk, grid, KEEP)
    experts = [k for k in on_disk if ".mlp.experts." in k]
    assert len(experts) == 2 * 4 * 3 and all(on_disk[k].ndim == 2 for k in experts)
    for k in experts:
        assert torch.equal(out[k], reference(on_disk[k], grid)), k
        assert not torch.equal(out[k], on_disk[k])
    kept = [k for k in on_disk if k.endswith("mlp.gate.weight") or "norm" in k or "embed" in k or "lm_head" in k]
    assert len(kept) == 2 * 5 + 3  # per layer: router gate, 2 layer norms, q/k norms; + embed, final norm, head
    assert all(out[k] is on_disk[k] for k in kept)


@pytest.mark.parametrize("grid", GRIDS)
def test_fused_in_memory_experts_are_refused(tiny_moe, grid):
    """Transformers 5's in-memory experts are 3-D (E, 2I, H): rounding them as they are would skip them."""
    in_memory, _ = tiny_moe
    assert in_memory["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 256, 128)
    with pytest.raises(ValueError, match=r"experts.gate_up_proj has shape \(4, 256, 128\): fused MoE experts"):
        round_state_dict(in_memory, grid, KEEP)


# ---- errors -------------------------------------------------------------------------------------


def test_unknown_grid_names_the_choices():
    w = torch.randn(4, 128)
    for call in (lambda: round_to_grid(w, "int3"), lambda: round_state_dict({"x.weight": w}, "int3", KEEP)):
        with pytest.raises(ValueError, match="int3") as err:
            call()
        assert all(g in str(err.value) for g in GRIDS)
    for bad in ("int3", "fp8_block"):
        with pytest.raises(ValueError, match="int4_g32, int4_g128, mxfp4, nvfp4"):
            grid_args(bad)


def test_grid_args_are_the_presets():
    assert grid_args("int4_g32").group_size == 32 and grid_args("int4_g128").group_size == 128
    assert grid_args("mxfp4").scale_dtype == torch.uint8 and grid_args("nvfp4").strategy == "tensor_group"
    grid_args("int4_g32").group_size = 7  # a copy: the preset (and so int4_g128) stays at 128
    assert grid_args("int4_g128").group_size == 128


@pytest.mark.parametrize("grid", FOUR_BIT)
def test_bad_weights_are_refused(grid):
    with pytest.raises(ValueError, match=r"2-D .* shape \(128,\)"):
        round_to_grid(torch.randn(128), grid)
    with pytest.raises(ValueError, match="float"):
        round_to_grid(torch.ones(4, 128, dtype=torch.int32), grid)
    size = GROUP[grid]
    with pytest.raises(ValueError, match=rf"group size {size}, got shape \(4, {size * 3 // 2}\)"):
        round_to_grid(torch.randn(4, size * 3 // 2), grid)
