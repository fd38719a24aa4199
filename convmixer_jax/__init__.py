"""convmixer-jax: block-wise encryption of ConvMixer models (Iijima & Kiya, 2022) in JAX/Flax.

The short list a user needs is importable from here::

    from convmixer_jax import (generate_key, load_key, encrypt_images, decrypt_images,
                               encrypt_params, decrypt_params, rekey_params,
                               ConvMixer, ConvMixerConfig, PRESETS)

The names are resolved on first use, so ``import convmixer_jax`` (and the
command line's ``--help``) does not import JAX, and importing it changes nothing
else either. ``convmixer_jax.apply_cpu_flags()``, called before the first JAX
computation, adds the XLA:CPU flag the package recommends to ``XLA_FLAGS`` (the
command line does it itself; see ``convmixer_jax._xla_flags``). The
subpackages hold the rest:
``scheme`` (keys, image and parameter transforms), ``model``, ``files``,
``data``, ``training``, ``attacks``, ``experiment`` and ``cli``
(``docs/design.md`` has the map).
"""

from convmixer_jax._lazy import lazy_exports

__version__ = "0.1.0"

_PUBLIC = {
    # the XLA:CPU flag, for entry points
    "apply_cpu_flags": "_xla_flags",
    # the scheme
    "Key": "scheme.keys",
    "generate_key": "scheme.keys",
    "load_key": "scheme.keys",
    "fingerprint": "scheme.keys",
    "key_space": "scheme.keys",
    "InvalidKeyError": "scheme.keys",
    "encrypt_images": "scheme.images",
    "decrypt_images": "scheme.images",
    "ImageError": "scheme.images",
    "encrypt_params": "scheme.params",
    "decrypt_params": "scheme.params",
    "rekey_params": "scheme.params",
    "KeyModelMismatch": "scheme.params",
    # the model
    "ConvMixer": "model.convmixer",
    "ConvMixerConfig": "model.config",
    "PRESETS": "model.config",
    "predict_logits": "model.inference",
    "accuracy": "model.inference",
    # files
    "save_model": "files.model_dir",
    "load_model": "files.model_dir",
    "ModelDirError": "files.model_dir",
    "load_images": "files.arrays",
    # training and the experiment
    "TrainConfig": "training.recipes",
    "RECIPES": "training.recipes",
    "train": "training.loop",
    "init_variables": "training.loop",
    "wrong_key_accuracies": "attacks.wrong_keys",
    "run_experiment": "experiment.paper",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


__getattr__, __dir__ = lazy_exports("convmixer_jax", _PUBLIC, globals())
