"""Real vLLM CPU engine vs HF: log-prob agreement, in-place weight sync, FP8 deploy."""

from __future__ import annotations

import pytest
import torch

from dcgrpo.algorithm.discrepancy import masked_stats, token_discrepancy
from dcgrpo.config import RunConfig
from dcgrpo.engines.hf_engine import HFEngine, make_token_batch
from dcgrpo.engines.vllm_engine import VLLMEngine, apply_chat_template
from dcgrpo.models import build_tiny_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(RunConfig().model, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def engine(tiny_dir):
    e = VLLMEngine(str(tiny_dir), "bf16", seed=0, max_model_len=256)
    yield e
    e.close()


def _prompts(tok):
    return [apply_chat_template(tok, [{"role": "user", "content": f"What is {i} + {i + 3}?"}]) for i in range(4)]


def _compare(engine, hf, n=4, max_tokens=16):
    """Sample with vLLM, recompute with HF: (logp_train, logp_infer, mask)."""
    out = engine.generate(_prompts(engine.tokenizer), n=n, temperature=1.0, top_p=1.0, max_tokens=max_tokens)
    gens = [g for grp in out for g in grp]
    batch = hf.token_batch([g.prompt_token_ids for g in gens], [g.token_ids for g in gens], max_tokens)
    li = torch.zeros(batch.response_mask.shape)
    for i, g in enumerate(gens):
        assert len(g.logprobs) == len(g.token_ids) and g.finish_reason in ("stop", "length")
        li[i, : len(g.logprobs)] = torch.tensor(g.logprobs)
    with torch.no_grad():
        lt, _ = hf.logprobs(batch)
    return lt, li, batch.response_mask


def test_generate_shapes_and_greedy_determinism(engine):
    prompts = _prompts(engine.tokenizer)
    out = engine.generate(prompts, n=3, temperature=1.0, top_p=1.0, max_tokens=8)
    assert len(out) == 4 and all(len(g) == 3 for g in out)
    g = out[0][0]
    assert isinstance(g.text, str) and len(g.token_ids) <= 8
    assert all(lp <= 0 for lp in g.logprobs)
    a = engine.generate(prompts, n=1, temperature=0.0, top_p=1.0, max_tokens=8)
    b = engine.generate(prompts, n=1, temperature=0.0, top_p=1.0, max_tokens=8)
    assert [x[0].token_ids for x in a] == [x[0].token_ids for x in b]


def test_the_cpu_kv_cache_is_sized_by_the_config_in_bytes(engine):
    """rollout.cpu_kv_cache_gib reaches vLLM as kv_cache_memory_bytes (fractions of a GiB: the whole-GiB env var
    cost tiny-cpu 1 GiB of RSS for a cache it never filled; benchmarks/results/vs_trl.md)."""
    import os

    from dcgrpo.config import RolloutConfig

    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        pytest.skip("$VLLM_CPU_KVCACHE_SPACE is set and overrides the configured size")
    cache = engine.llm.llm_engine.vllm_config.cache_config
    assert cache.kv_cache_memory_bytes == int(RolloutConfig().cpu_kv_cache_gib * 2**30) < 2**30


def test_weight_sync_changes_logprobs_and_matches_hf_fp32(engine, tiny_dir):
    hf = HFEngine(str(tiny_dir), "fp32")
    lt, li, mask = _compare(engine, hf)
    before = masked_stats((lt - li).abs(), mask)
    assert before["mean"] < 0.05  # bf16 vs fp32 noise only
    # A visible update: scale every projection and the head.
    with torch.no_grad():
        for name, p in hf.model.named_parameters():
            if "proj" in name or "lm_head" in name:
                p.mul_(3.0)
    engine.sync_weights(hf.state_dict())
    lt2, li2, mask2 = _compare(engine, hf)
    after = masked_stats((lt2 - li2).abs(), mask2)
    assert after["mean"] < 0.05 and after["max"] < 0.5, after
    # Old engine log-probs would not match the new HF model: the sync really happened.
    old = HFEngine(str(tiny_dir), "fp32")
    batch = make_token_batch([[1, 2, 3]], [[4, 5, 6]], 0)
    with torch.no_grad():
        assert (old.logprobs(batch)[0] - hf.logprobs(batch)[0]).abs().max() > 0.1
    d = token_discrepancy(lt2, li2, mask2)
    assert torch.isfinite(d).all()
    # Restore the original weights for the other tests.
    engine.sync_weights(old.state_dict())


def test_fp8_deploy_has_larger_discrepancy_than_bf16(tiny_dir, engine):
    hf = HFEngine(str(tiny_dir), "fp32")
    lt, li, mask = _compare(engine, hf)
    d_bf16 = masked_stats(token_discrepancy(lt, li, mask, "log_ratio"), mask)["mean"]
    engine.close()  # one live in-process engine at a time
    with VLLMEngine(str(tiny_dir), "fp8", max_model_len=256, fp8_block_size=32) as fp8:
        lt8, li8, mask8 = _compare(fp8, hf)
    d_fp8 = masked_stats(token_discrepancy(lt8, li8, mask8, "log_ratio"), mask8)["mean"]
    assert d_fp8 > 2 * d_bf16, (float(d_fp8), float(d_bf16))


def test_a_4bit_weight_grid_is_what_the_engine_serves(tiny_dir, engine):
    """rollout.weight_grid (the lab's deploy ladder): the engine serves the int4-grid weights, so it agrees with a
    trainer holding those same rounded weights (bf16 noise only) and disagrees more with the unrounded trainer."""
    from dcgrpo.engines.weight_grids import round_state_dict

    engine.close()  # one live in-process engine at a time
    hf = HFEngine(str(tiny_dir), "fp32")
    rounded = HFEngine(str(tiny_dir), "fp32")
    keep = RunConfig().export.keep_high_precision
    rounded.model.load_state_dict(round_state_dict(rounded.state_dict(), "int4_g32", keep))
    with VLLMEngine(str(tiny_dir), "bf16", max_model_len=256, weight_grid="int4_g32") as int4:
        assert int4.grid == "int4_g32"
        lt, li, mask = _compare(int4, hf)
        lt_r, li_r, mask_r = _compare(int4, rounded)
    d_true = masked_stats(token_discrepancy(lt, li, mask, "log_ratio"), mask)["mean"]
    d_same_grid = masked_stats(token_discrepancy(lt_r, li_r, mask_r, "log_ratio"), mask_r)["mean"]
    assert d_same_grid < 0.05 and d_true > 2 * d_same_grid, (float(d_true), float(d_same_grid))
    with pytest.raises(ValueError, match="needs precision bf16"):
        VLLMEngine(str(tiny_dir), "fp8", max_model_len=256, weight_grid="int4_g32")


def test_tied_embeddings_sync_updates_head(tmp_path, engine):
    engine.close()  # one live in-process engine at a time
    cfg = RunConfig().model.model_copy(update={"tie_word_embeddings": True})
    tied_dir = build_tiny_model(cfg, tmp_path)
    hf = HFEngine(str(tied_dir), "fp32")
    with VLLMEngine(str(tied_dir), "fp32", max_model_len=256) as eng:
        with torch.no_grad():
            hf.model.get_input_embeddings().weight.mul_(20.0)  # changes the (tied) head too
        sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # the trap
        eng.sync_weights(sd)
        lt, li, mask = _compare(eng, hf)
        assert masked_stats((lt - li).abs(), mask)["mean"] < 1e-3  # fp32 vs fp32


# --- Mixture of experts (issue 26) ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    cfg = RunConfig().model.model_copy(update={"arch": "qwen3-moe"})  # 4 experts, top-2
    return build_tiny_model(cfg, tmp_path_factory.mktemp("tiny-moe"))


@pytest.fixture(scope="module")
def moe_engine(moe_dir, engine):
    engine.close()  # one live in-process engine at a time
    e = VLLMEngine(str(moe_dir), "bf16", seed=0, max_model_len=256)
    yield e
    e.close()


def _served_experts(worker) -> dict[str, torch.Tensor]:
    """Worker side: the expert tensors vLLM's MoE kernel reads (after its own repacking)."""
    return {k: v.detach().clone() for k, v in worker.model_runner.model.state_dict().items() if "experts" in k}


def _log_and_prob_diff(engine, hf) -> tuple[float, float]:
    lt, li, mask = _compare(engine, hf)
    log_diff = float(masked_stats((lt - li).abs(), mask)["mean"])
    return log_diff, float(masked_stats(token_discrepancy(lt, li, mask), mask)["mean"])


def test_moe_sync_sends_the_checkpoint_layout(moe_engine, moe_dir):
    """Transformers 5 fuses a Qwen3-MoE's experts in memory; what reaches vLLM is the per-expert layout
    save_pretrained writes, tensor for tensor, and a state dict already in that layout passes unchanged."""
    from safetensors.torch import load_file

    in_memory = HFEngine(str(moe_dir), "fp32").state_dict()
    assert in_memory["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 384, 128)  # (E, 2I, H)
    on_disk = load_file(str(moe_dir / "model.safetensors"))
    assert on_disk["model.layers.0.mlp.experts.3.down_proj.weight"].shape == (128, 192)
    for sd in (in_memory, on_disk):
        sent = moe_engine.checkpoint_layout(sd)
        assert sent.keys() == on_disk.keys()
        assert not [k for k in sent if not torch.equal(sent[k], on_disk[k])]


def test_moe_matches_hf_before_and_after_a_sync(moe_engine, moe_dir):
    """vLLM CPU serves the tiny MoE as HF computes it, at load and after syncing trained weights: bf16-vs-fp32
    noise as for the dense model (mean |log p_vllm - log p_hf| 1.3-1.5e-3 for both here; 0.056 before the fix)."""
    hf = HFEngine(str(moe_dir), "fp32")
    served_at_load = moe_engine.llm.collective_rpc(_served_experts)[0]
    before = _log_and_prob_diff(moe_engine, hf)
    moe_engine.sync_weights(hf.state_dict())  # unchanged weights: vLLM must serve exactly what it loaded
    served = moe_engine.llm.collective_rpc(_served_experts)[0]
    assert not [k for k in served_at_load if not torch.equal(served[k], served_at_load[k])]
    # A trained-like update that also moves the routing: every parameter, router gates included, gets noise.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hf.model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5 * p.std())
    moe_engine.sync_weights(hf.state_dict())
    after = _log_and_prob_diff(moe_engine, hf)
    print(f"\ntiny MoE, vLLM bf16 vs HF fp32, mean |dlogp|, mean d: before {before}, after sync {after}")
    assert before[0] < 0.01 and after[0] < 0.01, (before, after)
    old = HFEngine(str(moe_dir), "fp32")  # the synced weights really are the new ones
    assert _log_and_prob_diff(moe_engine, old)[0] > 10 * after[0]
    moe_engine.sync_weights(old.state_dict())


def test_moe_experts_are_served_on_the_4bit_grid(moe_engine, moe_dir, tmp_path):
    """rollout.weight_grid on an MoE: vLLM serves every expert on the grid, so it agrees with a trainer whose
    checkpoint was rounded the same way (bf16 noise) and disagrees more with the unrounded one."""
    import shutil

    from safetensors.torch import load_file, save_file

    from dcgrpo.engines.weight_grids import round_state_dict

    moe_engine.close()  # one live in-process engine at a time
    rounded_dir = tmp_path / "rounded"
    shutil.copytree(moe_dir, rounded_dir)
    on_disk = load_file(str(moe_dir / "model.safetensors"))
    save_file(round_state_dict(on_disk, "int4_g32", RunConfig().export.keep_high_precision),
              str(rounded_dir / "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
    hf, rounded = HFEngine(str(moe_dir), "fp32"), HFEngine(str(rounded_dir), "fp32")
    with VLLMEngine(str(moe_dir), "bf16", max_model_len=256, weight_grid="int4_g32") as int4:
        d_true, d_same_grid = _log_and_prob_diff(int4, hf)[0], _log_and_prob_diff(int4, rounded)[0]
    print(
        f"\ntiny MoE on int4_g32: mean |dlogp| vs the unrounded trainer {d_true:.2e}, vs the rounded {d_same_grid:.2e}"
    )
    assert d_same_grid < 0.01 and d_true > 2 * d_same_grid, (d_true, d_same_grid)
