"""Shared fixtures: a tiny architecture, tiny models on disk, tiny image sets, a local HTTP server.

Models are built with the library's own functions (``init_variables``, ``save_model``), not
with the command line, and are small enough to compile in seconds on a CPU. Session-scoped
fixtures hand out folders that tests read but never change; factories (``make_*``,
``png_tree``, ...) write fresh files where a test wants its own.
"""

from __future__ import annotations

import dataclasses
import functools
import http.server
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

# ConvMixer-8/1, kernel 3, patch 2 (= the encryption block size), 3 classes, 8 x 8 RGB.
TINY = dict(dim=8, depth=1, kernel_size=3, patch_size=2, num_classes=3, image_size=8, channels=3)


# --------------------------------------------------------------------------- architectures


@pytest.fixture(scope="session")
def make_tiny_config():
    """``make_tiny_config(**overrides)``: the tiny ConvMixerConfig with some fields changed."""
    from convmixer_jax import ConvMixerConfig

    def make(**overrides):
        return dataclasses.replace(ConvMixerConfig(**TINY), **overrides)

    return make


@pytest.fixture(scope="session")
def tiny_config(make_tiny_config):
    """ConvMixer-8/1, kernel 3, patch 2, 3 classes, 8 x 8 RGB images."""
    return make_tiny_config()


@pytest.fixture(scope="session")
def arch_args():
    """``arch_args(config)``: the command-line options that give ``config``'s architecture.

    The list ends with ``--image-size S --channels C``.
    """

    def args(config) -> list[str]:
        return [
            "--dim",
            str(config.dim),
            "--depth",
            str(config.depth),
            "--kernel-size",
            str(config.kernel_size),
            "--patch-size",
            str(config.patch_size),
            "--num-classes",
            str(config.num_classes),
            "--image-size",
            str(config.image_size),
            "--channels",
            str(config.channels),
        ]

    return args


# --------------------------------------------------------------------------- models on disk


@pytest.fixture(scope="session")
def make_model_dir():
    """``make_model_dir(path, config, seed=0) -> path``: a freshly initialized plain model
    directory, the same as ``convmixer-jax init-model --seed SEED`` writes for ``config``."""
    from convmixer_jax.files.model_dir import save_model
    from convmixer_jax.training.loop import init_variables

    def make(path, config, seed: int = 0) -> Path:
        extra = {"created_by": "init-model", "seed": seed}
        return save_model(path, config, init_variables(config, seed), extra=extra)

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, make_model_dir, tiny_config) -> Path:
    """A plain model directory of ``tiny_config``, initialized with seed 0 (read only)."""
    return make_model_dir(tmp_path_factory.mktemp("tiny-model") / "model", tiny_config, 0)


@pytest.fixture(scope="session")
def tinted_images():
    """``tinted_images(n, size=8, seed=0)``: (n, size, size, 3) uint8 images, each a random
    colour times a horizontal ramp (0.2 to 1) plus uniform noise of +-0.1, so that even a
    random model's predictions differ between images."""

    def make(n: int, size: int = 8, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        base = rng.uniform(0, 1, (n, 1, 1, 3)) * np.linspace(0.2, 1.0, size)[None, :, None, None]
        noisy = base + rng.uniform(-0.1, 0.1, (n, size, size, 3))
        return np.clip(255 * noisy, 0, 255).astype(np.uint8)

    return make


@pytest.fixture(scope="session")
def calibrated_variables():
    """``calibrated_variables(config, images, seed, passes)``: the variables of
    ``init_variables(config, seed)`` whose BatchNorm statistics are re-measured ``passes``
    times on ``images`` (uint8), so that the model's predictions depend on its input.
    Leaves are NumPy arrays."""

    def make(config, images: np.ndarray, seed: int, passes: int) -> dict:
        import jax

        from convmixer_jax import ConvMixer
        from convmixer_jax.training.loop import init_variables

        model, variables = ConvMixer(config), init_variables(config, seed)
        step = jax.jit(
            lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[1]["batch_stats"]
        )
        for _ in range(passes):
            variables = {**variables, "batch_stats": step(variables, images / 255.0)}
        return jax.tree.map(np.asarray, variables)

    return make


@pytest.fixture(scope="session")
def tiny_trained_model(tmp_path_factory, tiny_config, tinted_images, calibrated_variables):
    """A tiny model that fits its data: ``tiny_config`` (seed 4) with BatchNorm statistics
    measured on 66 tinted images, whose labels are the model's own predictions (all three
    classes occur in both splits). Read only.

    Returns a namespace: ``config``, ``variables``, ``images`` (66, 8, 8, 3) uint8,
    ``labels`` (66,), ``model_dir`` (the plain model directory) and ``data_dir`` (a class
    tree ``{train,test}/class<label>/<i>.png``: images 0..35 to train, 36..65 to test).
    """
    from PIL import Image

    from convmixer_jax import ConvMixer
    from convmixer_jax.files.model_dir import save_model

    root = tmp_path_factory.mktemp("tiny-trained")
    images = tinted_images(66)
    variables = calibrated_variables(tiny_config, images, seed=4, passes=20)
    labels = np.argmax(np.asarray(ConvMixer(tiny_config).apply(variables, images / 255.0)), 1)
    for split, part in (("train", slice(0, 36)), ("test", slice(36, 66))):
        assert len(set(labels[part].tolist())) == 3
        for i, (im, c) in enumerate(zip(images[part], labels[part], strict=True)):
            folder = root / "data" / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(im).save(folder / f"{i}.png")
    save_model(root / "model", tiny_config, variables)
    return SimpleNamespace(
        config=tiny_config,
        variables=variables,
        images=images,
        labels=labels,
        model_dir=root / "model",
        data_dir=root / "data",
    )


# --------------------------------------------------------------------------- image sets


@pytest.fixture(scope="session")
def png_tree():
    """``png_tree(root, n_per_class=6, classes=3, size=8) -> root``: an image-folder data set
    of random RGB PNGs, ``root/{train,test}/class<c>/<i>.png``, the same for the same
    arguments."""

    def make(root: Path, n_per_class: int = 6, classes: int = 3, size: int = 8) -> Path:
        from PIL import Image

        rng = np.random.default_rng(1)
        for split in ("train", "test"):
            for c in range(classes):
                d = root / split / f"class{c}"
                d.mkdir(parents=True)
                for i in range(n_per_class):
                    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(d / f"{i}.png")
        return root

    return make


@pytest.fixture(scope="session")
def cifar10_batches():
    """``cifar10_batches(rng, train_counts=(2, 1, 3, 1, 2), n_test=4)``: the six binary batch
    files of the CIFAR-10 release, tiny, written here from the format's description.

    Returns ({file name: bytes} for ``data_batch_1..5.bin`` and ``test_batch.bin``,
    {split: (images (N, 32, 32, 3) uint8, labels (N,) int32)}). A record is one label
    byte and the image's 3072 bytes, channel-major (CHW).
    """

    def make(rng, train_counts=(2, 1, 3, 1, 2), n_test: int = 4):
        files, expected = {}, {}
        for split, names, counts in (
            ("train", [f"data_batch_{i}.bin" for i in range(1, 6)], train_counts),
            ("test", ["test_batch.bin"], (n_test,)),
        ):
            images, labels = [], []
            for name, n in zip(names, counts, strict=True):
                hwc = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
                lab = rng.integers(0, 10, n, dtype=np.uint8)
                files[name] = b"".join(
                    bytes([int(lab[i])]) + hwc[i].transpose(2, 0, 1).tobytes() for i in range(n)
                )
                images.append(hwc)
                labels.append(lab)
            expected[split] = (np.concatenate(images), np.concatenate(labels).astype(np.int32))
        return files, expected

    return make


# --------------------------------------------------------------------------- a local HTTP server


class LocalServer:
    """A real HTTP server on 127.0.0.1 for the files of ``root``; ``requests`` lists every GET.

    ``/short/NAME`` announces the whole of ``root/NAME`` and sends half of it, then hangs up.
    """

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[str] = []
        log = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                log.append(self.path)
                if self.path.startswith("/short/"):
                    data = (root / self.path.removeprefix("/short/")).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
        )
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_server(tmp_path, monkeypatch):
    """A :class:`LocalServer` of the empty folder ``tmp_path/www`` (put files in ``.root``);
    proxies are bypassed for 127.0.0.1. Shut down after the test."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    root = tmp_path / "www"
    root.mkdir()
    server = LocalServer(root)
    yield server
    server.close()
