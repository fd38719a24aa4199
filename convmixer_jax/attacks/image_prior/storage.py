"""An image prior on disk: a directory of ``config.json`` and ``params.msgpack``.

``config.json`` holds the format name and version, the architecture, the input size,
the variants, the SHA-256 of the parameter bytes and any extra fields (the cache's
training settings); ``params.msgpack`` is ``flax.serialization.to_bytes`` of the
parameters. The directory is written through the package's atomic writer
(:func:`convmixer_jax.files.atomic.staged_output_dir`): it appears complete or not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from convmixer_jax.attacks.image_prior.network import ImagePrior, PriorConfig, variant_net
from convmixer_jax.files.atomic import RESULTS_MARKER, staged_output_dir

PRIOR_FORMAT = "convmixer-jax-image-prior"
PRIOR_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.msgpack"
_MARKER_TEXT = "written by convmixer-jax (an image prior)\n"


class ImagePriorError(ValueError):
    """An image prior on disk is missing, malformed or corrupt, or its inputs do not fit it."""


def _params_template(config: PriorConfig, input_size: int):
    import jax

    shapes = jax.eval_shape(
        variant_net(config).init,
        jax.random.PRNGKey(0),
        jax.ShapeDtypeStruct((1, input_size, input_size, config.channels), np.float32),
    )
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes["params"])


def is_prior_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a ``config.json`` of the image prior format."""
    try:
        return json.loads((Path(path) / CONFIG_FILE).read_text()).get("format") == PRIOR_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def save_image_prior(
    prior: ImagePrior, path: str | os.PathLike, *, force: bool = False, extra: dict | None = None
) -> Path:
    """Write ``prior`` as a directory (module docstring), with ``extra`` added to its
    ``config.json``. Written beside ``path`` and renamed into place; an existing ``path`` is
    replaced only with ``force`` and only if it is an image prior."""
    from flax import serialization

    path = Path(path)
    if path.exists() or path.is_symlink():
        if not force:
            raise FileExistsError(f"{path} already exists; pass force=True to replace it")
        if path.is_symlink() or not path.is_dir() or not is_prior_dir(path):
            raise FileExistsError(
                f"{path} is not an image prior directory; force replaces only one: "
                "choose another output name"
            )
    blob = serialization.to_bytes(prior.params)
    doc = {
        "format": PRIOR_FORMAT,
        "version": PRIOR_VERSION,
        "config": prior.config.to_dict(),
        "input_size": int(prior.input_size),
        "variants": [[bool(n), list(o)] for n, o in prior.variants],
        "params_sha256": hashlib.sha256(blob).hexdigest(),
        **(extra or {}),
    }
    with staged_output_dir(path) as tmp:
        (tmp / PARAMS_FILE).write_bytes(blob)
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=1) + "\n")
        (tmp / RESULTS_MARKER).write_text(_MARKER_TEXT)  # says what wrote the folder
    return path


def load_image_prior(path: str | os.PathLike) -> ImagePrior:
    """Read a directory written by :func:`save_image_prior`; raises :class:`ImagePriorError`
    naming what is wrong (missing, not a prior, damaged, edited) and the fix."""
    import jax
    from flax import serialization

    path = Path(path)
    fix = "re-create it with save_image_prior (or delete it to have cached_image_prior retrain)"
    if not (path / CONFIG_FILE).is_file():
        raise ImagePriorError(f"{path} has no {CONFIG_FILE}: not an image prior directory; {fix}")
    try:
        doc = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ImagePriorError(
            f"{path / CONFIG_FILE} cannot be read as JSON ({e}); the prior is damaged: {fix}"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != PRIOR_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise ImagePriorError(
            f"{path / CONFIG_FILE} is not an image prior (format {found!r}, expected "
            f"{PRIOR_FORMAT!r}); {fix}"
        )
    if doc.get("version") != PRIOR_VERSION:
        raise ImagePriorError(
            f"{path}: unsupported image prior version {doc.get('version')!r}; this release "
            f"reads version {PRIOR_VERSION}: {fix}"
        )
    try:
        config = PriorConfig.from_dict(doc["config"])
        input_size = int(doc["input_size"])
        variants = tuple((bool(n), tuple(o)) for n, o in doc["variants"])
        recorded = str(doc["params_sha256"])
    except (KeyError, TypeError, ValueError) as e:
        raise ImagePriorError(
            f"{path / CONFIG_FILE} has an invalid or missing field ({e}); {fix}"
        ) from None
    try:
        blob = (path / PARAMS_FILE).read_bytes()
    except OSError as e:
        raise ImagePriorError(
            f"{path}: cannot read {PARAMS_FILE} ({e.strerror or e}); {fix}"
        ) from None
    if hashlib.sha256(blob).hexdigest() != recorded:
        raise ImagePriorError(
            f"{path / PARAMS_FILE} differs from what was saved (SHA-256 mismatch): damaged, "
            f"corrupt or edited; {fix}"
        )
    try:
        params = serialization.from_bytes(_params_template(config, input_size), blob)
        prior = ImagePrior(config, params, input_size, variants)
    except Exception as e:  # msgpack, shape or variant errors all mean the same to the caller
        raise ImagePriorError(
            f"{path}: the parameters do not fit the recorded architecture ({e}); {fix}"
        ) from None
    if not all(np.isfinite(np.asarray(a)).all() for a in jax.tree_util.tree_leaves(params)):
        raise ImagePriorError(f"{path}: the parameters hold NaN or infinite values; {fix}")
    return prior


__all__ = [
    "PRIOR_FORMAT",
    "PRIOR_VERSION",
    "CONFIG_FILE",
    "PARAMS_FILE",
    "ImagePriorError",
    "is_prior_dir",
    "save_image_prior",
    "load_image_prior",
]
