"""A learned prior on natural images: which colour variant was applied to an image.

A ciphertext-only key recovery of the block-wise cipher finds the key's pixel
layout up to global ambiguities that colour statistics of one small image cannot
resolve: the order of the colour channels and the sign of the whole image. This
module learns them as a self-supervised pretext task (as RotNet learns rotations):
a small CNN, trained on public natural images, says which of the variants was
applied to an image.

A *variant* is ``(negate, order)``, ``negate`` a bool and ``order`` a permutation of
the channels; applying it to images ``x`` of shape (..., H, W, C), float in [0, 1], is ::

    out = x[..., order]          # output channel i is input channel order[i]
    out = 1 - out if negate      # the negative image

:func:`colour_variants` lists them: for C <= 3 every channel order, each with both
signs (12 for RGB, 2 for grey), for C > 3 the identity order only, with both signs;
index 0 is always the identity. :func:`train_image_prior` trains the classifier,
:func:`variant_log_probs` scores images, :func:`save_image_prior` /
:func:`load_image_prior` keep it on disk and :func:`cached_image_prior` trains once
per set of public images.

JPEG-decoded sources carry a channel-order cue of their own, which this prior does
not learn (re-encoding every variant image as JPEG costs it under one point, below):
only the right channel order puts the luma back on the coder's quantization lattice.
:mod:`~convmixer_jax.attacks.jpeg_trace` scores that, and the attack adds the two.

Measured with ``python benchmarks/image_prior_accuracy.py`` (the defaults: 1,500 steps of
128, trained on CIFAR-10 training images 0..44,999 in 291 s on the shared 2-core CPU,
scored on images 45,000..49,999): 12-way 63.3 %, the sign alone 92.5 %, the channel order
alone 65.8 %; the log-probs of 2 / 5 images under one variant summed: 81.2 % / 95.5 %;
after JPEG re-encoding 62.7 %.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from convmixer_jax.data.local import cache_dir
from convmixer_jax.files.atomic import (
    RESULTS_MARKER,
    remove_stale_temporaries,
    swap_into_place,
    temporary_name,
)

PRIOR_FORMAT = "convmixer-jax-image-prior"
PRIOR_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.msgpack"
HEADS = ("flatten", "gap")

Variant = tuple[bool, tuple[int, ...]]
PyTree = Any


class ImagePriorError(ValueError):
    """An image prior on disk is missing, malformed or corrupt, or its inputs do not fit it."""


# --------------------------------------------------------------------------- the variants


def colour_variants(channels: int = 3) -> tuple[Variant, ...]:
    """The variants ``(negate, order)`` for images of ``channels`` channels.

    Every channel order when ``channels <= 3`` (the identity only for more), each
    first unnegated, then negated: ``2 * channels!`` variants (12 for RGB, 2 for grey).
    Index 0 is the identity ``(False, (0, 1, ..., C - 1))``.
    """
    if not isinstance(channels, (int, np.integer)) or channels < 1:
        raise ValueError(f"channels must be a positive integer, got {channels!r}")
    ident = tuple(range(channels))
    orders = list(itertools.permutations(ident)) if channels <= 3 else [ident]
    return tuple((neg, tuple(int(i) for i in o)) for neg in (False, True) for o in orders)


#: The 12 RGB variants; index 0 is the identity, 1..5 the other channel orders, 6..11 the negatives.
COLOUR_VARIANTS = colour_variants(3)


def _check_variant(v: Variant, channels: int | None = None) -> tuple[bool, tuple[int, ...]]:
    try:
        neg, order = v
        order = tuple(int(i) for i in order)
    except (TypeError, ValueError):
        raise ValueError(f"a variant is (negate, order), got {v!r}") from None
    if sorted(order) != list(range(len(order))):
        raise ValueError(f"a variant's order must be a permutation of 0..C-1, got {order}")
    if channels is not None and len(order) != channels:
        raise ValueError(
            f"the variant {v!r} is for {len(order)} channels, the images have {channels}"
        )
    return bool(neg), order


def apply_variant(images, v: Variant):
    """``images[..., order]``, then ``1 - that`` if ``negate``.

    images: (..., H, W, C) float in [0, 1] (NumPy or JAX), or uint8 (negated as
    ``255 - x``); returns the same type, dtype and shape.
    """
    neg, order = _check_variant(v, images.shape[-1])
    out = images[..., list(order)]
    if not neg:
        return out
    return 255 - out if out.dtype == np.uint8 else 1 - out


def invert_variant(v: Variant) -> Variant:
    """The variant ``w`` with ``apply_variant(apply_variant(x, v), w) == x``: the inverse
    permutation, with the same sign (the sign flip commutes with the channel order)."""
    neg, order = _check_variant(v)
    return neg, tuple(int(i) for i in np.argsort(order))


def variant_index(v: Variant, variants=COLOUR_VARIANTS) -> int:
    """The position of ``v`` in ``variants``."""
    v = _check_variant(v)
    try:
        return [tuple(w) for w in variants].index(v)
    except ValueError:
        raise ValueError(f"{v!r} is not one of the variants") from None


# --------------------------------------------------------------------------- the network


@dataclasses.dataclass(frozen=True)
class PriorConfig:
    """Architecture of the variant classifier.

    Attributes:
      widths: output channels of the 3x3 conv stages; every stage after the first
        halves the grid (stride 2).
      convs_per_stage: 3x3 convolutions per stage.
      first_stride: stride of the first convolution (2 halves the input grid at once).
      num_variants: classifier outputs V.
      channels: input channels C.
      head: 'flatten' (dense over the last grid, keeps where things are: skies are
        on top) or 'gap' (global average pooling).
    """

    widths: tuple[int, ...] = (32, 64, 128)
    convs_per_stage: int = 1
    first_stride: int = 2
    num_variants: int = 12
    channels: int = 3
    head: str = "flatten"

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"widths must be positive, got {self.widths}")
        for name in ("convs_per_stage", "first_stride", "num_variants", "channels"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PriorConfig.{name} must be a positive integer, got {value!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PriorConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown image prior config fields: {sorted(unknown)}")
        return cls(**{**d, **({"widths": tuple(d["widths"])} if "widths" in d else {})})


@functools.lru_cache(maxsize=8)
def _module(config: PriorConfig):
    import flax.linen as nn
    import jax.numpy as jnp

    class VariantNet(nn.Module):
        """(N, S, S, C) float in [0, 1] -> (N, V) logits. Conv3x3 -> LayerNorm -> GELU stages."""

        cfg: PriorConfig

        @nn.compact
        def __call__(self, x):
            x = x * 2.0 - 1.0
            for s, width in enumerate(self.cfg.widths):
                for j in range(self.cfg.convs_per_stage):
                    stride = (2 if s > 0 else self.cfg.first_stride) if j == 0 else 1
                    x = nn.Conv(width, (3, 3), strides=stride, padding="SAME", name=f"conv{s}_{j}")(
                        x
                    )
                    x = nn.gelu(nn.LayerNorm(name=f"norm{s}_{j}")(x))
            x = (
                x.reshape(x.shape[0], -1)
                if self.cfg.head == "flatten"
                else jnp.mean(x, axis=(1, 2))
            )
            return nn.Dense(self.cfg.num_variants, name="head")(x)

    return VariantNet(config)


# --------------------------------------------------------------------------- the prior


@dataclasses.dataclass(frozen=True, eq=False)
class ImagePrior:
    """A trained variant classifier: a pure value.

    Attributes:
      config: the architecture.
      params: the Flax parameter tree (NumPy or JAX arrays).
      input_size: the side S images are resized to before scoring.
      variants: the V variants, in the order of the classifier's outputs
        (default :func:`colour_variants` of ``config.channels``).
    """

    config: PriorConfig
    params: PyTree
    input_size: int = 32
    variants: tuple[Variant, ...] = ()

    def __post_init__(self):
        variants = self.variants or colour_variants(self.config.channels)
        variants = tuple(_check_variant(v, self.config.channels) for v in variants)
        object.__setattr__(self, "variants", variants)
        if len(variants) != self.config.num_variants:
            raise ValueError(
                f"{len(variants)} variants for a classifier of {self.config.num_variants} outputs"
            )
        smallest = self.config.first_stride * 2 ** (len(self.config.widths) - 1)
        if not isinstance(self.input_size, (int, np.integer)) or self.input_size < smallest:
            raise ValueError(
                f"input_size {self.input_size!r} is too small for this architecture "
                f"(at least {smallest}); use fewer stages or a larger input_size"
            )


def as_unit_float(images) -> np.ndarray:
    """(N, H, W, C) uint8, or float in [0, 1] -> the same as float32 in [0, 1]."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
    return images.astype(np.float32, copy=False)


def resize_images(images, size: int) -> np.ndarray:
    """(N, H, W, C) uint8 or float in [0, 1] -> (N, size, size, C) of the same dtype.

    Unchanged when already that size; an exact area average when H and W are
    multiples of ``size``; otherwise ``jax.image.resize`` (linear, antialiased).
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    x = as_unit_float(images)
    if h % size == 0 and w % size == 0:
        out = x.reshape(n, size, h // size, size, w // size, c).mean(axis=(2, 4))
    else:
        import jax

        out = np.asarray(jax.image.resize(x, (n, size, size, c), "linear", antialias=True))
    out = np.clip(out, 0.0, 1.0)
    return (
        np.round(out * 255).astype(np.uint8)
        if images.dtype == np.uint8
        else out.astype(images.dtype)
    )


def _variant_tables(variants) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.array([v[0] for v in variants], np.bool_),
        np.array([v[1] for v in variants], np.int32),
    )


def _optimizer(weight_decay: float):
    """AdamW without its learning rate (the step scales by the scheduled rate it is given)."""
    import optax

    return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(weight_decay))


@functools.lru_cache(maxsize=8)
def _train_step(config: PriorConfig, batch_size: int, crop_pad: int, variants, weight_decay: float):
    """The jitted ``(state, images (N, S, S, C), key, lr) -> (state, loss, accuracy)``, one per setting
    (the rate is an argument, so runs of other lengths or rates reuse the compiled step)."""
    import jax
    import jax.numpy as jnp
    import optax

    module, tx = _module(config), _optimizer(weight_decay)
    negs, orders = (jnp.asarray(t) for t in _variant_tables(variants))

    def batch(images, key):
        """A random batch: images (N, S, S, C) uint8/float -> x (B, S, S, C) float in [0, 1], y (B,) variant."""
        k_idx, k_var, k_flip, k_dy, k_dx = jax.random.split(key, 5)
        idx = jax.random.randint(k_idx, (batch_size,), 0, images.shape[0])
        x = images[idx]
        x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
        s = x.shape[1]
        flip = jax.random.bernoulli(k_flip, 0.5, (batch_size,))
        x = jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)
        if crop_pad:
            x = jnp.pad(
                x, ((0, 0), (crop_pad, crop_pad), (crop_pad, crop_pad), (0, 0)), mode="reflect"
            )
            dy = jax.random.randint(k_dy, (batch_size,), 0, 2 * crop_pad + 1)
            dx = jax.random.randint(k_dx, (batch_size,), 0, 2 * crop_pad + 1)
            rows = dy[:, None] + jnp.arange(s)[None, :]
            cols = dx[:, None] + jnp.arange(s)[None, :]
            x = x[jnp.arange(batch_size)[:, None, None], rows[:, :, None], cols[:, None, :]]
        y = jax.random.randint(k_var, (batch_size,), 0, negs.shape[0])
        x = jnp.take_along_axis(x, orders[y][:, None, None, :], axis=-1)
        x = jnp.where(negs[y][:, None, None, None], 1.0 - x, x)
        return x, y

    def loss_fn(params, x, y):
        logits = module.apply({"params": params}, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) == y)

    def step(state, images, key, lr):
        x, y = batch(images, key)
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], x, y)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        updates = jax.tree_util.tree_map(lambda u: -lr * u, updates)
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, loss, acc

    return jax.jit(step, donate_argnums=0)


def train_image_prior(
    public_images,
    *,
    steps: int = 1500,
    batch_size: int = 128,
    seed: int = 0,
    input_size: int = 32,
    progress: bool = True,
    config: PriorConfig | None = None,
    learning_rate: float = 3e-3,
    weight_decay: float = 0.05,
    crop_pad: int = 2,
) -> ImagePrior:
    """Train the variant classifier on public natural images.

    Each example is a random public image, randomly flipped left-right and shifted by
    up to ``crop_pad`` pixels (reflect padding), under a random one of the variants;
    the target is the variant's index. AdamW with a warm-up + cosine schedule.

    Args:
      public_images: (N, H, W, C) uint8, or float in [0, 1]; resized to
        ``input_size`` x ``input_size`` (:func:`resize_images`) when they differ.
      steps, batch_size: optimizer steps and examples per step.
      seed: initialization and sampling seed.
      config: the architecture (default :class:`PriorConfig` for C channels).
    Returns:
      the :class:`ImagePrior` (params as NumPy arrays).
    """
    import jax
    import optax

    images = resize_images(public_images, input_size)
    if not (np.issubdtype(images.dtype, np.floating) or images.dtype == np.uint8):
        raise ValueError(f"public images must be uint8 or float in [0, 1], got {images.dtype}")
    n, _, _, c = images.shape
    if n < 1:
        raise ValueError("train_image_prior needs at least one public image")
    variants = colour_variants(c)
    config = config or PriorConfig(channels=c, num_variants=len(variants))
    if (config.channels, config.num_variants) != (c, len(variants)):
        raise ValueError(
            f"the config is for {config.channels} channels and {config.num_variants} variants; "
            f"the images have {c} channels and {len(variants)} variants"
        )
    ImagePrior(config, None, input_size, variants)  # checks the input size before any work
    if not 0 <= crop_pad < input_size:
        raise ValueError(f"crop_pad must lie in [0, {input_size}), got {crop_pad}")
    module = _module(config)
    k_init, k_data = jax.random.split(jax.random.PRNGKey(seed))
    params = module.init(k_init, np.zeros((1, input_size, input_size, c), np.float32))["params"]
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, max(1, steps // 20), max(steps, 2)
    )
    state = {"params": params, "opt": _optimizer(weight_decay).init(params)}
    step = _train_step(config, int(batch_size), int(crop_pad), variants, float(weight_decay))
    device_images = jax.device_put(
        images if images.dtype == np.uint8 else images.astype(np.float32)
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="image prior", unit="step")
    try:
        for i in range(steps):
            state, loss, acc = step(
                state, device_images, jax.random.fold_in(k_data, i), np.float32(schedule(i))
            )
            if bar is not None:
                bar.update(1)
                if i % 50 == 0 or i == steps - 1:
                    bar.set_postfix(loss=f"{float(loss):.3f}", acc=f"{float(acc):.3f}")
    finally:
        if bar is not None:
            bar.close()
    params = jax.tree_util.tree_map(np.asarray, state["params"])
    return ImagePrior(config, params, int(input_size), variants)


@functools.lru_cache(maxsize=8)
def _forward(config: PriorConfig):
    """The jitted ``(params, x (B, S, S, C)) -> (B, V)`` log-softmax, one per architecture."""
    import jax

    module = _module(config)
    return jax.jit(
        lambda params, x: jax.nn.log_softmax(module.apply({"params": params}, x), axis=-1)
    )


def variant_log_probs(prior: ImagePrior, images, *, batch_size: int = 500) -> np.ndarray:
    """log P(variant | image) for every image and variant of ``prior``.

    images: (N, H, W, C) uint8, or float in [0, 1], any H, W (resized to the prior's
    ``input_size`` as in training). Returns (N, V) float64, each row a log-softmax.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != prior.config.channels:
        raise ValueError(
            f"images must be (N, H, W, {prior.config.channels}), got shape {images.shape}"
        )
    x = as_unit_float(resize_images(images, prior.input_size))
    fwd = _forward(prior.config)
    n = x.shape[0]
    out = np.empty((n, prior.config.num_variants), np.float64)
    bs = max(1, min(int(batch_size), n)) if n else 1
    for lo in range(0, n, bs):
        chunk = x[lo : lo + bs]
        m = chunk.shape[0]
        if m < bs:  # one compiled shape
            chunk = np.concatenate([chunk, np.zeros((bs - m,) + chunk.shape[1:], chunk.dtype)])
        out[lo : lo + m] = np.asarray(fwd(prior.params, chunk), np.float64)[:m]
    return out


def compose_variants(first: Variant, then: Variant) -> Variant:
    """The variant equal to applying ``first``, then ``then``: negations add up (mod 2)
    and the channel orders compose, ``order[i] = first_order[then_order[i]]``."""
    (n1, o1), (n2, o2) = _check_variant(first), _check_variant(then)
    if len(o1) != len(o2):
        raise ValueError(f"the variants are for {len(o1)} and {len(o2)} channels")
    return bool(n1) ^ bool(n2), tuple(int(o1[j]) for j in o2)


def group_log_probs(
    prior: ImagePrior, images, *, mirror: bool = True, batch_size: int = 500
) -> np.ndarray:
    """:func:`variant_log_probs` averaged over the views of each image that the task
    predicts consistently: every variant ``g`` applied to the image (and to its
    left-right mirror when ``mirror``).

    If an image is a natural image under variant ``v``, its view ``g`` is under
    ``compose(v, g)``; the view's log-probs are re-indexed to ``v`` and the views'
    log-probs averaged, then normalized again. This is test-time augmentation along
    the task's own group (as for rotation prediction); the classifier is not
    equivariant, so the views disagree and their average is the better vote
    (``benchmarks/image_prior_accuracy.py`` reports both).

    images: (N, H, W, C) as for :func:`variant_log_probs`. Returns (N, V) float64 log-softmax rows.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != prior.config.channels:
        raise ValueError(
            f"images must be (N, H, W, {prior.config.channels}), got shape {images.shape}"
        )
    x = as_unit_float(resize_images(images, prior.input_size))  # once; the views commute with it
    variants = [tuple(v) for v in prior.variants]
    index = {v: i for i, v in enumerate(variants)}
    total = np.zeros((x.shape[0], len(variants)), np.float64)
    views = 0
    for view in (x, x[:, :, ::-1]) if mirror else (x,):
        for g in variants:
            lp = variant_log_probs(prior, apply_variant(view, g), batch_size=batch_size)
            total += lp[:, [index[compose_variants(v, g)] for v in variants]]
            views += 1
    from scipy.special import logsumexp

    mean = total / views
    return mean - logsumexp(mean, axis=-1, keepdims=True)


# --------------------------------------------------------------------------- files


def _params_template(config: PriorConfig, input_size: int):
    import jax

    module = _module(config)
    shapes = jax.eval_shape(
        module.init,
        jax.random.PRNGKey(0),
        jax.ShapeDtypeStruct((1, input_size, input_size, config.channels), np.float32),
    )
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes["params"])


def _is_prior_dir(path: Path) -> bool:
    try:
        return json.loads((path / CONFIG_FILE).read_text()).get("format") == PRIOR_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def save_image_prior(
    prior: ImagePrior, path: str | os.PathLike, *, force: bool = False, extra: dict | None = None
) -> Path:
    """Write ``prior`` as a directory: ``config.json`` (format, architecture, input size,
    variants, SHA-256 of the parameters, ``extra``) and ``params.msgpack``
    (``flax.serialization.to_bytes``). Written beside ``path`` and renamed into place;
    an existing ``path`` is replaced only with ``force`` and only if it is an image prior."""
    from flax import serialization

    path = Path(path)
    if path.exists() or path.is_symlink():
        if not force:
            raise FileExistsError(f"{path} already exists; pass force=True to replace it")
        if path.is_symlink() or not path.is_dir() or not _is_prior_dir(path):
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
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = temporary_name(path)
    tmp.mkdir()
    try:
        (tmp / PARAMS_FILE).write_bytes(blob)
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=1) + "\n")
        (tmp / RESULTS_MARKER).write_text("written by convmixer-jax (an image prior)\n")
        swap_into_place(tmp, path, True, kind="results_dir")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_image_prior(path: str | os.PathLike) -> ImagePrior:
    """Read a directory written by :func:`save_image_prior`; raises :class:`ImagePriorError`
    naming what is wrong (missing, not a prior, damaged, edited) and the fix."""
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
        raise ImagePriorError(
            f"{path / CONFIG_FILE} is not an image prior (format "
            f"{doc.get('format') if isinstance(doc, dict) else None!r}, expected {PRIOR_FORMAT!r}); {fix}"
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
    if not all(np.isfinite(np.asarray(a)).all() for a in _leaves(params)):
        raise ImagePriorError(f"{path}: the parameters hold NaN or infinite values; {fix}")
    return prior


def _leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


# --------------------------------------------------------------------------- the cache


def prior_cache_key(public_images, settings: dict) -> str:
    """SHA-256 hex of the images' shape, dtype and bytes and of the training ``settings``."""
    images = np.ascontiguousarray(public_images)
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "format": PRIOR_FORMAT,
                "version": PRIOR_VERSION,
                "shape": list(images.shape),
                "dtype": images.dtype.str,
                "settings": settings,
            },
            sort_keys=True,
            default=str,
        ).encode()
    )
    h.update(memoryview(images).cast("B"))
    return h.hexdigest()


def cached_image_prior(
    public_images, *, seed: int = 0, progress: bool = True, **train_kwargs
) -> ImagePrior:
    """:func:`train_image_prior` once per (images, settings): the result is kept under
    ``cache_dir()/image-prior/<SHA-256>`` and loaded from there on later calls. A damaged
    cache entry is retrained and replaced; an unwritable cache only costs the training."""
    settings = {
        "seed": seed,
        **{
            k: (v.to_dict() if isinstance(v, PriorConfig) else v)
            for k, v in sorted(train_kwargs.items())
        },
    }
    entry = cache_dir() / "image-prior" / prior_cache_key(public_images, settings)
    if entry.is_dir():
        try:
            return load_image_prior(entry)
        except ImagePriorError:
            pass  # rebuilt below, never trusted
    prior = train_image_prior(public_images, seed=seed, progress=progress, **train_kwargs)
    try:
        save_image_prior(prior, entry, force=True, extra={"settings": settings})
    except OSError:
        pass
    return prior


__all__ = [
    "COLOUR_VARIANTS",
    "colour_variants",
    "apply_variant",
    "invert_variant",
    "variant_index",
    "PriorConfig",
    "ImagePrior",
    "ImagePriorError",
    "train_image_prior",
    "variant_log_probs",
    "compose_variants",
    "group_log_probs",
    "save_image_prior",
    "load_image_prior",
    "cached_image_prior",
    "prior_cache_key",
    "resize_images",
]
