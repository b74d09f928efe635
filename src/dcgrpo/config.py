"""The one run configuration: typed, validated, documented where declared.

Every default of the project lives here. The class defaults *are* the
``tiny-cpu`` preset (the embedded default the demo runs); the other presets
(``src/dcgrpo/presets/*.yaml``) override some fields and show their arithmetic
in comments. Loading order: defaults <- preset <- YAML file <- CLI overrides
(``section.field=value``, values parsed as YAML).

Invalid values fail with ``ConfigError`` naming the field, e.g.
``method.budget: Input should be greater than or equal to 0 (got -0.1)``.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from dcgrpo.errors import DcgrpoError

Precision = Literal["bf16", "fp16", "fp32", "fp8"]
WeightGrid = Literal["none", "int4_g32", "int4_g128", "mxfp4", "nvfp4"]  # dcgrpo.engines.weight_grids
DiscrepancyKind = Literal["prob_diff", "ratio", "log_ratio"]
LossAgg = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]
PRESETS = ("tiny-cpu", "qwen3-8b", "qwen3-30b-a3b")
DEFAULT_PRESET = PRESETS[0]
"""What every entry point runs when no preset is named: the tiny model on CPU (the demo, the pipeline's default)."""


class ConfigError(DcgrpoError, ValueError):
    """A configuration value is missing, malformed or inconsistent."""


class _Section(BaseModel):
    # Typos in YAML keys or overrides are errors, not silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    train_path: str | None = None
    """Prepared training parquet (verl schema), local or s3://. None: synthetic arithmetic task."""
    val_path: str | None = None
    """Prepared validation parquet. None: the held-out split of the same source."""
    prompt_template: Literal["boxed", "dapo"] = "boxed"
    """How the problem is asked: ``boxed`` (\\boxed{} answer) or DAPO's "Answer:" line."""
    val_fraction: float = Field(0.02, gt=0, lt=1)
    """Fraction held out for validation when preparing a dataset."""
    max_prompt_length: int = Field(128, gt=0)
    """Prompts longer than this (tokens) are dropped at preparation."""
    synthetic_train_size: int = Field(2048, gt=0)
    synthetic_val_size: int = Field(256, gt=0)
    synthetic_difficulty: int = Field(1, ge=1, le=5)
    """1: a+b with small numbers ... 5: multi-step word problems."""
    seed: int = 0


class ModelConfig(_Section):
    path: str | None = None
    """The base model: a local HF-format directory, any HF-format directory on s3://bucket/prefix, or a
    Hugging Face Hub id org/name[@revision] (downloaded into $DCGRPO_MODEL_CACHE; HF_TOKEN, HF_HOME and
    HF_HUB_OFFLINE=1 apply). None: build the tiny model below."""
    arch: Literal["qwen3", "qwen3-moe"] = "qwen3"
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(384, gt=0)
    vocab_size: int = Field(512, gt=0)
    num_experts: int = Field(4, gt=0)
    """MoE only."""
    num_experts_per_tok: int = Field(2, gt=0)
    """MoE only."""
    tie_word_embeddings: bool = False
    """Untied by default: tied heads are a weight-sync trap in vLLM (STACK-NOTES)."""
    sft_steps: int = Field(600, ge=0)
    """Supervised warm start of a freshly built tiny model (0 = none). tiny-cpu, difficulty 1, measured:
    300 steps -> 8% held-out greedy accuracy (GRPO groups almost all-zero), 600 -> 75% greedy / 58% sampled
    at T=1 with 45 of 64 groups of 8 mixed (the signal GRPO needs), 1200 -> 79% / 78%, 24 of 64 mixed."""
    sft_lr: float = Field(3e-3, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError("num_experts_per_tok must be <= num_experts")
        return self

    @field_validator("path")
    @classmethod
    def _path_is_a_model_location(cls, path: str | None) -> str | None:
        # Syntax only: whether a directory or Hub id exists is known where the step runs, not where it is compiled.
        if path is None or not path.strip():
            return None  # an empty UI field means "no base model", as None does
        bucket = path[len("s3://") :].partition("/")[0] if path.startswith("s3://") else ""
        if path.startswith("s3:") and not bucket:
            raise ValueError("an s3:// model.path must name a bucket: s3://bucket/prefix")
        scheme = path.partition("://")[0]
        if "://" in path and scheme != "s3":
            raise ValueError(
                f"{scheme}:// is not supported: use a local directory, s3://bucket/prefix or a Hugging Face id "
                "org/name[@revision] (no hf:// prefix)"
            )
        return path


class RolloutConfig(_Section):
    engine: Literal["vllm"] = "vllm"
    precision: Precision = "bf16"
    """Deploy precision of the inference engine. fp8: vLLM FP8 on GPU; FP8-grid weights on CPU."""
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_response_length: int = Field(32, gt=0)
    gpu_memory_utilization: float = Field(0.6, gt=0, le=1)
    cpu_kv_cache_gib: float = Field(0.125, gt=0)
    """KV cache of the vLLM CPU build, GiB (fractions allowed; passed as ``kv_cache_memory_bytes``; a set
    ``$VLLM_CPU_KVCACHE_SPACE``, whole GiB, wins). Needed: tokens in flight x layers x 2 x kv_heads x head_dim x
    2 bytes; tiny-cpu's model takes 512 B a token, so 0.125 GiB holds 262k tokens (1 GiB cost 1 GiB of RSS for
    nothing: benchmarks/results/vs_trl.md). A 8B model on CPU needs several GiB."""
    seed: int = 0
    """Engine-level seed (per-request seeds crash chunked prefill on vLLM CPU)."""
    weight_grid: WeightGrid = "none"
    """Lab setting (benchmarks/lab.py, study ladder): the rollout and evaluation engine serve their Linear weights
    rounded onto this 4-bit grid (compressed-tensors' W4A16 group 32/128, MXFP4, NVFP4 numerics; served in
    bf16, as vLLM's 4-bit kernels dequantise), to measure a larger mismatch than FP8's. Needs precision=bf16.
    Training runs and evaluates with it locally; the pipeline refuses it, because the export writes FP8."""

    @model_validator(mode="after")
    def _grid_on_bf16(self) -> RolloutConfig:
        if self.weight_grid != "none" and self.precision != "bf16":
            raise ValueError(
                f"weight_grid={self.weight_grid} replaces the deploy precision's rounding: set rollout.precision=bf16 "
                f"(got {self.precision})"
            )
        return self


class TrainConfig(_Section):
    train_precision: Literal["fp32", "bf16"] = "fp32"
    """Training-engine dtype (fp32 on CPU, bf16 on GPU)."""
    lr: float = Field(1e-4, gt=0)
    """tiny-cpu (0.4M params, AdamW), 16 steps from the 600-step warm start: 1e-4 -> held-out 0.75 -> 0.84,
    2e-4 -> 0.80, 3e-4 -> 0.71, 1e-3 -> 0.37 (collapse)."""
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0)
    prompts_per_batch: int = Field(8, gt=0)
    """Prompts sampled per step (the paper's "batch size")."""
    group_size: int = Field(8, gt=0)
    """Responses per prompt (GRPO's n). 8: more groups with mixed rewards than 4 (all-equal groups give A = 0)."""
    ppo_mini_batch: int = Field(4, gt=0)
    """Prompts per optimiser step; prompts_per_batch / ppo_mini_batch updates per epoch."""
    ppo_epochs: int = Field(1, gt=0)
    clip_low: float = Field(0.2, gt=0, lt=1)
    clip_high: float = Field(0.28, gt=0)
    """DAPO clip-higher."""
    clip_ratio_c: float = Field(3.0, gt=1)
    """Dual-clip bound for negative advantages (verl's default)."""
    loss_agg: LossAgg = "token-mean"
    norm_adv_by_std: bool = True
    kl_loss_coef: float = Field(0.0, ge=0)
    """KL to a reference policy; the paper trains with it off."""
    entropy_coef: float = Field(0.0, ge=0)
    rounds: int = Field(2, gt=0)
    """Pipeline rounds; a checkpoint is written at the end of each."""
    steps_per_round: int = Field(8, gt=0)
    keep_checkpoints: int | None = Field(None, gt=0)
    """Checkpoints kept in ``<out>/checkpoints`` (the newest N complete ones; older ones are deleted after each
    new one is published); None keeps every round's."""
    seed: int = 0
    backend: Literal["local", "verl"] = "local"
    """Where a pipeline round trains: ``local`` = the single-machine loop in the step's pod (``dcgrpo.train.rl``);
    ``verl`` = verl with the dc_grpo plugin, launched as ``verl.launch`` says (a KubeRay RayJob or in the pod)."""

    @property
    def responses_per_batch(self) -> int:
        return self.prompts_per_batch * self.group_size

    @property
    def updates_per_step(self) -> int:
        return self.ppo_epochs * (self.prompts_per_batch // self.ppo_mini_batch)

    @model_validator(mode="after")
    def _mini_batch_divides(self) -> TrainConfig:
        if self.ppo_mini_batch > self.prompts_per_batch or self.prompts_per_batch % self.ppo_mini_batch:
            raise ValueError(
                f"ppo_mini_batch ({self.ppo_mini_batch}) must divide prompts_per_batch ({self.prompts_per_batch})"
            )
        return self


class MethodConfig(_Section):
    name: str = "dc-grpo"
    """A method of the registry (``dcgrpo.algorithm.methods.METHODS``): grpo, dual-grpo, dc-grpo, tis, mis,
    icepop, or one registered with ``register_method`` before the config is loaded."""
    lambda_init: float = Field(0.0, ge=0)
    """lambda_0. For dual-grpo this is the fixed penalty weight."""
    dual_lr: float = Field(1e4, ge=0)
    """eta in Eq. 11. Scale it to the discrepancy: lambda moves by eta * (mean d - eps) per step, and with
    prob_diff violations of ~1e-4 on tiny-cpu, eta 1e4 moves lambda ~1 per step (measured: lambda reaches
    ~10 in 16 steps, mean d pulled from ~4e-4 to ~3e-4; eta 1 left lambda at ~2e-3, i.e. plain GRPO)."""
    budget: float | Literal["auto"] = 3e-4
    """eps: tolerated batch-mean discrepancy (prob_diff). The SFT'd tiny model's bf16-vs-fp32 mean d is
    ~2-5e-4 and grows as RL sharpens the policy (measured), so 3e-4 makes the constraint bind on tiny-cpu.
    ``auto`` (ours, not the paper's): eps = budget_auto_scale x the mean d of the first budget_auto_steps
    steps (the warm start's discrepancy floor; lambda stays at lambda_init meanwhile). No sweep needed:
    benchmarks/results/SCIENCE.md compares it with the best swept eps."""
    budget_auto_steps: int = Field(4, gt=0)
    """``budget: auto``: steps whose batch-mean d set the budget."""
    budget_auto_scale: float = Field(1.0, gt=0)
    """``budget: auto``: eps = this x the measured floor (1: the mismatch may not grow past where it started)."""
    lambda_max: float = Field(10.0, ge=0)
    """Projection bound of lambda."""
    discrepancy: DiscrepancyKind = "prob_diff"
    margin: float = Field(0.0, ge=0)
    """Token hinge max(d - margin, 0); 0 = the paper's final method."""
    tis_threshold: float = Field(2.0, gt=0)
    """TIS truncation C (verl decoupled_token_is default)."""
    mis_threshold: float = Field(2.0, gt=0)
    mis_low: float = Field(0.5, gt=0)
    mis_high: float = Field(2.0, gt=0)
    icepop_low: float = Field(0.5, gt=0)
    icepop_high: float = Field(5.0, gt=0)

    @field_validator("budget", mode="before")
    @classmethod
    def _budget_or_auto(cls, value: Any) -> float | str:
        if value == "auto":
            return value
        try:
            budget = float(value)
        except (TypeError, ValueError):
            raise ValueError("Input should be a number >= 0, or 'auto'") from None
        if not budget >= 0:  # also refuses NaN
            raise ValueError("Input should be greater than or equal to 0")
        return budget

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        from dcgrpo.algorithm.methods import METHODS  # the registry is the one list of names (imports no torch)

        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; registered: {', '.join(METHODS)}")
        return name

    @model_validator(mode="after")
    def _bounds(self) -> MethodConfig:
        if self.lambda_max < self.lambda_init:
            raise ValueError(f"lambda_max ({self.lambda_max}) must be >= lambda_init ({self.lambda_init})")
        if self.mis_low > self.mis_high:
            raise ValueError(f"mis_low ({self.mis_low}) must be <= mis_high ({self.mis_high})")
        if self.icepop_low > self.icepop_high:
            raise ValueError(f"icepop_low ({self.icepop_low}) must be <= icepop_high ({self.icepop_high})")
        return self


class RewardConfig(_Section):
    timeout_s: float = Field(5.0, gt=0)
    """Hard wall-clock limit per scored item; an item over it scores 0 (its worker is killed and replaced)."""
    max_completion_chars: int = Field(200_000, gt=0)
    """Longer completions are cut to their last this-many characters before extraction (the answer is at the end)."""
    max_answer_chars: int = Field(1000, gt=0)
    """An extracted answer longer than this scores 0 without being parsed (megabyte and deeply nested inputs)."""
    num_workers: int = Field(2, gt=0)
    """Persistent verifier processes shared by every score_batch call of a process."""


class EvalConfig(_Section):
    benchmarks: list[str] = Field(default_factory=lambda: ["synthetic", "math500", "amc23"])
    benchmark_dir: str = Field("samples", min_length=1)
    """Where the benchmarks come from: ``samples`` (the first 24 rows of each, shipped in the package: the demo's),
    ``hub`` (each benchmark's Hugging Face dataset, cached under ``HF_HOME``; ``HF_HUB_OFFLINE=1`` reads the cache
    only), or a directory of ``<name>.jsonl`` files, local or ``s3://``."""
    k: dict[str, int] = Field(default_factory=dict)
    """Samples per problem for avg@k, per benchmark; missing ones use default_k."""
    default_k: int = Field(1, gt=0)
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(32, gt=0)
    greedy_pass1: bool = True
    max_model_len: int = Field(2048, gt=0)
    """Eval engine context (prompt + max_tokens). A prompt that does not fit scores 0 and is counted as too_long.
    The paper's 32,768-token answers need >= 32,768 + longest prompt on a model that supports it."""
    batch_prompts: int = Field(64, gt=0)
    """Prompts per engine call (one progress-bar step). Large: on CPU a decode step's fixed cost dominates
    (tiny model, 2 cores: 16 prompts x 2 samples ~230 tok/s, 128 x 2 ~1,700 tok/s)."""
    max_problems: int | None = Field(16, gt=0)
    """Cap per benchmark (None = all); the tiny preset samples to stay fast."""
    gate_metric: str = Field("eval/synthetic/avg_1", validate_default=True)  # checked even when not set
    """Metric the promotion gate and method selection compare: ``eval/<benchmark>/avg_<k>`` (avg@k; k: ``k_for``)
    or ``eval/<benchmark>/pass_1_greedy`` (with greedy_pass1) of a benchmark in ``benchmarks``: the names MLflow,
    KFP and the registry show. The ``avg@<k>`` / ``pass@1_greedy`` spelling is read as these."""

    # Validated at load time: a typo here would otherwise surface only after training, in evaluate or promote.
    @field_validator("benchmarks")
    @classmethod
    def _known_benchmarks(cls, names: list[str]) -> list[str]:
        """Canonical names (aliases such as ``math-500`` resolved): the names evaluate's metrics carry."""
        if not names:
            raise ValueError("at least one benchmark is needed (the promotion gate reads one)")
        canonical = [_benchmark_name(n) for n in names]
        dup = next((b for b in canonical if canonical.count(b) > 1), None)
        if dup:
            raise ValueError(f"{dup} is listed more than once")
        return canonical

    @field_validator("k")
    @classmethod
    def _known_k(cls, k: dict[str, int]) -> dict[str, int]:
        """Keys are benchmark names (canonicalised like ``benchmarks``, so ``k_for`` finds them); values >= 1."""
        bad = {b: v for b, v in k.items() if v < 1}
        if bad:
            raise ValueError(f"samples per problem must be >= 1, got {bad}")
        return {_benchmark_name(b): v for b, v in k.items()}

    @field_validator("gate_metric", mode="before")
    @classmethod
    def _one_spelling(cls, metric: Any) -> Any:
        """``avg@32`` -> ``avg_32``: the spelling MLflow stores (it forbids ``@``), so one name is used everywhere."""
        return metric.replace("@", "_") if isinstance(metric, str) else metric

    @field_validator("gate_metric")
    @classmethod
    def _measured_gate(cls, metric: str, info: ValidationInfo) -> str:
        """The gate must be a score evaluate() produces for these benchmarks, or promotion fails after training."""
        fields = ("benchmarks", "k", "default_k", "greedy_pass1")
        if not all(f in info.data for f in fields):  # one of them is invalid: that error is reported instead
            return metric
        choices = gate_metric_choices(*(info.data[f] for f in fields))
        if metric not in choices:
            raise ValueError(
                f"{metric!r} is not a metric evaluate() produces for eval.benchmarks {info.data['benchmarks']}; "
                f"choose one of: {', '.join(choices)}"
            )
        return metric

    def k_for(self, benchmark: str) -> int:
        return self.k.get(benchmark, self.default_k)


def _benchmark_name(name: str) -> str:
    """``dcgrpo.data.benchmarks.canonical_name`` (imported here: it needs no torch; its error lists the choices)."""
    from dcgrpo.data.benchmarks import canonical_name

    return canonical_name(name)


def gate_metric_choices(benchmarks: list[str], k: dict[str, int], default_k: int, greedy_pass1: bool) -> list[str]:
    """The score metrics ``dcgrpo.evaluate`` logs for these settings (``BenchResult.metrics``' key forms)."""
    out = []
    for b in benchmarks:
        out.append(f"eval/{b}/avg_{k.get(b, default_k)}")
        if greedy_pass1:
            out.append(f"eval/{b}/pass_1_greedy")
    return out


class ExportConfig(_Section):
    scheme: Literal["fp8_block", "fp8_channel"] = "fp8_block"
    block_size: int = Field(128, gt=0)
    """Block edge of the block-wise scheme (128x128 as verl's FP8 rollout)."""
    keep_high_precision: list[str] = Field(default_factory=lambda: ["lm_head", "mlp.gate", "embed_tokens"])
    """Modules left in high precision (head, MoE router, embeddings): whole dotted name components
    (``mlp.gate`` matches ``layers.0.mlp.gate``, not ``mlp.gate_proj``) or ``re:<regex>``."""


class TrackingConfig(_Section):
    mlflow_uri: str | None = None
    """MLflow tracking URI. None: $MLFLOW_TRACKING_URI, else a local store under storage.root."""
    experiment: str = "dcgrpo"
    run_name: str | None = None
    log_every: int = Field(1, gt=0)
    """Send the built-in loop's step metrics to MLflow every this many steps (and each round's last step; the
    checkpoint's history keeps every step). verl logs every step."""
    flush_every: int = Field(4, gt=0)
    """Send buffered step metrics to MLflow every this many steps (and at every round end)."""
    retry_timeout_s: float = Field(30.0, ge=0)
    """At a round end, how long to retry an unreachable server before stopping cleanly
    (checkpoint kept, unsent metrics spilled for replay on resume; see dcgrpo.tracking)."""


class StorageConfig(_Section):
    root: str = "outputs"
    """Where artifacts go: a local directory or s3://bucket/prefix."""
    s3_endpoint_url: str | None = None
    """For MinIO / moto, used by every s3:// read and write (data, models, checkpoints). None:
    $DCGRPO_S3_ENDPOINT_URL, else $AWS_ENDPOINT_URL_S3, else AWS's default resolution."""

    @field_validator("root")
    @classmethod
    def _root_names_a_bucket(cls, root: str) -> str:
        # "s3://" without a bucket once became a local directory "./s3:/..." and the run exited 0.
        bucket = root[len("s3://") :].partition("/")[0] if root.startswith("s3://") else ""
        if root.startswith("s3:") and not bucket:
            raise ValueError("an s3:// root must name a bucket: s3://bucket/prefix")
        if not root.strip():
            raise ValueError("must be a local directory or s3://bucket/prefix")
        return root

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint_is_http(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL, e.g. http://minio:9000")
        return url


class RegistryConfig(_Section):
    model_name: str = Field("dcgrpo-tiny", min_length=1, pattern=r"^[^'\"`]+$")
    """Registered model of the served (FP8) checkpoint. No quotes: MLflow's search filters cannot hold them."""
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"
    bf16_suffix: str = "-bf16"
    """The unquantised twin is registered as ``model_name + bf16_suffix`` (its own aliases)."""
    max_discrepancy: float | None = Field(1e-3, ge=0)
    """Promotion gate: the challenger's discrepancy (mean over its last round) must be <= this deployment
    tolerance. None: method.budget * (1 + budget_slack). tiny-cpu: 1e-3, because the 0.4M-param model's
    bf16-vs-fp32 noise floor (~4-5e-4 after RL, measured) sits above any budget that makes lambda move, and
    at lambda <= 10 the penalty cannot pull the mean below it; the paper presets gate on the budget."""
    budget_slack: float = Field(0.25, ge=0)
    """Dual ascent holds the mean discrepancy *at* the budget, oscillating around it, so the gate allows this
    fraction above it by default; an unconstrained method typically sits well above (tiny-cpu: GRPO ~4e-4
    against a 3e-4 budget)."""
    promotion_lock_wait_s: float = Field(60.0, gt=0)
    """How long a promotion waits for another promotion of the same model to finish before giving up."""
    promotion_lock_stale_s: float = Field(600.0, gt=0)
    """A promotion lock older than this is taken to belong to a crashed run and is broken (with a warning);
    a promotion itself takes seconds."""
    artifacts_destination: str | None = "s3://mlflow/artifacts"
    """The MLflow server's --artifacts-destination (manifests/mlflow/mlflow.yaml's): maps mlflow-artifacts:/
    sources to a storageUri KServe can fetch. Change it with the server's; None: only versions with a
    ``storage_uri`` tag (an s3:// export) can be served."""
    serve_on_promote: bool = False
    """Promotion also applies the champion's InferenceService (KServe, ``serving_namespace``) before it moves
    the alias (``dcgrpo promote --serve``); needs Kubernetes credentials: the pod's or a kubeconfig."""
    serving_namespace: str = "dcgrpo"
    serving_service_account: str = "dcgrpo-serving"
    """Service account whose Secret holds the S3 credentials KServe's storage initializer uses."""
    serving_gpus: int = Field(1, gt=0)
    """GPUs per replica (= vLLM tensor parallel size)."""
    serving_max_model_len: int = Field(8192, gt=0)
    serving_gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    vllm_image: str = "vllm/vllm-openai:v0.33.0"
    """Image of the plain `vllm serve` Deployment (same vLLM as the trainer image)."""
    storage_initializer_image: str = "kserve/storage-initializer:v0.15.2"
    """Init container that copies storageUri to /mnt/models in the plain Deployment."""


class VerlConfig(_Section):
    """Multi-node training on verl (Ray) with the DC-GRPO plugin, and its KubeRay launch.

    The training hyperparameters come from ``train``/``method``/``rollout``;
    this section only says where and how verl runs. Rendered into verl Hydra
    overrides by ``dcgrpo.verl_plugin.config`` and into a RayJob by
    ``dcgrpo.verl_plugin.rayjob``.
    """

    trainer_mode: Literal["dc_grpo", "sync"] = "dc_grpo"
    """verl v1 trainer: ``dc_grpo`` (our plugin; runs every method.name) or verl's own ``sync`` (GRPO only)."""
    strategy: Literal["fsdp", "fsdp2", "megatron"] = "fsdp"
    """Training engine of the actor and ref (``megatron`` renders verl's ``model_engine=megatron``)."""
    megatron_tp: int = Field(1, gt=0)
    """Megatron tensor parallel size (strategy=megatron only, as are all megatron_* fields)."""
    megatron_pp: int = Field(1, gt=0)
    """Megatron pipeline parallel size."""
    megatron_cp: int = Field(1, gt=0)
    """Megatron context parallel size (splits each sequence; for long responses)."""
    megatron_ep: int = Field(1, gt=0)
    """Megatron expert parallel size (MoE experts split over this many GPUs)."""
    megatron_etp: int | None = Field(None, gt=0)
    """Megatron expert tensor parallel size; None = megatron_tp (Megatron-core's default)."""
    megatron_sequence_parallel: bool = True
    """Megatron sequence parallelism (verl turns it off itself when megatron_tp is 1)."""
    megatron_param_offload: bool = False
    """Offload actor and ref parameters (and grad buffers) to CPU while the rollout runs."""
    megatron_optimizer_offload: bool = False
    """Offload the actor's optimizer state to CPU while it is not stepping."""
    nnodes: int = Field(1, gt=0)
    """Ray nodes (1 head + nnodes-1 GPU workers; the head also trains)."""
    gpus_per_node: int = Field(8, gt=0)
    rollout_tp: int = Field(1, gt=0)
    """vLLM tensor parallel size per rollout replica."""
    micro_batch_per_gpu: int = Field(4, gt=0)
    """Responses per GPU per forward/backward (memory knob; does not change the maths)."""
    checkpoint_dir: str = "/checkpoints"
    """verl's trainer.default_local_dir: must be shared by every round (a PVC on the cluster)."""
    save_freq: int | None = Field(None, gt=0)
    """Steps between verl checkpoints; None = train.steps_per_round (one per pipeline round)."""
    extra_overrides: list[str] = Field(default_factory=list)
    """Raw Hydra overrides appended last (escape hatch; prefer a typed field)."""
    ray_version: str = "2.60.0"
    """Ray version of the image, for KubeRay. Image, namespace, GPU pool, secrets and the checkpoint PVC are
    not run config: they are the deployment contract's (``dcgrpo.deploy``), outside ``config_hash``."""
    cpu_per_node: int = Field(16, gt=0)
    memory_gib_per_node: int = Field(128, gt=0)
    shm_gib: int = Field(64, gt=0)
    """/dev/shm size (Ray object store, NCCL, vLLM): the 64 MiB container default is far too small."""
    timeout_s: int = Field(86_400, gt=0)
    """RayJob activeDeadlineSeconds and the follow loop's limit."""
    poll_s: float = Field(10.0, gt=0)
    """Seconds between RayJob status polls."""
    launch: Literal["rayjob", "single-node"] = "rayjob"
    """With ``train.backend=verl``: ``rayjob`` submits a KubeRay RayJob on the GPU pool and follows it;
    ``single-node`` runs verl inside the pipeline step's pod (its GPUs: compile with ``--accelerator-limit``)."""

    @model_validator(mode="after")
    def _megatron_layout(self) -> VerlConfig:
        if self.strategy != "megatron":
            return self
        gpus = self.nnodes * self.gpus_per_node
        where = f"verl.nnodes x verl.gpus_per_node = {self.nnodes} x {self.gpus_per_node} = {gpus} GPUs"
        dense = self.megatron_tp * self.megatron_pp * self.megatron_cp
        if gpus % dense:
            raise ValueError(
                f"verl.megatron_tp x verl.megatron_pp x verl.megatron_cp = {self.megatron_tp} x {self.megatron_pp} "
                f"x {self.megatron_cp} = {dense} must divide {where}"
            )
        etp = self.megatron_etp or self.megatron_tp
        experts = self.megatron_ep * etp * self.megatron_pp
        if gpus % experts:
            raise ValueError(
                f"verl.megatron_ep x verl.megatron_etp (None = megatron_tp) x verl.megatron_pp = {self.megatron_ep} "
                f"x {etp} x {self.megatron_pp} = {experts} must divide {where}"
            )
        return self


class RunConfig(_Section):
    """A whole run: data -> model -> rollout -> training -> method -> eval -> export."""

    preset: str = "tiny-cpu"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    verl: VerlConfig = Field(default_factory=VerlConfig)

    @model_validator(mode="after")
    def _cross_section(self) -> RunConfig:
        # Every method here is GRPO-based: a group of one response has no baseline.
        if self.train.group_size < 2:
            raise ValueError(
                f"train.group_size must be >= 2 for GRPO-based method {self.method.name!r} (got {self.train.group_size})"
            )
        if self.method.budget == "auto" and self.registry.max_discrepancy is None:
            raise ValueError(
                "method.budget=auto needs registry.max_discrepancy: the promotion gate cannot follow a budget "
                "that is only known after the first steps"
            )
        return self

    def promotion_discrepancy_limit(self) -> float:
        """The promotion gate's discrepancy limit (``registry.max_discrepancy`` or the slackened budget)."""
        if self.registry.max_discrepancy is not None:
            return self.registry.max_discrepancy
        return self.method.budget * (1.0 + self.registry.budget_slack)

    def to_flat_dict(self) -> dict[str, Any]:
        """``{"train.lr": 1e-4, ...}``: for MLflow params and logs."""
        return _flatten(self.model_dump(mode="json"))

    def config_hash(self) -> str:
        """Stable short hash of the full config (registry tag, cache key)."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value) and key != "k":
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {seen[key]} and line {line})", key_node.start_mark
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506  (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    return data


def preset_dict(name: str) -> dict[str, Any]:
    """The overrides a named preset applies on top of the defaults."""
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    text = resources.files("dcgrpo.presets").joinpath(f"{name}.yaml").read_text()
    return _read_yaml(text, f"preset {name}")


def parse_override(item: str) -> dict[str, Any]:
    """``"train.lr=1e-5"`` -> ``{"train": {"lr": 1e-5}}`` (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.field=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
    nested: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling against dcgrpo.config)"
        got = err.get("input")
        shown = "" if isinstance(got, dict) or err["type"] == "missing" else f" (got {got!r})"
        lines.append(f"  {loc}: {msg}{shown}")
    return f"invalid configuration from {source}:\n" + "\n".join(lines)


def build_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a nested dict into a RunConfig, raising ConfigError naming each bad field."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    preset: str | None = None,
) -> RunConfig:
    """Defaults <- preset <- YAML file <- overrides, validated once at the end.

    The preset is taken from ``preset``, else the file's ``preset:`` key, else
    an override ``preset=...``, else ``tiny-cpu``.
    """
    file_data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        file_data = _read_yaml(path.read_text(), str(path))
        source = str(path)
    override_data: dict[str, Any] = {}
    for item in overrides or []:
        override_data = _deep_merge(override_data, parse_override(item))
    name = preset or override_data.get("preset") or file_data.get("preset") or "tiny-cpu"
    merged = _deep_merge(_deep_merge(preset_dict(name), file_data), override_data)
    merged["preset"] = name
    if overrides:
        source += f" + overrides {overrides}"
    return build_config(merged, source)


# ------------------------------------------------------------------ pipeline run parameters


class RunParameters(NamedTuple):
    """The pipeline parameters that default to the preset's value, resolved."""

    rounds: int
    model_name: str
    round_pod: str = "gpu"
    """``launcher`` when rounds train on a RayJob (the round task only launches and follows it), else ``gpu``."""


def round_pod(cfg) -> str:
    """Where a round's compute runs: the pipeline selects the round task's pod size by this (issue 12, point 9)."""
    return "launcher" if cfg.train.backend == "verl" and cfg.verl.launch == "rayjob" else "gpu"


def resolve_run_parameters(
    preset: str, overrides: list[str] | None, rounds: int, model_name: str, max_rounds: int
) -> RunParameters:
    """``rounds`` 0 -> the preset's ``train.rounds``, ``model_name`` '' -> its ``registry.model_name``.

    One function for both paths: ``pipeline_arguments`` (CLI, CI) and the
    pipeline's first step (a run started in the Kubeflow UI with only a preset
    chosen). Raises ``ConfigError`` naming ``rounds`` when the count is more
    than the compiled pipeline can run, before anything trains.
    """
    cfg = load_config(preset=preset or None, overrides=list(overrides or []))
    if cfg.rollout.weight_grid != "none":
        raise ConfigError(
            f"rollout.weight_grid={cfg.rollout.weight_grid} is a lab setting (benchmarks/lab.py): the "
            "pipeline exports and serves FP8, so its rounds would train against a deployment it never makes"
        )
    n = int(rounds) or cfg.train.rounds
    if not 1 <= n <= max_rounds:
        source = "" if rounds else f" (preset {cfg.preset}'s train.rounds)"
        raise ConfigError(
            f"rounds={n}{source}: this compiled pipeline runs 1 to {max_rounds} rounds; ask for fewer, or "
            f"recompile with `dcgrpo compile --max-rounds {n}` and upload or submit that YAML"
        )
    return RunParameters(n, model_name or cfg.registry.model_name, round_pod(cfg))
