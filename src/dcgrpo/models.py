"""Tiny Qwen3 / Qwen3-MoE models built offline, and loading HF-format base models.

``build_tiny_model`` writes a randomly initialised model plus a tokenizer
trained locally (``tokenizers`` byte-level BPE, digits split one per token as
Qwen does, Qwen's ChatML chat template) in plain HF format, so vLLM,
transformers and verl all load it without the Hub. Weights are saved in fp32:
the training engine trains in fp32 on CPU and the deploy engine casts to its
own precision, which is where the train-inference discrepancy comes from.

``load_model_dir`` turns ``model.path`` (a local directory, any HF-format
directory on ``s3://``, or a Hub id ``org/name[@revision]``) into a checked
local directory, through the model cache (``$DCGRPO_MODEL_CACHE``: the
pipeline's model-cache PVC).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from dcgrpo import storage
from dcgrpo.data.synthetic import make_synthetic
from dcgrpo.errors import DcgrpoError

log = logging.getLogger(__name__)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS]


def _tokenizer_corpus(seed: int) -> list[str]:
    """Text the BPE merges are learnt from: the synthetic task at every difficulty
    and both templates, wrapped in the chat format, plus plain words."""
    texts: list[str] = []
    for difficulty in range(1, 6):
        for template in ("boxed", "dapo"):
            for row in make_synthetic(200, difficulty, seed + difficulty, template):
                texts.append(f"{BOS}user\n{row['prompt'][0]['content']}{EOS}\n{BOS}assistant\n")
                texts.append(row["extra_info"]["solution"])
    texts.append("The answer is Answer: boxed solve compute what how many each total sum difference product")
    return texts


def build_tokenizer(vocab_size: int, seed: int = 0):
    """A transformers fast tokenizer trained offline (byte-level BPE, single digits)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # tokenizers: not on the light image
    from transformers import PreTrainedTokenizerFast  # transformers: not on the light image

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token=EOS, pad_token=PAD, unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _hf_config(model_cfg, tokenizer):
    common = dict(
        vocab_size=model_cfg.vocab_size,
        hidden_size=model_cfg.hidden_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=model_cfg.num_kv_heads,
        head_dim=model_cfg.hidden_size // model_cfg.num_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=model_cfg.tie_word_embeddings,
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        rope_theta=10000.0,
    )
    if model_cfg.arch == "qwen3":
        from transformers import Qwen3Config  # transformers: not on the light image

        return Qwen3Config(intermediate_size=model_cfg.intermediate_size, **common)
    from transformers import Qwen3MoeConfig  # transformers: not on the light image

    return Qwen3MoeConfig(
        intermediate_size=model_cfg.intermediate_size,
        moe_intermediate_size=model_cfg.intermediate_size // model_cfg.num_experts_per_tok,
        num_experts=model_cfg.num_experts,
        num_experts_per_tok=model_cfg.num_experts_per_tok,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        **common,
    )


def build_tiny_model(model_cfg, out_dir: str | Path) -> Path:
    """Build a tiny Qwen3 (``arch=qwen3``) or Qwen3-MoE model from a ``ModelConfig``.

    Deterministic by ``model_cfg.seed``. Writes ``config.json``,
    ``model.safetensors`` (fp32), the tokenizer files and
    ``generation_config.json`` to ``out_dir`` and returns it.
    """
    import torch  # torch: not on the light image
    from transformers import AutoModelForCausalLM, GenerationConfig  # transformers: not on the light image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(model_cfg.vocab_size, model_cfg.seed)
    config = _hf_config(model_cfg, tokenizer)
    torch.manual_seed(model_cfg.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------- loading a base model

HF_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<revision>[\w./-]+))?")
"""A Hugging Face Hub model id, ``org/name`` with an optional ``@revision`` (branch, tag or commit)."""
WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
HUB_IGNORE = ["original/*", "*.pth", "*.gguf", "*.onnx", "onnx/*", "*.msgpack", "*.h5", "*.ot", "*.tflite"]
"""Repo files no engine here loads (Meta's consolidated checkpoints, other frameworks): not downloaded."""
DOWNLOAD_STAMP = ".download_complete"


class ModelNotFoundError(DcgrpoError, FileNotFoundError):
    """``model.path`` names no loadable model (names the field, the value and what was tried)."""


def parse_hf_id(spec: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when ``spec`` reads as a Hub id, else None."""
    m = HF_ID.fullmatch(spec)
    return (m["repo"], m["revision"]) if m else None


def model_cache_dir(default: str | Path) -> Path:
    """``$DCGRPO_MODEL_CACHE`` when set (the pipeline mounts the model-cache PVC there, so a base model
    is downloaded once per cluster, not once per pod), else ``default``."""
    return Path(os.environ.get("DCGRPO_MODEL_CACHE") or default)


def hub_cache_dir(model_cache: Path) -> Path:
    """Where Hub snapshots go: the user's own HF cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub``) when they
    set one, so models already there are reused; else ``<model cache>/hub``. Read at call time:
    huggingface_hub reads these once, at import."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return model_cache / "hub"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now, not as at huggingface_hub's import."""
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def load_model_dir(
    path_or_uri: str | Path, cache_dir: str | Path, endpoint_url: str | None = None, *, field: str = "model.path"
) -> Path:
    """A local directory holding the HF-format model that ``path_or_uri`` names, its files checked.

    Accepts a local directory (returned as it is), any HF-format directory on
    ``s3://`` (downloaded once into the model cache, reused when complete) and
    a Hub id ``org/name[@revision]`` (``huggingface_hub.snapshot_download``
    into the Hub cache; offline caches load without network). The model
    cache is ``$DCGRPO_MODEL_CACHE``, else ``cache_dir``. A corrupt
    ``config.json`` or safetensors file fails here (``ModelFileError`` naming
    it), before any engine or MLflow run starts. ``endpoint_url`` is
    ``storage.s3_endpoint_url`` (MinIO), as for every other s3:// read.
    ``field`` names the setting in errors.
    """
    spec = str(path_or_uri)
    cache = model_cache_dir(cache_dir)
    if storage.is_s3(spec):
        return _load_s3(storage.check_s3_uri(spec, field), cache, endpoint_url)
    path = Path(spec).expanduser()
    hub_id = parse_hf_id(spec)
    if path.exists() or hub_id is None:
        if not path.exists():
            raise ModelNotFoundError(
                f"{field}: {spec!r}: no such local directory, and not an s3:// URI or a Hugging Face id "
                "(org/name[@revision])"
            )
        return _checked_model_dir(path, spec)
    return _load_hub(*hub_id, cache, field)


def _checked_model_dir(local: Path, source: str) -> Path:
    """``local`` if it is an HF model directory: a valid config.json and readable weight files."""
    if not (local / "config.json").is_file():
        raise ModelNotFoundError(f"{source}: not an HF model directory (no config.json)")
    if not any(p for pattern in WEIGHT_GLOBS for p in local.glob(pattern)):
        raise ModelNotFoundError(f"{source}: not an HF model directory (no *.safetensors or pytorch_model*.bin)")
    check_model_files(local, source)
    return local


def _load_s3(uri: str, cache: Path, endpoint_url: str | None) -> Path:
    """Any HF-format directory under ``uri``: ours (with the ``_COMPLETE`` marker) or one copied there
    by other tools (without it: its config and weight files are what is checked).

    Downloaded into a staging directory, checked, stamped and renamed into
    place, so pods sharing the model-cache PVC never see a half-copied model.
    """
    target = cache / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (target / DOWNLOAD_STAMP).is_file():
        return target
    staging = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        storage.download_dir(uri, staging, endpoint_url, require_marker=False)
        if not (staging / storage.COMPLETE_MARKER).is_file():
            log.info("%s: no %s marker (not written by dcgrpo): checking its files", uri, storage.COMPLETE_MARKER)
        _checked_model_dir(staging, uri)  # a bad download is not stamped
        (staging / DOWNLOAD_STAMP).write_text(json.dumps({"uri": uri}))
        if target.exists() and not (target / DOWNLOAD_STAMP).is_file():
            shutil.rmtree(target, ignore_errors=True)  # a partial copy left by older code
        try:
            os.replace(staging, target)
        except OSError:  # another pod published it first
            if not (target / DOWNLOAD_STAMP).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _load_hub(repo: str, revision: str | None, cache: Path, field: str) -> Path:
    """``repo`` at ``revision`` from the Hub cache, downloaded first unless offline (``HF_HUB_OFFLINE=1``).

    ``HF_TOKEN`` (a Secret in the pipeline's pods) authenticates gated or
    private repos. Online, huggingface_hub falls back to the cache when the
    Hub cannot be reached.
    """
    # huggingface_hub: `dcgrpo submit` runs without it
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError  # as above

    spec = f"{repo}@{revision}" if revision else repo
    offline = hub_offline()
    hub_cache = hub_cache_dir(cache)
    try:
        local = snapshot_download(
            repo, revision=revision, cache_dir=hub_cache, local_files_only=offline,
            token=os.environ.get("HF_TOKEN") or None, ignore_patterns=HUB_IGNORE,
        )  # fmt: skip
    except GatedRepoError as exc:
        raise ModelNotFoundError(f"{field}: {spec}: gated on the Hugging Face Hub: set HF_TOKEN to a token "
                                 f"with access ({_first_line(exc)})") from None  # fmt: skip
    except LocalEntryNotFoundError as exc:
        where = "HF_HUB_OFFLINE=1 and it is" if offline else "the Hub cannot be reached and it is"
        raise ModelNotFoundError(f"{field}: {spec!r} is not a local directory; as a Hugging Face id: {where} not "
                                 f"in the Hub cache {hub_cache} ({_first_line(exc)})") from None  # fmt: skip
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelNotFoundError(f"{field}: {spec!r} is not a local directory; as a Hugging Face id: "
                                 f"{type(exc).__name__}: {_first_line(exc)}") from None  # fmt: skip
    return _checked_model_dir(Path(local), f"hf://{spec}")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


# ----------------------------------------------------------------------------- checking weight files


class ModelFileError(DcgrpoError, ValueError):
    """A model file (config.json, a safetensors shard) is corrupt or truncated (names the file)."""


def check_safetensors(path: str | Path, name: str | None = None) -> None:
    """Parse ``path``'s safetensors header (reads only the header: cheap even for large shards).

    safetensors itself checks that the header's offsets cover the file exactly, so
    a truncated copy fails here too. Raises ``ModelFileError`` naming ``name``
    (default: the path) instead of safetensors' message, which names no file.
    """
    from safetensors import SafetensorError, safe_open  # safetensors: `dcgrpo submit` runs without it

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as exc:
        raise ModelFileError(f"{name or path}: not a readable safetensors file ({exc})") from None


def load_safetensors(path: str | Path, name: str | None = None) -> dict:
    """``safetensors.torch.load_file``, with a corrupt file reported as ``ModelFileError`` naming it."""
    from safetensors import SafetensorError  # safetensors: `dcgrpo submit` runs without it
    from safetensors.torch import load_file  # torch (through safetensors.torch): not on the light image

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ModelFileError(f"{name or path}: not a readable safetensors file ({exc})") from None


def check_model_files(local_dir: str | Path, source: str | None = None) -> None:
    """Check a local HF model directory's ``config.json`` and every safetensors header.

    Engines and the exporter call this before loading, so a corrupt or
    half-copied checkpoint is one line naming the file (``source`` + file name,
    so an ``s3://`` model is named by its URI, not by a download cache path).
    """
    local_dir = Path(local_dir)
    source = str(source or local_dir)
    config = local_dir / "config.json"
    if config.is_file():
        try:
            json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelFileError(f"{storage.join(source, 'config.json')}: not valid JSON ({exc})") from None
    for shard in sorted(local_dir.glob("*.safetensors")):
        check_safetensors(shard, storage.join(source, shard.name))
    _check_shard_index(local_dir, source)


def _check_shard_index(local_dir: Path, source: str) -> None:
    """Every shard ``model.safetensors.index.json`` names is present: a model copied to S3 by other
    tools carries no completion marker, so a shard missing from a partial copy is caught here."""
    index = local_dir / "model.safetensors.index.json"
    if not index.is_file():
        return
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ModelFileError(f"{storage.join(source, index.name)}: not a valid shard index ({exc!r})") from None
    missing = sorted(s for s in shards if not (local_dir / s).is_file())
    if missing:
        raise ModelFileError(f"{storage.join(source, missing[0])}: missing ({len(missing)} of {len(shards)} shards "
                             f"named in {index.name} are absent: incomplete copy?)")  # fmt: skip


def run_tokenizer(cfg, model_uri: str = "", cache_dir: str | Path | None = None):
    """The tokenizer of the model a run trains: ``model_uri`` (else ``model.path``) loaded as ``load_model_dir``
    loads it (cached), else the tiny model's (built from ``model.vocab_size`` and ``model.seed``, as
    ``build_tiny_model`` builds it). Preparation counts prompt tokens with it."""
    from transformers import AutoTokenizer  # transformers: not on the light image

    uri = model_uri or cfg.model.path
    if not uri:
        return build_tokenizer(cfg.model.vocab_size, cfg.model.seed)
    hub = parse_hf_id(uri) if not storage.is_s3(uri) and not Path(uri).exists() else None
    if hub is not None:  # the tokenizer's files only, not the weights (16 GB for Qwen3-8B)
        try:
            return AutoTokenizer.from_pretrained(hub[0], revision=hub[1])
        except OSError as exc:
            raise ModelNotFoundError(f"{'model_uri' if model_uri else 'model.path'}={uri}: cannot load its "
                                     f"tokenizer from the Hugging Face Hub ({exc})") from None  # fmt: skip
    cache = cache_dir or Path(cfg.storage.root if not str(cfg.storage.root).startswith("s3://") else "outputs")
    local = load_model_dir(uri, Path(cache) / "model-cache", cfg.storage.s3_endpoint_url,
                           field="model_uri" if model_uri else "model.path")  # fmt: skip
    return AutoTokenizer.from_pretrained(str(local))
