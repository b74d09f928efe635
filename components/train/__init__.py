"""The `train` and `train_launcher` components (README.md beside this file)."""

from .component import train, train_launcher

__all__ = ["train", "train_launcher"]
