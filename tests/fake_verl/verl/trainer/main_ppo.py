"""Stand-in for verl's main_ppo (see ../../README.md). Not verl: no training happens."""

import json
import os
import shutil
import sys
from pathlib import Path

import mlflow

from dcgrpo.verl_plugin.launch import append_dc_metrics, read_stop_step


def main() -> None:
    overrides = dict(arg.lstrip("+").split("=", 1) for arg in sys.argv[1:])
    local = Path(overrides["trainer.default_local_dir"])
    with open(local / "launches.log", "a") as f:  # tests count launches
        f.write(" ".join(sys.argv[1:]) + "\n")
    if os.environ.get("FAKE_VERL_FAIL"):
        print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", file=sys.stderr)
        sys.exit(1)
    total = int(overrides["trainer.total_training_steps"])
    save_freq = int(overrides["trainer.save_freq"])
    stop = min(total, read_stop_step(local) or total)
    tracker = local / "latest_checkpointed_iteration.txt"
    start = int(tracker.read_text()) if tracker.is_file() else 0
    lam = 0.0
    if start:
        lam = json.loads((local / f"global_step_{start}" / "dc_grpo.json").read_text())["multiplier"]["value"]
    budget = float(overrides["algorithm.dc_grpo.budget"])
    dual_lr = float(overrides["algorithm.dc_grpo.dual_lr"])
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"])
    # verl logs its whole config as params on every launch: MLflow refuses a changed value
    mlflow.log_params({k.replace(".", "/"): v for k, v in overrides.items()})
    for step in range(start + 1, stop + 1):
        d = 1e-3 / step
        mlflow.log_metrics({"dc/discrepancy_mean": d, "dc/lambda": lam}, step=step)
        append_dc_metrics(local, step, {"dc/discrepancy_mean": d, "dc/lambda": lam})  # as the dc_grpo trainer does
        lam = max(0.0, lam + dual_lr * (d - budget))
        if step % save_freq == 0 or step == stop:
            folder = local / f"global_step_{step}"
            shutil.copytree(overrides["actor_rollout_ref.model.path"], folder / "actor" / "huggingface")
            (folder / "dc_grpo.json").write_text(json.dumps({"multiplier": {"value": lam}}))
            tracker.write_text(str(step))
    mlflow.end_run()


if __name__ == "__main__":
    main()
