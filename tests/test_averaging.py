"""Weight averaging and BatchNorm re-estimation (convmixer_jax.training.averaging)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convmixer_jax.model.convmixer import ConvMixer, ConvMixerConfig
from convmixer_jax.training.averaging import average_variables, recalibrate_batch_stats
from convmixer_jax.training.loop import init_variables

CFG = ConvMixerConfig(
    dim=8, depth=2, kernel_size=3, patch_size=2, num_classes=3, image_size=8, channels=3
)


def images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3)).astype(np.uint8)


def test_average_is_the_leafwise_weighted_mean_and_leaves_inputs_alone():
    a, b, c = (init_variables(CFG, s) for s in (0, 1, 2))
    a_before = jax.tree.map(np.copy, a)
    avg = average_variables([a, b])
    for x, y, m in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(avg), strict=True):
        np.testing.assert_allclose(m, (x + y) / 2, rtol=0, atol=1e-7)
        assert m.dtype == np.float32
    weighted = average_variables([a, b, c], [1, 1, 2])
    for x, y, z, m in zip(
        jax.tree.leaves(a),
        jax.tree.leaves(b),
        jax.tree.leaves(c),
        jax.tree.leaves(weighted),
        strict=True,
    ):
        np.testing.assert_allclose(m, 0.25 * x + 0.25 * y + 0.5 * z, rtol=0, atol=1e-7)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(a_before), strict=True):
        np.testing.assert_array_equal(x, y)


def test_average_refuses_bad_inputs_by_name():
    a, b = init_variables(CFG, 0), init_variables(CFG, 1)
    wide = init_variables(
        ConvMixerConfig(
            dim=16, depth=2, kernel_size=3, patch_size=2, num_classes=3, image_size=8, channels=3
        ),
        0,
    )
    deep = init_variables(
        ConvMixerConfig(
            dim=8, depth=3, kernel_size=3, patch_size=2, num_classes=3, image_size=8, channels=3
        ),
        0,
    )
    with pytest.raises(ValueError, match="at least two"):
        average_variables([a])
    with pytest.raises(ValueError, match="shape"):
        average_variables([a, wide])
    with pytest.raises(ValueError, match="another parameter tree"):
        average_variables([a, deep])
    with pytest.raises(ValueError, match="one weight per model"):
        average_variables([a, b], [1.0])
    with pytest.raises(ValueError, match="positive"):
        average_variables([a, b], [1.0, 0.0])


def test_recalibrated_eval_mode_equals_the_train_mode_forward_of_the_same_batch():
    v = average_variables([init_variables(CFG, 0), init_variables(CFG, 3)])
    x = images(12)
    r = recalibrate_batch_stats(CFG, v, x, batch_size=12)
    model = ConvMixer(CFG)
    xf = x.astype(np.float32) / 255.0
    train_logits, _ = model.apply(v, xf, train=True, mutable=["batch_stats"])
    eval_logits = model.apply(r, xf, train=False)
    np.testing.assert_allclose(eval_logits, train_logits, rtol=0, atol=1e-5)
    # with the stale (averaged) statistics the eval forward is something else
    assert (
        np.max(np.abs(np.asarray(model.apply(v, xf, train=False)) - np.asarray(train_logits)))
        > 1e-3
    )
    for p, q in zip(jax.tree.leaves(r["params"]), jax.tree.leaves(v["params"]), strict=True):
        np.testing.assert_array_equal(p, q)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(2, 20), batch=st.integers(1, 20))
def test_first_layer_statistics_do_not_depend_on_the_batching(n, batch):
    """The stem's BatchNorm input does not depend on other batch members, so its pooled
    mean and variance must be the same for every batch size (and equal the direct values)."""
    v = init_variables(CFG, 0)
    x = images(n, seed=n)
    one = recalibrate_batch_stats(CFG, v, x, batch_size=n)["batch_stats"]["stem_bn"]
    split = recalibrate_batch_stats(CFG, v, x, batch_size=batch)["batch_stats"]["stem_bn"]
    np.testing.assert_allclose(split["mean"], one["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(split["var"], one["var"], rtol=1e-4, atol=1e-6)
    # direct: stem conv (P x P, stride P) of the normalized image, then exact GELU
    p = CFG.patch_size
    xf = (x.astype(np.float64) / 255.0 - 0.5) / 0.5
    blocks = xf.reshape(n, 4, p, 4, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, 16, p * p * 3)
    kernel = np.asarray(v["params"]["stem"]["kernel"], np.float64).reshape(p * p * 3, CFG.dim)
    z = blocks @ kernel + np.asarray(v["params"]["stem"]["bias"], np.float64)
    from scipy.special import erf

    g = 0.5 * z * (1 + erf(z / np.sqrt(2)))
    np.testing.assert_allclose(one["mean"], g.mean(axis=(0, 1)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(one["var"], g.var(axis=(0, 1)), rtol=1e-3, atol=1e-6)


def test_recalibrate_refuses_empty_data():
    with pytest.raises(ValueError, match="at least one image"):
        recalibrate_batch_stats(CFG, init_variables(CFG, 0), images(0))


def test_class_sorted_data_is_shuffled_before_batching():
    """Images stored in two homogeneous halves (dark, then bright): unshuffled batches of
    half the data would each be normalized by their own statistics, and the BatchNorm
    after the stem would see something far from the one-batch values."""
    rng = np.random.default_rng(0)
    dark = rng.integers(0, 40, (32, 8, 8, 3))
    bright = rng.integers(215, 256, (32, 8, 8, 3))
    x = np.concatenate([dark, bright]).astype(np.uint8)
    v = init_variables(CFG, 0)
    full = recalibrate_batch_stats(CFG, v, x, batch_size=64)["batch_stats"]
    halves = [
        recalibrate_batch_stats(CFG, v, h, batch_size=32)["batch_stats"] for h in (x[:32], x[32:])
    ]
    sorted_mean = (
        halves[0]["block_0"]["depthwise_bn"]["mean"] + halves[1]["block_0"]["depthwise_bn"]["mean"]
    ) / 2
    shuffled = recalibrate_batch_stats(CFG, v, x, batch_size=32)["batch_stats"]
    err_sorted = np.abs(sorted_mean - full["block_0"]["depthwise_bn"]["mean"]).mean()
    err_shuffled = np.abs(
        shuffled["block_0"]["depthwise_bn"]["mean"] - full["block_0"]["depthwise_bn"]["mean"]
    ).mean()
    assert err_shuffled < 0.5 * err_sorted
    # the order of the input does not matter once the data is in one batch
    flipped = recalibrate_batch_stats(CFG, v, x[::-1], batch_size=64)["batch_stats"]
    for a, b in zip(jax.tree.leaves(flipped), jax.tree.leaves(full), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_augmented_statistics_are_those_of_the_augmented_images():
    v = init_variables(CFG, 1)
    x = images(10, seed=5)
    mirror = lambda rng, batch: batch[:, :, ::-1].astype(np.float32) / 255.0  # noqa: E731
    aug = recalibrate_batch_stats(CFG, v, x, batch_size=10, augment=mirror)
    direct = recalibrate_batch_stats(CFG, v, x[:, :, ::-1], batch_size=10)
    plain = recalibrate_batch_stats(CFG, v, x, batch_size=10)
    for a, b in zip(jax.tree.leaves(aug), jax.tree.leaves(direct), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert (
        max(
            np.max(np.abs(a - b))
            for a, b in zip(
                jax.tree.leaves(aug["batch_stats"]),
                jax.tree.leaves(plain["batch_stats"]),
                strict=True,
            )
        )
        > 1e-4
    )
    # a deterministic augmentation pooled over two passes gives the one-pass values
    twice = recalibrate_batch_stats(CFG, v, x, batch_size=10, augment=mirror, passes=2)
    for a, b in zip(jax.tree.leaves(twice), jax.tree.leaves(aug), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_each_augmented_batch_gets_its_own_random_key():
    seen = []

    def record(rng, batch):
        seen.append(
            np.asarray(jax.random.key_data(rng))
            if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
            else np.asarray(rng)
        )
        return batch.astype(np.float32) / 255.0

    recalibrate_batch_stats(
        CFG, init_variables(CFG, 0), images(9), batch_size=4, augment=record, passes=2, seed=3
    )
    assert len(seen) == 6  # 3 batches x 2 passes
    assert len({s.tobytes() for s in seen}) == 6
    base = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(
        seen[4], np.asarray(jax.random.fold_in(jax.random.fold_in(base, 1), 1))
    )
    with pytest.raises(ValueError, match="passes"):
        recalibrate_batch_stats(CFG, init_variables(CFG, 0), images(4), passes=0)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        recalibrate_batch_stats(CFG, init_variables(CFG, 0), images(4), seed=-1)
