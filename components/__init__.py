"""KFP v2 components (``dcgrpo.components``): one folder per pipeline step, each holding the component
(``component.py``, a thin shell over one ``dcgrpo.stages`` function, the same functions the CLI and tests call),
its README (inputs, outputs, image) and its tests.

The folder sits at the repository root to show the workflow; the distribution installs it as
``dcgrpo.components`` (pyproject's ``package-dir``), so no generic top-level ``components`` package is installed.

The component functions are plain Python (importable and testable through
``python_func``); ``build_components(image, trainer_image)`` turns them into
KFP components with the chosen container images, so the image is a
compile-time parameter (`dcgrpo compile --image ... --trainer-image ...`).
"""

from __future__ import annotations

import configparser
import inspect
from pathlib import Path
from types import SimpleNamespace

from kfp import dsl

from dcgrpo.deploy import DeploymentContract

from .evaluate import evaluate
from .export_fp8 import export_fp8
from .mark_failed import mark_failed
from .prepare_data import prepare_data
from .promote import promote
from .register_model import register_model
from .select_best import select_best
from .train import train, train_launcher
from .warm_start import warm_start

# Images built from containers/: the deployment contract's names (dcgrpo.deploy).
DEFAULT_IMAGE = DeploymentContract().light_image
DEFAULT_TRAINER_IMAGE = DeploymentContract().gpu_image

LIGHT_STEPS = {
    "prepare_data": prepare_data,
    "select_best": select_best,
    "register_model": register_model,
    "promote": promote,
    "mark_failed": mark_failed,
    "train_launcher": train_launcher,  # verl on a RayJob: the RayJob holds the GPUs
}
GPU_STEPS = {
    "warm_start": warm_start,
    "train": train,
    "export_fp8": export_fp8,
    "evaluate": evaluate,
}


def build_components(
    image: str = DEFAULT_IMAGE, trainer_image: str = DEFAULT_TRAINER_IMAGE, containerized: bool = False
) -> SimpleNamespace:
    """KFP components for every step; light steps on ``image``, GPU steps on ``trainer_image``.

    ``install_kfp_package=False``: the images already carry kfp (pinned in
    pyproject), and a pip step at pod start would need the network.

    ``containerized``: what ``dcgrpo compile`` builds for a cluster. The command runs the component from the
    image (``python3 -m kfp.dsl.executor_main``, found through the ``kfp_config.ini`` the Dockerfiles write with
    ``write_kfp_config``) instead of carrying its source in every executor: that keeps the compiled YAML, and the
    Argo Workflow a run becomes, far below etcd's 1.5 MiB object limit. kfp.local's SubprocessRunner runs only
    lightweight components (source embedded), so the demo and tests build those: same functions, same images.
    """

    def make(fn, img: str):
        extra = {"target_image": img} if containerized else {}
        return dsl.component(fn, base_image=img, install_kfp_package=False, **extra)

    made = {name: make(fn, image) for name, fn in LIGHT_STEPS.items()}
    made |= {name: make(fn, trainer_image) for name, fn in GPU_STEPS.items()}
    return SimpleNamespace(**made)


KFP_CONFIG = "kfp_config.ini"


def write_kfp_config(directory: str) -> Path:
    """``<directory>/kfp_config.ini``: each component function -> the file defining it in this installation, as
    ``kfp component build`` writes it. The containerized executor reads it from its working directory (the
    images' WORKDIR), so every image that runs components writes it at build time."""
    config = configparser.ConfigParser()
    config.optionxform = str  # function names are case-sensitive
    config["Components"] = {
        fn.__name__: inspect.getsourcefile(fn) for fn in (*LIGHT_STEPS.values(), *GPU_STEPS.values())
    }
    path = Path(directory) / KFP_CONFIG
    with path.open("w") as f:
        config.write(f)
    return path
