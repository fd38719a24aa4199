"""RandAugment on device: each op against PIL's, and the batch function's shape/range/randomness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageEnhance, ImageOps

from convmixer_jax.training.randaugment import OPS, all_ops, rand_augment


def _pil_reference(img: np.ndarray, magnitude: int, sign: float) -> dict:
    pil = Image.fromarray(img)
    f = magnitude / 30
    enh = 1 + sign * 0.9 * f
    return {
        "equalize": ImageOps.equalize(pil),
        "autocontrast": ImageOps.autocontrast(pil),
        "posterize": ImageOps.posterize(pil, int(8 - round(magnitude / 7.5))),
        "solarize": ImageOps.solarize(pil, 255 * (30 - magnitude) / 30),
        "brightness": ImageEnhance.Brightness(pil).enhance(enh),
        "color": ImageEnhance.Color(pil).enhance(enh),
        "contrast": ImageEnhance.Contrast(pil).enhance(enh),
        "sharpness": ImageEnhance.Sharpness(pil).enhance(enh),
    }


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1), magnitude=st.integers(0, 30), sign=st.sampled_from([1.0, -1.0])
)
def test_pixel_ops_match_pil(seed, magnitude, sign):
    rng = np.random.default_rng(seed)
    img = (rng.random((16, 12, 3)) ** 2 * 200 + 20).astype(np.uint8)
    outs = np.asarray(all_ops(jnp.asarray(img, jnp.float32) / 255, magnitude, sign)) * 255
    for name, ref in _pil_reference(img, magnitude, sign).items():
        # PIL rounds every enhance to uint8; we keep floats: at most one level apart
        np.testing.assert_allclose(
            outs[OPS.index(name)], np.asarray(ref, np.float32), atol=1.5, err_msg=name
        )


def test_geometric_ops_move_pixels_as_stated():
    img = np.zeros((9, 9, 1), np.float32)
    img[4, 4] = 1.0  # centre pixel
    img[4, 6] = 0.5  # two to the right of it
    outs = np.asarray(all_ops(jnp.asarray(img), 30, 1.0))
    shift = round(150 / 331 * 9)  # translate_x at full magnitude: 4 pixels to the right
    tx = outs[OPS.index("translate_x")][..., 0]
    assert tx[4, 4 + shift] == 1.0 and tx[4, 4] == 0.0
    rot = outs[OPS.index("rotate")][..., 0]
    assert rot[4, 4] == 1.0  # rotation about the centre keeps it
    np.testing.assert_array_equal(outs[OPS.index("identity")], img)


def test_batch_shape_range_and_independence():
    x = jax.random.uniform(jax.random.PRNGKey(0), (8, 12, 12, 3))
    a = np.asarray(rand_augment(jax.random.PRNGKey(1), x, 2, 12))
    b = np.asarray(rand_augment(jax.random.PRNGKey(1), x, 2, 12))
    c = np.asarray(rand_augment(jax.random.PRNGKey(2), x, 2, 12))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    np.testing.assert_array_equal(a, b)  # a function of the key
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, np.asarray(x))
    with pytest.raises(ValueError, match="magnitude"):
        rand_augment(jax.random.PRNGKey(0), x, 2, 31)
