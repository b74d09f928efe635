"""Tiny Qwen3 / Qwen3-MoE models built offline, and loading HF-format models.

``build_tiny_model`` writes a randomly initialised model plus a tokenizer
trained locally (``tokenizers`` byte-level BPE, digits split one per token as
Qwen does, Qwen's ChatML chat template) in plain HF format, so vLLM,
transformers and verl all load it without the Hub. Weights are saved in fp32:
the training engine trains in fp32 on CPU and the deploy engine casts to its
own precision, which is where the train-inference discrepancy comes from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dcgrpo import storage
from dcgrpo.errors import DcgrpoError

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
    from dcgrpo.data.synthetic import make_synthetic

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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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
        from transformers import Qwen3Config

        return Qwen3Config(intermediate_size=model_cfg.intermediate_size, **common)
    from transformers import Qwen3MoeConfig

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
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

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


def load_model_dir(path_or_uri: str | Path, cache_dir: str | Path, endpoint_url: str | None = None) -> Path:
    """A local directory holding the HF-format model at ``path_or_uri``, its files checked.

    Local paths are returned as they are; ``s3://`` prefixes are downloaded
    once into ``cache_dir/<hash of the URI>`` (reused when complete). A corrupt
    ``config.json`` or safetensors file fails here (``ModelFileError`` naming
    it), before any engine or MLflow run starts. ``endpoint_url`` is
    ``storage.s3_endpoint_url`` (MinIO), as for every other s3:// read.
    """
    uri = str(path_or_uri)
    if not storage.is_s3(uri):
        path = Path(uri)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{uri}: not an HF model directory (no config.json)")
        check_model_files(path)
        return path
    target = Path(cache_dir) / hashlib.sha256(uri.encode()).hexdigest()[:16]
    done = target / ".download_complete"
    if not done.is_file():
        storage.download_dir(uri, target, endpoint_url)
        if not (target / "config.json").is_file():
            raise FileNotFoundError(f"{uri}: not an HF model directory (no config.json)")
        check_model_files(target, uri)  # a bad download is not marked complete
        done.write_text(json.dumps({"uri": uri}))
    return target


# ----------------------------------------------------------------------------- checking weight files


class ModelFileError(DcgrpoError, ValueError):
    """A model file (config.json, a safetensors shard) is corrupt or truncated (names the file)."""


def check_safetensors(path: str | Path, name: str | None = None) -> None:
    """Parse ``path``'s safetensors header (reads only the header: cheap even for large shards).

    safetensors itself checks that the header's offsets cover the file exactly, so
    a truncated copy fails here too. Raises ``ModelFileError`` naming ``name``
    (default: the path) instead of safetensors' message, which names no file.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as exc:
        raise ModelFileError(f"{name or path}: not a readable safetensors file ({exc})") from None


def load_safetensors(path: str | Path, name: str | None = None) -> dict:
    """``safetensors.torch.load_file``, with a corrupt file reported as ``ModelFileError`` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

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
