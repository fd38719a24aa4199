"""The ConvMixer: its architecture as data, a Flax module used as a pure function of its
variables, and batched inference.

``config`` (:class:`~convmixer_jax.model.config.ConvMixerConfig` and the presets) imports no
JAX. The names below are resolved on first use, so importing the package imports nothing
heavy.
"""

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


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'convmixer_jax.model' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"convmixer_jax.model.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
