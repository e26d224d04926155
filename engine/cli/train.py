"""gpt-engine train: one flag per TrainConfig field."""
from __future__ import annotations

import argparse

from .flags import add_dataclass_args, from_args


def add_args(p: argparse.ArgumentParser) -> None:
    from ..train.config import TrainConfig
    add_dataclass_args(p, TrainConfig)


def run(args: argparse.Namespace) -> int:
    from ..train.config import TrainConfig
    from ..train.trainer import train
    train(from_args(TrainConfig, args))
    return 0
