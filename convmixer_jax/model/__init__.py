"""The ConvMixer: its architecture as data, a Flax module used as a pure function of its
variables, and batched inference.

``config`` (:class:`~convmixer_jax.model.config.ConvMixerConfig` and the presets) imports no
JAX. The names below are resolved on first use, so importing the package imports nothing
heavy.
"""

from convmixer_jax._lazy import lazy_exports

_PUBLIC = {
    "ConvMixerConfig": "config",
    "PRESETS": "config",
    "ConvMixer": "convmixer",
    "prepare_inference": "convmixer",
    "accuracy": "inference",
    "check_model_images": "inference",
    "predict_logits": "inference",
}

__all__ = sorted(_PUBLIC)


__getattr__, __dir__ = lazy_exports("convmixer_jax.model", _PUBLIC, globals())
