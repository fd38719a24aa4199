"""Subprocess entry for training tests: a tiny ConvMixer on tiny random data.

usage: python tests/train_worker.py WORKDIR OUT.npz EPOCHS [--resume] [--slow] [--hold FILE]
Writes the final flattened params (and the device count) to OUT.npz.
``--slow`` sleeps between epochs' checkpoints so a test can kill it mid-run; ``--hold FILE``
waits after the first epoch's checkpoint (and its log line) until FILE exists, so a test
can act while the run holds its workdir.
"""

import sys
import time
from pathlib import Path

import jax
import numpy as np
from conftest import TINY  # tests/conftest.py, beside this script

from convmixer_jax.model.convmixer import ConvMixerConfig
from convmixer_jax.training.loop import TrainConfig, train

CONFIG = ConvMixerConfig(**TINY)


def data():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
    y = rng.integers(0, 3, 64).astype(np.int32)
    return (x, y), (x[:16], y[:16])


def recipe(epochs: int) -> TrainConfig:
    """The worker's recipe: 4 steps of 16 images per epoch."""
    return TrainConfig(
        epochs=epochs,
        batch_size=16,
        optimizer="adamw",
        lr=3e-3,
        weight_decay=0.05,
        schedule="onecycle",
        augment=("crop", "flip", "cutout"),
        cutout=4,
        label_smoothing=0.1,
        grad_clip=1.0,
        seed=7,
    )


def flat(variables) -> dict:
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
        for path, v in jax.tree_util.tree_flatten_with_path(variables)[0]
    }


def main():
    workdir, out, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    resume = "--resume" in sys.argv
    slow = "--slow" in sys.argv
    hold = Path(sys.argv[sys.argv.index("--hold") + 1]) if "--hold" in sys.argv else None

    def log(msg):
        print(msg, flush=True)
        if slow:
            time.sleep(1.5)
        while hold is not None and not hold.exists():
            time.sleep(0.05)

    train_data, test_data = data()
    variables, _ = train(
        CONFIG,
        recipe(epochs),
        train_data,
        test_data,
        workdir,
        resume=resume,
        progress=False,
        log=log,
    )
    np.savez(out, n_devices=jax.device_count(), **flat(variables))


if __name__ == "__main__":
    main()
