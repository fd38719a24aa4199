"""timm's evaluation transform: resize the shorter side, then crop the centre.

A model takes images of one size (its ``image_size``); photos come in any size.
:func:`eval_resize` maps an image of any size onto the model's input grid the
way timm evaluates its ImageNet models: the shorter side is resized (bicubic)
to ``floor(size / crop_pct)`` with the aspect ratio kept, then the centre
``size x size`` is cut out (``crop_pct`` 0.96 for timm's ConvMixers). It works
on 8-bit pixels with Pillow, as timm's transform does on PIL images.

Encryption is block-wise on the model's input grid, so a client resizes first
and encrypts the resized image; resizing an encrypted image would mix pixels
of different block positions and break the equivalence.

What is accepted (:func:`check_resize`, called before any image is read): a target
size from 1 to :data:`MAX_SIZE` and a ``crop_pct`` from :data:`MIN_CROP_PCT` to 1;
and, per image, an intermediate (resized, not yet cropped) image of at most
:data:`MAX_INTERMEDIATE_PIXELS` pixels, so that a thin image is not blown up to
gigabytes. Anything else is refused with the allowed range, before memory runs out.
"""

from __future__ import annotations

import math

import numpy as np

from convmixer_jax.scheme.images import ImageError

DEFAULT_CROP_PCT = 0.96  # timm's ConvMixer default_cfg
#: The largest target size: 4096 x 4096 RGB is 48 MiB per image, far above any model's input
#: (timm's ConvMixers take 224 x 224).
MAX_SIZE = 4096
#: The smallest crop share: below it the centre crop would keep less than a quarter of the
#: shorter side (timm's models use 0.875 to 1).
MIN_CROP_PCT = 0.25
#: The most pixels of the resized image before its centre crop: Pillow's own limit for images
#: it decodes (``PIL.Image.MAX_IMAGE_PIXELS``, about 179 million; 512 MiB as RGB).
MAX_INTERMEDIATE_PIXELS = 178_956_970


def check_resize(size, crop_pct: float = DEFAULT_CROP_PCT) -> None:
    """Refuse a target ``size`` outside 1 .. :data:`MAX_SIZE` or a ``crop_pct`` outside
    [:data:`MIN_CROP_PCT`, 1] with an :class:`~convmixer_jax.scheme.images.ImageError`
    naming the allowed range; callers run it before reading any image."""
    is_int = isinstance(size, (int, np.integer)) and not isinstance(size, bool)
    if not is_int or not 1 <= size <= MAX_SIZE:
        need = ""
        if is_int and size > MAX_SIZE:
            gib = 3 * int(size) ** 2 / 2**30
            need = f" (one {size} x {size} RGB image alone takes {gib:,.1f} GiB)"
        raise ImageError(
            f"the resize target {size!r} is outside 1..{MAX_SIZE}{need}; "
            f"resize to the model's input size (--resize SIZE with SIZE <= {MAX_SIZE})"
        )
    if not MIN_CROP_PCT <= crop_pct <= 1:  # NaN fails too
        raise ImageError(
            f"crop_pct {crop_pct!r} is outside [{MIN_CROP_PCT}, 1]: it is the centre crop's share "
            f"of the resized shorter side (timm's models use 0.875 to 1); "
            f"give --crop-pct F with {MIN_CROP_PCT} <= F <= 1"
        )


def resized_shape(
    height: int, width: int, size: int, crop_pct: float = DEFAULT_CROP_PCT
) -> tuple[int, int]:
    """(h, w) after the shorter-side resize: the shorter side becomes floor(size / crop_pct),
    the longer one keeps the aspect ratio (truncated, as torchvision's ``Resize`` does)."""
    short = int(math.floor(size / crop_pct))
    if height <= width:
        return short, int(short * width / height)
    return int(short * height / width), short


def eval_resize(image, size: int, crop_pct: float = DEFAULT_CROP_PCT) -> np.ndarray:
    """(H, W, C) uint8 of any size -> (size, size, C) uint8 by timm's evaluation transform.

    C is 1, 3 or 4 (4: every channel resized alone, the alpha not mixed into the colours).
    The crop's top-left corner is ``round((h - size) / 2)``,
    ``round((w - size) / 2)`` as in torchvision's ``CenterCrop``.
    """
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ImageError(
            f"resizing takes 8-bit (H, W, C) images with C in 1, 3, 4; got {image.dtype} "
            f"{image.shape}: resize float images yourself before encrypting them"
        )
    check_resize(size, crop_pct)
    h, w, c = image.shape
    nh, nw = resized_shape(h, w, size, crop_pct)
    if nh * nw > MAX_INTERMEDIATE_PIXELS:
        raise ImageError(
            f"resizing this {h} x {w} image to {size} x {size} (crop_pct {crop_pct:g}) would "
            f"first make it {nh} x {nw}, more than {MAX_INTERMEDIATE_PIXELS:,} pixels; crop it "
            "closer to a square first"
        )
    if c == 3:  # one RGB image, as timm resizes it
        out = np.asarray(
            Image.fromarray(image).resize((nw, nh), Image.Resampling.BICUBIC), np.uint8
        )
    else:  # channel by channel: Pillow would premultiply an RGBA image's colours by its alpha
        out = np.stack(
            [
                np.asarray(
                    Image.fromarray(np.ascontiguousarray(image[:, :, i])).resize(
                        (nw, nh), Image.Resampling.BICUBIC
                    ),
                    np.uint8,
                )
                for i in range(c)
            ],
            axis=-1,
        )
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return np.ascontiguousarray(out[top : top + size, left : left + size])


def eval_resize_batch(images, size: int, crop_pct: float = DEFAULT_CROP_PCT) -> np.ndarray:
    """:func:`eval_resize` of every image of a sequence of (H_i, W_i, C) uint8 -> (N, size, size,
    C) uint8."""
    check_resize(size, crop_pct)
    return (
        np.stack([eval_resize(im, size, crop_pct) for im in images])
        if len(images)
        else np.zeros((0, size, size, 3), np.uint8)
    )


__all__ = [
    "DEFAULT_CROP_PCT",
    "MAX_INTERMEDIATE_PIXELS",
    "MAX_SIZE",
    "MIN_CROP_PCT",
    "check_resize",
    "eval_resize",
    "eval_resize_batch",
    "resized_shape",
]
