"""The one run configuration: typed, validated, documented where declared (longer notes: docs/configuration.md).

Every default of the project lives here; other modules read them from these classes
(``RegistryConfig.model_fields[...].default``). The class defaults *are* the ``DEFAULT_PRESET`` (the embedded
default the demo runs); the other presets (``src/dcgrpo/presets/*.yaml``, read by ``dcgrpo.config_presets``)
override some fields and show their arithmetic in comments. Loading order: defaults <- preset <- YAML file <-
CLI overrides (``section.field=value``, values parsed as YAML).

Invalid values fail with ``ConfigError`` naming the field, e.g.
``method.budget: Input should be greater than or equal to 0 (got -0.1)``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from dcgrpo.algorithm.methods import METHODS  # the one list of method names (imports no torch)
from dcgrpo.config_presets import (
    DEFAULT_PRESET,
    ConfigError,
    Section,
    deep_merge,
    flatten,
    format_validation_error,
    parse_override,
    preset_dict,
    read_yaml,
)
from dcgrpo.config_presets import PRESETS as PRESETS  # re-exported
from dcgrpo.config_verl import VerlConfig as VerlConfig  # re-exported
from dcgrpo.data.benchmark_names import canonical_name

Precision = Literal["bf16", "fp16", "fp32", "fp8"]
WeightGrid = Literal["none", "int4_g32", "int4_g128", "mxfp4", "nvfp4"]  # dcgrpo.engines.weight_grids
DiscrepancyKind = Literal["prob_diff", "ratio", "log_ratio"]
LossAgg = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]


def one_spelling(metric: str) -> str:
    """``eval/aime24/avg@32`` -> ``eval/aime24/avg_32``: the spelling MLflow stores (no ``@``), used everywhere."""
    return metric.replace("@", "_")


class DataConfig(Section):
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


class ModelConfig(Section):
    path: str | None = None
    """The base model: local HF directory, s3://bucket/prefix or Hub id org/name[@revision]; None: the tiny model."""
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
    """Supervised warm start of a freshly built tiny model (0 = none; measured: docs/configuration.md)."""
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


class RolloutConfig(Section):
    engine: Literal["vllm"] = "vllm"
    precision: Precision = "bf16"
    """Deploy precision of the inference engine. fp8: vLLM FP8 on GPU; FP8-grid weights on CPU."""
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_response_length: int = Field(32, gt=0)
    gpu_memory_utilization: float = Field(0.6, gt=0, le=1)
    cpu_kv_cache_gib: float = Field(0.125, gt=0)
    """KV cache of the vLLM CPU build, GiB (fractions allowed; sizing: docs/configuration.md)."""
    seed: int = 0
    """Engine-level seed (per-request seeds crash chunked prefill on vLLM CPU)."""
    weight_grid: WeightGrid = "none"
    """Lab setting: rollout and eval weights rounded onto this 4-bit grid (precision=bf16; not in pipelines)."""

    @model_validator(mode="after")
    def _grid_on_bf16(self) -> RolloutConfig:
        if self.weight_grid != "none" and self.precision != "bf16":
            raise ValueError(
                f"weight_grid={self.weight_grid} replaces the deploy precision's rounding: set rollout.precision=bf16 "
                f"(got {self.precision})"
            )
        return self


class TrainConfig(Section):
    train_precision: Literal["fp32", "bf16"] = "fp32"
    """Training-engine dtype (fp32 on CPU, bf16 on GPU)."""
    lr: float = Field(1e-4, gt=0)
    """AdamW learning rate (the tiny preset's sweep: docs/configuration.md)."""
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
    """Newest complete checkpoints kept in ``<out>/checkpoints``; None keeps every round's."""
    seed: int = 0
    backend: Literal["local", "verl"] = "local"
    """``local``: the single-machine loop (``dcgrpo.train.rl``); ``verl``: verl with the dc_grpo plugin."""

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


class MethodConfig(Section):
    name: str = "dc-grpo"
    """A method of ``dcgrpo.algorithm.methods.METHODS`` (built in or registered before the config is loaded)."""
    lambda_init: float = Field(0.0, ge=0)
    """lambda_0. For dual-grpo this is the fixed penalty weight."""
    dual_lr: float = Field(1e4, ge=0)
    """eta in Eq. 11: lambda moves by eta * (mean d - eps) per step; scale it to the discrepancy."""
    budget: float | Literal["auto"] = 3e-4
    """eps: tolerated batch-mean discrepancy (prob_diff); ``auto``: measured from the first steps (docs)."""
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


class RewardConfig(Section):
    timeout_s: float = Field(5.0, gt=0)
    """Hard wall-clock limit per scored item; an item over it scores 0 (its worker is killed and replaced)."""
    max_completion_chars: int = Field(200_000, gt=0)
    """Longer completions are cut to their last this-many characters before extraction (the answer is at the end)."""
    max_answer_chars: int = Field(1000, gt=0)
    """An extracted answer longer than this scores 0 without being parsed (megabyte and deeply nested inputs)."""
    num_workers: int = Field(2, gt=0)
    """Persistent verifier processes shared by every score_batch call of a process."""


class EvalConfig(Section):
    benchmarks: list[str] = Field(default_factory=lambda: ["synthetic", "math500", "amc23"])
    benchmark_dir: str = Field("samples", min_length=1)
    """``samples`` (shipped, 24 rows each), ``hub`` (Hugging Face, cached) or a directory of ``<name>.jsonl``."""
    k: dict[str, int] = Field(default_factory=dict)
    """Samples per problem for avg@k, per benchmark; missing ones use default_k."""
    default_k: int = Field(1, gt=0)
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(32, gt=0)
    greedy_pass1: bool = True
    max_model_len: int = Field(2048, gt=0)
    """Eval engine context (prompt + max_tokens); a prompt that does not fit scores 0 (too_long)."""
    batch_prompts: int = Field(64, gt=0)
    """Prompts per engine call; large, because on CPU a decode step's fixed cost dominates."""
    max_problems: int | None = Field(16, gt=0)
    """Cap per benchmark (None = all); the tiny preset samples to stay fast."""
    gate_metric: str = Field("eval/synthetic/avg_1", validate_default=True)  # checked even when not set
    """What the gate and selection compare: ``eval/<bench>/avg_<k>`` or ``eval/<bench>/pass_1_greedy``."""

    # Validated at load time: a typo here would otherwise surface only after training, in evaluate or promote.
    @field_validator("benchmarks")
    @classmethod
    def _known_benchmarks(cls, names: list[str]) -> list[str]:
        """Canonical names (aliases such as ``math-500`` resolved): the names evaluate's metrics carry."""
        if not names:
            raise ValueError("at least one benchmark is needed (the promotion gate reads one)")
        canonical = [canonical_name(n) for n in names]
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
        return {canonical_name(b): v for b, v in k.items()}

    @field_validator("gate_metric", mode="before")
    @classmethod
    def _one_spelling(cls, metric: Any) -> Any:
        """``avg@32`` -> ``avg_32`` (``one_spelling``)."""
        return one_spelling(metric) if isinstance(metric, str) else metric

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


def gate_metric_choices(benchmarks: list[str], k: dict[str, int], default_k: int, greedy_pass1: bool) -> list[str]:
    """The score metrics ``dcgrpo.evaluate`` logs for these settings (``BenchResult.metrics``' key forms)."""
    out = []
    for b in benchmarks:
        out.append(f"eval/{b}/avg_{k.get(b, default_k)}")
        if greedy_pass1:
            out.append(f"eval/{b}/pass_1_greedy")
    return out


class ExportConfig(Section):
    scheme: Literal["fp8_block", "fp8_channel"] = "fp8_block"
    block_size: int = Field(128, gt=0)
    """Block edge of the block-wise scheme (128x128 as verl's FP8 rollout)."""
    keep_high_precision: list[str] = Field(default_factory=lambda: ["lm_head", "mlp.gate", "embed_tokens"])
    """Modules left in high precision: whole dotted name components or ``re:<regex>``."""


class TrackingConfig(Section):
    mlflow_uri: str | None = None
    """MLflow tracking URI. None: $MLFLOW_TRACKING_URI, else a local store under storage.root."""
    experiment: str = "dcgrpo"
    run_name: str | None = None
    log_every: int = Field(1, gt=0)
    """Built-in loop: send step metrics every this many steps (and each round's last); verl logs every step."""
    flush_every: int = Field(4, gt=0)
    """Send buffered step metrics to MLflow every this many steps (and at every round end)."""
    retry_timeout_s: float = Field(30.0, ge=0)
    """At a round end, how long to retry an unreachable server before stopping cleanly."""


class StorageConfig(Section):
    root: str = "outputs"
    """Where artifacts go: a local directory or s3://bucket/prefix."""
    s3_endpoint_url: str | None = None
    """S3 endpoint (MinIO, moto); None: $DCGRPO_S3_ENDPOINT_URL, else $AWS_ENDPOINT_URL_S3, else AWS's."""

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


class RegistryConfig(Section):
    model_name: str = Field("dcgrpo-tiny", min_length=1, pattern=r"^[^'\"`]+$")
    """Registered model of the served (FP8) checkpoint. No quotes: MLflow's search filters cannot hold them."""
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"
    bf16_suffix: str = "-bf16"
    """The unquantised twin is registered as ``model_name + bf16_suffix`` (its own aliases)."""
    max_discrepancy: float | None = Field(1e-3, ge=0)
    """Gate: the challenger's last-round mean discrepancy must be <= this; None: budget x (1 + slack)."""
    budget_slack: float = Field(0.25, ge=0)
    """Fraction above method.budget the gate allows (dual ascent oscillates around the budget)."""
    promotion_lock_wait_s: float = Field(60.0, gt=0)
    """How long a promotion waits for another promotion of the same model to finish before giving up."""
    promotion_lock_stale_s: float = Field(600.0, gt=0)
    """A promotion lock older than this belongs to a crashed run and is broken (with a warning)."""
    artifacts_destination: str | None = "s3://mlflow/artifacts"
    """The MLflow server's --artifacts-destination: maps mlflow-artifacts:/ sources to a storageUri."""
    serve_on_promote: bool = False
    """Promotion applies the champion's InferenceService before it moves the alias (``--serve``)."""
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


class RunConfig(Section):
    """A whole run: data -> model -> rollout -> training -> method -> eval -> export."""

    preset: str = DEFAULT_PRESET
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
        return flatten(self.model_dump(mode="json"))

    def config_hash(self) -> str:
        """Stable short hash of the full config (registry tag, cache key)."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def build_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a nested dict into a RunConfig, raising ConfigError naming each bad field."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    preset: str | None = None,
) -> RunConfig:
    """Defaults <- preset <- YAML file <- overrides, validated once at the end.

    The preset is taken from ``preset``, else the file's ``preset:`` key, else
    an override ``preset=...``, else ``DEFAULT_PRESET``.
    """
    file_data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        file_data = read_yaml(path.read_text(), str(path))
        source = str(path)
    override_data: dict[str, Any] = {}
    for item in overrides or []:
        override_data = deep_merge(override_data, parse_override(item))
    name = preset or override_data.get("preset") or file_data.get("preset") or DEFAULT_PRESET
    merged = deep_merge(deep_merge(preset_dict(name), file_data), override_data)
    merged["preset"] = name
    if overrides:
        source += f" + overrides {overrides}"
    return build_config(merged, source)
