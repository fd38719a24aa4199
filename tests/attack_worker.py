"""Subprocess entry: wrong-key accuracies of a tiny model, printed as JSON.

usage: python tests/attack_worker.py  (device count from XLA_FLAGS)
The model is tests/test_wrong_keys.py's: the tiny architecture of conftest.py (``TINY``)
at width 12 with 4 classes.
"""

import json

import jax
import numpy as np
from conftest import TINY  # tests/conftest.py, beside this script

from convmixer_jax.attacks.wrong_keys import draw_attack_keys, wrong_key_accuracies
from convmixer_jax.model.convmixer import ConvMixer, ConvMixerConfig
from convmixer_jax.scheme.keys import generate_key
from convmixer_jax.scheme.params import encrypt_params
from convmixer_jax.training.loop import init_variables

CFG = ConvMixerConfig(**{**TINY, "dim": 12, "num_classes": 4})


def main():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, (40, 1, 1, 3)) * np.linspace(0.2, 1.0, 8)[None, :, None, None]
    images = np.clip(255 * (base + rng.uniform(-0.1, 0.1, (40, 8, 8, 3))), 0, 255).astype(np.uint8)
    labels = rng.integers(0, 4, 40)
    model = ConvMixer(CFG)
    variables = init_variables(CFG, 3)
    step = jax.jit(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[1]["batch_stats"]
    )
    for _ in range(40):
        variables = {**variables, "batch_stats": step(variables, images / 255.0)}
    enc = encrypt_params(variables, generate_key(2, 3, seed=4))
    keys = draw_attack_keys(8, 10, 2, 3)
    out = {
        s: wrong_key_accuracies(
            CFG, enc, images, labels, keys, strategy=s, key_chunk=4, batch_size=16
        ).tolist()
        for s in ("images", "weights")
    }
    out["devices"] = jax.device_count()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
