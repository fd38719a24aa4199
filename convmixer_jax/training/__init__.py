"""Training a plain ConvMixer: recipes, on-device augmentation, the train loop with checkpoints,
weight averaging with BatchNorm re-measurement, training curves.

``recipes`` (the :class:`~convmixer_jax.training.recipes.TrainConfig` dataclass and the named
recipes) imports no JAX; ``step`` builds the one jit-compiled training step that the train
loop, the fine-tuning attack and the image prior share. The names below are resolved on
first use, so importing the package imports nothing heavy.
"""

from convmixer_jax._lazy import lazy_exports

_PUBLIC = {
    "TrainConfig": "recipes",
    "RECIPES": "recipes",
    "AUGMENTATIONS": "recipes",
    "train": "loop",
    "init_variables": "loop",
    "load_checkpoint": "loop",
}

__all__ = sorted(_PUBLIC)


__getattr__, __dir__ = lazy_exports("convmixer_jax.training", _PUBLIC, globals())
