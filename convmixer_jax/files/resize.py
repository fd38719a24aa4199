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
"""

from __future__ import annotations

import math

import numpy as np

from convmixer_jax.scheme.images import ImageError

DEFAULT_CROP_PCT = 0.96  # timm's ConvMixer default_cfg


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
    if not 0 < crop_pct <= 1:
        raise ImageError(f"crop_pct must lie in (0, 1], got {crop_pct}")
    if size < 1:
        raise ImageError(f"the resize target must be a positive size, got {size}")
    h, w, c = image.shape
    nh, nw = resized_shape(h, w, size, crop_pct)
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
    return (
        np.stack([eval_resize(im, size, crop_pct) for im in images])
        if len(images)
        else np.zeros((0, size, size, 3), np.uint8)
    )


__all__ = ["DEFAULT_CROP_PCT", "eval_resize", "eval_resize_batch", "resized_shape"]
