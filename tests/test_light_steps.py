"""The light steps run, not just import, where torch, vLLM and transformers are absent (the light image).

tests/test_images.py checks that the light modules import without them; these
tests call the code paths the light steps take on a cluster: finding a
training artifact's latest checkpoint (``latest_model_dir``, used by
``register_step`` and by verl trainings), ``train_step``
with ``train.backend=verl`` up to its RayJob launch, and ``select_best_step``.
Each runs in a subprocess whose import system refuses the heavy packages.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCK_HEAVY = """
import sys
HEAVY = {"torch", "vllm", "transformers", "verl", "ray", "triton"}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError("not in the light image: " + name)
sys.meta_path.insert(0, Block())
"""


def run_light(code: str, tmp_path: Path) -> None:
    """Run ``code`` with the heavy packages blocked; fail with its stderr. The code ends by checking
    that none of them was imported after all (a caught ImportError must not hide one)."""
    check = "\nloaded = sorted(m for m in sys.modules if m.split('.')[0] in HEAVY)\nassert not loaded, loaded\n"
    script = BLOCK_HEAVY + textwrap.dedent(code) + check
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                          timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_checkpoint_resolution_without_torch(tmp_path):
    """register_step and verl rounds find the latest complete checkpoint of an artifact on the light image."""
    run_light(
        """
        import json
        from pathlib import Path
        from dcgrpo.model_refs import latest_model_dir
        from dcgrpo.train import checkpoint as ckpt

        art = Path(sys.argv[1]) / "model"
        done, partial = art / "checkpoints" / "step_000004", art / "checkpoints" / "step_000008"
        for d in (done, partial):
            d.mkdir(parents=True)
            (d / "config.json").write_text("{}")
        manifest = {"files": {"config.json": ckpt._sha256(done / "config.json")}}
        (done / ckpt.MANIFEST).write_text(json.dumps(manifest))  # step 8 was killed before its manifest
        assert latest_model_dir(str(art)) == str(done)
        assert ckpt.resolve_checkpoint(str(art / "checkpoints")) == str(done)
        assert ckpt.verify_dir(done, str(done)) == manifest
        assert latest_model_dir(str(done)) == str(done)  # an HF model artifact is its own model dir
        """,
        tmp_path,
    )


def test_light_components_and_verl_round_without_torch(tmp_path):
    """Every light component imports; a verl train task (up to its launch) runs; select_best runs."""
    run_light(
        """
        import importlib
        from pathlib import Path

        from dcgrpo import components
        from dcgrpo.stages import publish, train_verl
        from dcgrpo.stages import train as train_stage

        for module in sorted({fn.__module__ for fn in components.LIGHT_STEPS.values()} | {"dcgrpo.components.train"}):
            importlib.import_module(module)

        tmp = Path(sys.argv[1])
        model_in = tmp / "in"
        model_in.mkdir()
        overrides = [f"storage.root={tmp / 'root'}", "train.backend=verl"]
        launched = []
        train_verl.train_verl = lambda cfg, *args: launched.append(cfg.train.backend) or ({"backend": "verl"}, {})
        meta, _ = train_stage.train_step("", overrides, "dc-grpo", 2, "", "run-1", str(tmp), str(model_in),
                                         str(tmp / "out"))
        assert launched == ["verl"] and meta == {"backend": "verl"}

        def reference(name, d):
            return {"model_uri": f"s3://b/{name}", "fp8_uri": f"s3://b/{name}-fp8",
                    "metadata": {"discrepancy": d, "method": name}}

        best = publish.select_best_step("", [], ["a", "b"], [0.9, 0.8], [reference("a", 0.5), reference("b", 1e-4)])
        assert best.method in {"a", "b"} and best.reference["model_uri"].startswith("s3://")
        """,
        tmp_path,
    )
