"""Training a plain ConvMixer: recipes, on-device augmentation, the train loop with checkpoints,
weight averaging with BatchNorm re-measurement, training curves."""

from convmixer_jax.training.loop import RECIPES, TrainConfig, init_variables, load_checkpoint, train  # noqa: F401
