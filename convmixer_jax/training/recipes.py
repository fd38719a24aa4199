"""Training recipes: the :class:`TrainConfig` dataclass and the named recipes.

Importing this module imports neither JAX nor optax, so the command line can list the
recipes (``--recipe`` choices and help) without loading them. A new recipe is one
``TrainConfig(...)`` definition below plus one line in :data:`RECIPES`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

#: The on-device augmentations a recipe may name, in the order they are applied.
AUGMENTATIONS = ("crop", "flip", "randaugment", "cutout")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training recipe.

    optimizer: 'adam' | 'adamw'; schedule: 'constant' | 'onecycle' (peak ``lr``);
    augment: tuple of 'crop' (reflect pad 4, random crop), 'flip' (horizontal),
    'randaugment' (``ra_ops`` ops at magnitude ``ra_magnitude`` of 30, see
    :mod:`convmixer_jax.training.randaugment`), 'cutout' (one ``cutout``-pixel square set to
    0.5), applied in that order; label_smoothing in [0, 1).
    ema_decay: if > 0, an exponential moving average of the parameters and
    BatchNorm statistics is kept (decay ``min(ema_decay, (1 + t) / (10 + t))`` at
    step t) and evaluated beside the raw weights.
    holdout: if > 0, that many training images (stratified by class, drawn with
    ``holdout_seed``) are held out as a validation split: not trained on, and
    evaluated every epoch.
    """

    epochs: int = 200
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_fraction: float = 0.3
    augment: tuple[str, ...] = ()
    cutout: int = 8
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    seed: int = 0
    ra_ops: int = 2
    ra_magnitude: int = 9
    ema_decay: float = 0.0
    holdout: int = 0
    holdout_seed: int = 0

    def __post_init__(self):
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if self.schedule not in ("constant", "onecycle"):
            raise ValueError(f"schedule must be 'constant' or 'onecycle', got {self.schedule!r}")
        object.__setattr__(self, "augment", tuple(self.augment))
        bad = set(self.augment) - set(AUGMENTATIONS)
        if bad:
            raise ValueError(f"unknown augmentations {sorted(bad)}; use {', '.join(AUGMENTATIONS)}")
        if not 0 <= self.ra_magnitude <= 30 or self.ra_ops < 1:
            raise ValueError("ra_magnitude must be in 0..30 and ra_ops >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.holdout < 0:
            raise ValueError(f"holdout must be >= 0, got {self.holdout}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["augment"] = list(self.augment)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return cls(**d)


#: Iijima & Kiya (2022), section 4: Adam, lr 1e-3, batch 128, 200 epochs.
PAPER = TrainConfig(epochs=200, batch_size=128, optimizer="adam", lr=1e-3)

#: A shorter schedule for CPUs: AdamW one-cycle with on-device crop, flip and cutout and
#: label smoothing.
FAST = TrainConfig(
    epochs=40,
    batch_size=256,
    optimizer="adamw",
    lr=0.01,
    weight_decay=0.05,
    schedule="onecycle",
    augment=("crop", "flip", "cutout"),
    cutout=8,
    label_smoothing=0.1,
    grad_clip=1.0,
)

#: The fast recipe made stronger against over-fitting (results/cifar10/README.md compares
#: their train and test accuracies): RandAugment (2 ops, magnitude 12, as locuslab's CIFAR-10
#: ConvMixer script) in place of cutout, 100 epochs, an EMA of the weights, and 5,000
#: training images held out to choose by.
STRONG = dataclasses.replace(
    FAST,
    epochs=100,
    augment=("crop", "flip", "randaugment"),
    ra_ops=2,
    ra_magnitude=12,
    ema_decay=0.999,
    holdout=5000,
    holdout_seed=0,
)

#: A Vision Transformer from scratch on CIFAR-size data: AdamW at peak lr 1e-3 (batch 128)
#: with a one-cycle schedule warming up over the first 10 % of 60 epochs, crop, flip and
#: RandAugment (2 ops, magnitude 9), label smoothing, gradient clipping, an EMA of the
#: weights and 5,000 training images held out to choose by.
VIT = TrainConfig(
    epochs=60,
    batch_size=128,
    optimizer="adamw",
    lr=1e-3,
    weight_decay=0.05,
    schedule="onecycle",
    warmup_fraction=0.1,
    augment=("crop", "flip", "randaugment"),
    ra_ops=2,
    ra_magnitude=9,
    label_smoothing=0.1,
    grad_clip=1.0,
    ema_decay=0.999,
    holdout=5000,
    holdout_seed=0,
)

#: The recipes by name (the command line's ``--recipe`` choices).
RECIPES = {
    "paper": PAPER,
    "fast": FAST,
    "strong": STRONG,
    "vit": VIT,
}

__all__ = ["AUGMENTATIONS", "TrainConfig", "RECIPES", "PAPER", "FAST", "STRONG", "VIT"]
