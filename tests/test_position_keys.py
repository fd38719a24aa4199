"""The position-key countermeasure: a key per block position, a position-wise patch
embedding that keeps the model's function, and the model-side attack that undoes it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from model_helpers import random_variables

from convmixer_jax.attacks.position_keys import (
    align_to_first,
    exact_positions_all,
    keys_from_first,
    relative_keys,
)
from convmixer_jax.model.convmixer import ConvMixerConfig
from convmixer_jax.model.inference import predict_logits
from convmixer_jax.model.position_wise import position_wise_logits
from convmixer_jax.scheme.images import encrypt_images, encrypt_images_reference
from convmixer_jax.scheme.keys import InvalidKeyError, Key
from convmixer_jax.scheme.position_keys import (
    decrypt_images_by_position,
    encrypt_images_by_position,
    encrypt_params_by_position,
    generate_position_keys,
)

SETTINGS = settings(max_examples=12, deadline=None, database=None)


@SETTINGS
@given(
    m=st.integers(1, 4),
    c=st.integers(1, 3),
    gh=st.integers(1, 3),
    gw=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_each_block_is_encrypted_with_its_own_key(m, c, gh, gw, seed):
    if m * m * c < 2:
        return
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (2, gh * m, gw * m, c), dtype=np.uint8)
    keys = generate_position_keys(m, c, (gh, gw), seed=seed)
    enc = np.asarray(encrypt_images_by_position(x, keys))
    assert enc.dtype == np.uint8 and enc.shape == x.shape
    for i in range(gh):
        for j in range(gw):
            g = i * gw + j
            block = (slice(None), slice(i * m, (i + 1) * m), slice(j * m, (j + 1) * m))
            want = encrypt_images_reference(x[block], Key(keys.perm[g], keys.flip[g], m, c))
            np.testing.assert_array_equal(enc[block], want)
    np.testing.assert_array_equal(np.asarray(decrypt_images_by_position(enc, keys)), x)


def test_position_keys_are_independent_and_checked():
    keys = generate_position_keys(2, 3, (2, 2))  # OS CSPRNG
    assert keys.perm.shape == (4, 12) and len({np.asarray(p).tobytes() for p in keys.perm}) == 4
    with pytest.raises(InvalidKeyError, match="one key per block position"):
        encrypt_images_by_position(np.zeros((1, 6, 4, 3), np.uint8), keys)
    with pytest.raises(InvalidKeyError, match="batch of keys"):
        encrypt_images_by_position(
            np.zeros((1, 4, 4, 3), np.uint8), Key(keys.perm[0], keys.flip[0], 2, 3)
        )


@pytest.mark.parametrize(
    "mean, std", [(None, None), ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))]
)
def test_the_position_wise_model_on_its_images_is_the_plain_model(mean, std):
    cfg = ConvMixerConfig(
        dim=16,
        depth=1,
        kernel_size=3,
        patch_size=2,
        num_classes=5,
        image_size=8,
        mean=mean,
        std=std,
    )
    variables = random_variables(cfg, seed=1)
    x = np.random.default_rng(2).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    keys = generate_position_keys(2, 3, (4, 4), seed=3)
    enc_vars = encrypt_params_by_position(variables, keys, (4, 4), mean=mean, std=std)
    assert enc_vars["params"]["stem"]["kernel"].shape == (4, 4, 2, 2, 3, 16)
    plain = predict_logits(cfg, variables, x)
    np.testing.assert_allclose(
        position_wise_logits(cfg, enc_vars, encrypt_images_by_position(x, keys)),
        plain,
        rtol=1e-4,
        atol=1e-4,
    )
    # one key for every block (the paper's scheme) does not fit this model
    one = Key(keys.perm[0], keys.flip[0], 2, 3)
    wrong = position_wise_logits(cfg, enc_vars, encrypt_images(x, one))
    assert np.abs(wrong - plain).max() > 1e-2


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), m=st.sampled_from([1, 2, 3]), c=st.sampled_from([1, 3]))
def test_relative_keys_from_the_model_align_every_block_to_the_first_key(seed, m, c):
    if m * m * c < 2:
        return
    cfg = ConvMixerConfig(
        dim=12, depth=1, kernel_size=3, patch_size=m, num_classes=3, image_size=3 * m, channels=c
    )
    variables = random_variables(cfg, seed=seed % 1000)
    keys = generate_position_keys(m, c, (3, 3), seed=seed)
    enc_vars = encrypt_params_by_position(variables, keys, (3, 3))
    src, negate, margin = relative_keys(enc_vars["params"]["stem"]["kernel"])
    assert margin > 0.05
    x = np.random.default_rng(seed).integers(0, 256, (3, 3 * m, 3 * m, c), dtype=np.uint8)
    first = Key(keys.perm[0], keys.flip[0], m, c)
    aligned = align_to_first(np.asarray(encrypt_images_by_position(x, keys)), src, negate, m)
    np.testing.assert_array_equal(aligned, np.asarray(encrypt_images(x, first)))
    assert exact_positions_all(keys_from_first(first, src, negate), keys) == 9
    # a wrong first key gives wrong keys everywhere
    other = generate_position_keys(m, c, (1, 1), seed=seed + 1)
    bad = keys_from_first(Key(other.perm[0], other.flip[0], m, c), src, negate)
    same = bool(
        np.array_equal(other.perm[0], first.perm) and np.array_equal(other.flip[0], first.flip)
    )
    assert exact_positions_all(bad, keys) == (9 if same else 0)
