"""KFP v2 components: one per pipeline step, each a thin shell over one
``dcgrpo.steps`` function (the same functions the CLI and tests call).

The component functions are plain Python (importable and testable through
``python_func``); ``build_components(image, trainer_image)`` turns them into
KFP components with the chosen container images, so the image is a
compile-time parameter (`dcgrpo compile --image ... --trainer-image ...`).
"""

from __future__ import annotations

from types import SimpleNamespace

from kfp import dsl

from components.evaluate import evaluate
from components.export_fp8 import export_fp8
from components.mark_failed import mark_failed
from components.prepare_data import prepare_data
from components.promote import promote
from components.register_model import register_model
from components.select_best import select_best
from components.train_round import train_round, train_round_launcher
from components.warm_start import warm_start
from dcgrpo.deploy import DeploymentContract

# Images built from containers/: the deployment contract's names (dcgrpo.deploy).
DEFAULT_IMAGE = DeploymentContract().light_image
DEFAULT_TRAINER_IMAGE = DeploymentContract().gpu_image

LIGHT_STEPS = {
    "prepare_data": prepare_data,
    "select_best": select_best,
    "register_model": register_model,
    "promote": promote,
    "mark_failed": mark_failed,
    "train_round_launcher": train_round_launcher,  # verl on a RayJob: the RayJob holds the GPUs
}
GPU_STEPS = {
    "warm_start": warm_start,
    "train_round": train_round,
    "export_fp8": export_fp8,
    "evaluate": evaluate,
}


def build_components(image: str = DEFAULT_IMAGE, trainer_image: str = DEFAULT_TRAINER_IMAGE) -> SimpleNamespace:
    """KFP components for every step; light steps on ``image``, GPU steps on ``trainer_image``.

    ``install_kfp_package=False``: the images already carry kfp (pinned in
    pyproject), and a pip step at pod start would need the network.
    """
    made = {name: dsl.component(fn, base_image=image, install_kfp_package=False) for name, fn in LIGHT_STEPS.items()}
    made |= {
        name: dsl.component(fn, base_image=trainer_image, install_kfp_package=False) for name, fn in GPU_STEPS.items()
    }
    return SimpleNamespace(**made)
