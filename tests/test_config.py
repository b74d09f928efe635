"""The one run config: presets, YAML + overrides, and errors that name the field."""

import pytest

from dcgrpo.config import PRESETS, ConfigError, RunConfig, load_config


def test_defaults_are_the_tiny_cpu_preset_and_valid():
    cfg = load_config()
    assert cfg.preset == "tiny-cpu"
    assert cfg == load_config(preset="tiny-cpu")
    assert cfg.method.name == "dc-grpo" and cfg.rollout.precision == "bf16"
    assert cfg.train.responses_per_batch == cfg.train.prompts_per_batch * cfg.train.group_size


@pytest.mark.parametrize("name", ["qwen3-8b", "qwen3-30b-a3b"])
def test_paper_presets_carry_the_published_settings(name):
    cfg = load_config(preset=name)
    assert cfg.train.prompts_per_batch == 64
    assert cfg.train.ppo_mini_batch == 16
    assert cfg.train.updates_per_step == 4
    assert (cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_response_length) == (1.0, 1.0, 8192)
    assert cfg.train.kl_loss_coef == 0.0
    assert (cfg.eval.temperature, cfg.eval.max_tokens) == (0.7, 32768)
    assert cfg.model.arch == ("qwen3-moe" if "a3b" in name else "qwen3")


def test_all_presets_load():
    for name in PRESETS:
        assert load_config(preset=name).preset == name


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: qwen3-8b\ntrain:\n  lr: 5.0e-7\nmethod:\n  name: grpo\n")
    cfg = load_config(path, ["train.lr=2e-6", "method.budget=0.01", "eval.benchmarks=[aime24]"])
    assert cfg.preset == "qwen3-8b"
    assert cfg.train.lr == 2e-6  # override beats file
    assert cfg.method.name == "grpo"  # file beats preset
    assert cfg.method.budget == 0.01
    assert cfg.eval.benchmarks == ["aime24"]
    assert cfg.train.prompts_per_batch == 64  # preset beats defaults


@pytest.mark.parametrize(
    "override, field",
    [
        ("method.budget=-0.1", "method.budget"),
        ("method.name=ppo", "method.name"),
        ("train.group_size=1", "train.group_size"),
        ("rollout.precision=int4", "rollout.precision"),
        ("train.ppo_mini_batch=3", "ppo_mini_batch"),
        ("train.lrr=1", "train.lrr"),
        ("eval.temperature=abc", "eval.temperature"),
    ],
)
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert field in str(err.value)


def test_lambda_max_below_lambda_init_is_rejected():
    with pytest.raises(ConfigError, match=r"method: lambda_max \(1.0\) must be >= lambda_init \(2.0\)"):
        load_config(overrides=["method.lambda_max=1", "method.lambda_init=2"])


def test_verl_megatron_layout():
    assert load_config().verl.strategy == "fsdp"  # the default; megatron_* fields unused
    moe = load_config(preset="qwen3-30b-a3b").verl
    assert moe.strategy == "megatron"
    assert (moe.megatron_tp, moe.megatron_pp, moe.megatron_ep, moe.megatron_etp) == (4, 1, 8, 1)
    megatron = ["verl.strategy=megatron", "verl.gpus_per_node=8"]
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[*megatron, "verl.megatron_tp=3"])
    assert (
        "verl: verl.megatron_tp x verl.megatron_pp x verl.megatron_cp = 3 x 1 x 1 = 3 must divide "
        "verl.nnodes x verl.gpus_per_node = 1 x 8 = 8 GPUs" in str(err.value)
    )
    with pytest.raises(ConfigError, match=r"verl.megatron_ep x verl.megatron_etp .* = 16 x 1 x 1 = 16 must divide"):
        load_config(overrides=[*megatron, "verl.megatron_ep=16"])
    assert load_config(overrides=["verl.megatron_tp=3"]).verl.megatron_tp == 3  # fsdp: not checked


def test_error_messages_read_well():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["method.budget=-0.1", "train.group_size=1"])
    text = str(err.value)
    assert "method.budget: Input should be greater than or equal to 0 (got -0.1)" in text
    with pytest.raises(ConfigError, match="train.group_size must be >= 2 for GRPO-based method 'dc-grpo'"):
        load_config(overrides=["train.group_size=1"])


def test_bad_sources_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown preset 'qwen9'"):
        load_config(preset="qwen9")
    with pytest.raises(ConfigError, match="expected section.field=value"):
        load_config(overrides=["train.lr"])


def test_flat_dict_hash_and_yaml_round_trip(tmp_path):
    cfg = load_config(overrides=["train.lr=3e-4"])
    flat = cfg.to_flat_dict()
    assert flat["train.lr"] == 3e-4 and flat["method.name"] == "dc-grpo"
    assert cfg.config_hash() != load_config().config_hash()
    path = tmp_path / "dump.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    assert RunConfig.model_validate(cfg.model_dump()) == cfg


@pytest.mark.parametrize(
    "overrides, field, choices",
    [
        (["eval.benchmarks=[aime99]"], "eval.benchmarks", "choose from aime24, aime25, amc23"),
        (["eval.k={aime99: 4}"], "eval.k", "choose from aime24"),
        (["eval.k={aime24: 0}"], "eval.k", "must be >= 1"),
        (["eval.benchmarks=[math500, MATH-500]"], "eval.benchmarks", "math500 is listed more than once"),
        (["eval.gate_metric=eval/foo/avg_1"], "eval.gate_metric", "eval/synthetic/avg_1, eval/synthetic/pass_1_greedy"),
        # The default gate (eval/synthetic/avg_1) is no longer measured: say so at load, not after training.
        (
            ["eval.benchmarks=[aime24]"],
            "eval.gate_metric",
            "choose one of: eval/aime24/avg_1, eval/aime24/pass_1_greedy",
        ),
        (["eval.default_k=4"], "eval.gate_metric", "eval/synthetic/avg_4"),
        (
            ["eval.greedy_pass1=false", "eval.gate_metric=eval/synthetic/pass_1_greedy"],
            "eval.gate_metric",
            "choose one of: eval/synthetic/avg_1, eval/math500/avg_1, eval/amc23/avg_1 ",
        ),
    ],
)
def test_eval_settings_evaluate_cannot_run_are_rejected(overrides, field, choices):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert f"  {field}: " in str(err.value) and choices in str(err.value)


def test_eval_benchmark_aliases_are_canonical():
    cfg = load_config(overrides=["eval.benchmarks=[synthetic, MATH-500]", "eval.k={math-500: 4}",
                                 "eval.gate_metric=eval/math500/avg_4"])  # fmt: skip
    assert cfg.eval.benchmarks == ["synthetic", "math500"] and cfg.eval.k_for("math500") == 4


def test_the_gate_metric_has_one_spelling_everywhere():
    """MLflow forbids @ in metric names, so the gate metric is spelt as MLflow stores it (issue 27); the avg@k
    spelling of older configs is read as that name."""
    from dcgrpo.evaluate import mlflow_key

    assert load_config(overrides=["eval.gate_metric=eval/synthetic/avg@1"]).eval.gate_metric == "eval/synthetic/avg_1"
    assert load_config(preset="qwen3-8b").eval.gate_metric == "eval/aime24/avg_32"
    for name in PRESETS:
        gate = load_config(preset=name).eval.gate_metric
        assert mlflow_key(gate) == gate


@pytest.mark.parametrize("name", PRESETS)
def test_gate_choices_are_metrics_evaluate_reports(name):
    """The validator's key forms are BenchResult.metrics' (a drift here would reject every gate or none)."""
    from dcgrpo.config import gate_metric_choices
    from dcgrpo.evaluate import BenchResult

    ev = load_config(preset=name).eval
    reported = set()
    for b in ev.benchmarks:
        reported |= set(BenchResult(b, 1, ev.k_for(b), 0.5, (0.0, 1.0), pass1_greedy=0.5).metrics())
    choices = gate_metric_choices(ev.benchmarks, ev.k, ev.default_k, ev.greedy_pass1)
    assert set(choices) <= reported and ev.gate_metric in choices


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1.0e-5\n  rounds: 2\n  lr: 2.0e-5\n")
    with pytest.raises(ConfigError, match=r"run.yaml: not valid YAML: duplicate key 'lr' \(line 2 and line 4\)"):
        load_config(path)
    path.write_text("train:\n  lr: 1.0e-5\ntrain:\n  rounds: 2\n")  # a section twice: the first would be lost
    with pytest.raises(ConfigError, match=r"duplicate key 'train' \(line 1 and line 3\)"):
        load_config(path)


def _imported_modules(path) -> set[str]:
    """The modules a file imports, inside functions too (``ast``)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_config_is_below_the_data_and_registry_layers():
    """config.py (and its presets and verl section) imports neither ``dcgrpo.data.benchmarks`` (which reads
    ``DataConfig``: issue 24's circle) nor the registry, serving or the driver layer, not even inside a function."""
    from pathlib import Path

    import dcgrpo.config

    src = Path(dcgrpo.config.__file__).parent
    above = ("dcgrpo.data.benchmarks", "dcgrpo.registry", "dcgrpo.serving", "dcgrpo.stages", "dcgrpo.steps")
    for name in ("config.py", "config_presets.py", "config_verl.py", "data/benchmark_names.py"):
        bad = {m for m in _imported_modules(src / name) if m in above or m.startswith(tuple(a + "." for a in above))}
        assert not bad, f"{name} imports {bad}"


def test_defaults_have_one_copy():
    """The registry's defaults are the config's, and the default preset is one constant."""
    from dcgrpo import registry
    from dcgrpo.config import DEFAULT_PRESET, RegistryConfig

    reg = RegistryConfig()
    assert (registry.LOCK_WAIT_S, registry.LOCK_STALE_S) == (reg.promotion_lock_wait_s, reg.promotion_lock_stale_s)
    assert (registry.CHAMPION_ALIAS, registry.CHALLENGER_ALIAS) == (reg.champion_alias, reg.challenger_alias)
    assert RunConfig().preset == DEFAULT_PRESET == PRESETS[0]
