"""Training a plain ConvMixer: recipes, on-device augmentation, the train loop with checkpoints,
weight averaging with BatchNorm re-measurement, training curves.

``recipes`` (the :class:`~convmixer_jax.training.recipes.TrainConfig` dataclass and the named
recipes) imports no JAX; ``step`` builds the one jit-compiled training step that the train
loop, the fine-tuning attack and the image prior share. The names below are resolved on
first use, so importing the package imports nothing heavy.
"""

_PUBLIC = {
    "TrainConfig": "recipes",
    "RECIPES": "recipes",
    "AUGMENTATIONS": "recipes",
    "train": "loop",
    "init_variables": "loop",
    "load_checkpoint": "loop",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'convmixer_jax.training' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"convmixer_jax.training.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
