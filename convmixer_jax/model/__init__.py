"""The ConvMixer: a Flax module used as a pure function of its variables, and batched inference."""

from convmixer_jax.model.convmixer import PRESETS, ConvMixer, ConvMixerConfig, prepare_inference  # noqa: F401
from convmixer_jax.model.inference import accuracy, check_model_images, predict_logits  # noqa: F401
