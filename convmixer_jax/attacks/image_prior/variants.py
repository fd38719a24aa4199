"""Colour variants of an image: a channel order and a sign.

A *variant* is ``(negate, order)``, ``negate`` a bool and ``order`` a permutation of
the channels; applying it to images ``x`` of shape (..., H, W, C), float in [0, 1], is ::

    out = x[..., order]          # output channel i is input channel order[i]
    out = 1 - out if negate      # the negative image

:func:`colour_variants` lists them: for C <= 3 every channel order, each with both
signs (``2 * C!``: 12 for RGB, 2 for grey), for C > 3 the identity order only, with
both signs; index 0 is always the identity. Pure NumPy (works on JAX arrays too).
"""

from __future__ import annotations

import itertools

import numpy as np

Variant = tuple[bool, tuple[int, ...]]


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


#: The 12 RGB variants; index 0 is the identity, 1..5 the other channel orders, 6..11 the
#: negatives.
COLOUR_VARIANTS = colour_variants(3)


def check_variant(v: Variant, channels: int | None = None) -> Variant:
    """``v`` as ``(bool, tuple of int)``; ValueError unless it is a variant (of ``channels``
    channels, when given)."""
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
    neg, order = check_variant(v, images.shape[-1])
    out = images[..., list(order)]
    if not neg:
        return out
    return 255 - out if out.dtype == np.uint8 else 1 - out


def invert_variant(v: Variant) -> Variant:
    """The variant ``w`` with ``apply_variant(apply_variant(x, v), w) == x``: the inverse
    permutation, with the same sign (the sign flip commutes with the channel order)."""
    neg, order = check_variant(v)
    return neg, tuple(int(i) for i in np.argsort(order))


def compose_variants(first: Variant, then: Variant) -> Variant:
    """The variant equal to applying ``first``, then ``then``: negations add up (mod 2)
    and the channel orders compose, ``order[i] = first_order[then_order[i]]``."""
    (n1, o1), (n2, o2) = check_variant(first), check_variant(then)
    if len(o1) != len(o2):
        raise ValueError(f"the variants are for {len(o1)} and {len(o2)} channels")
    return bool(n1) ^ bool(n2), tuple(int(o1[j]) for j in o2)


def variant_index(v: Variant, variants=COLOUR_VARIANTS) -> int:
    """The position of ``v`` in ``variants``."""
    v = check_variant(v)
    try:
        return [tuple(w) for w in variants].index(v)
    except ValueError:
        raise ValueError(f"{v!r} is not one of the variants") from None


def variant_tables(variants) -> tuple[np.ndarray, np.ndarray]:
    """The V variants as arrays: negate (V,) bool and order (V, C) int32."""
    return (
        np.array([v[0] for v in variants], np.bool_),
        np.array([v[1] for v in variants], np.int32),
    )


__all__ = [
    "Variant",
    "COLOUR_VARIANTS",
    "colour_variants",
    "check_variant",
    "apply_variant",
    "invert_variant",
    "compose_variants",
    "variant_index",
    "variant_tables",
]
