"""The `train_round` and `train_round_launcher` components (README.md beside this file)."""

from .component import train_round, train_round_launcher

__all__ = ["train_round", "train_round_launcher"]
