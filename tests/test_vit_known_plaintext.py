"""Known-plaintext recovery of a key with block scrambling
(convmixer_jax/attacks/vit_known_plaintext.py) and its report section."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convmixer_jax.attacks.vit_known_plaintext import recover_scrambled_key_known_plaintext
from convmixer_jax.scheme.blocks import from_blocks, to_blocks
from convmixer_jax.scheme.images import encrypt_images_reference
from convmixer_jax.scheme.keys import fingerprint, generate_key


def natural_images(n: int, height: int = 32, width: int = 32, seed: int = 0) -> np.ndarray:
    """(n, height, width, 3) uint8: a colour ramp in a random direction, two antialiased
    discs of other colours and a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / (max(height, width) - 1)
    out = []
    for _ in range(n):
        a = rng.uniform(0, 2 * np.pi)
        g = np.cos(a) * xx + np.sin(a) * yy
        g = (g - g.min()) / np.ptp(g)
        c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        img = c0 + (c1 - c0) * g[..., None]
        for _ in range(2):
            cy, cx, rad = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.35)
            w = np.clip((rad - np.hypot(yy - cy, xx - cx)) * max(height, width), 0, 1)[..., None]
            img = img * (1 - w) + rng.uniform(0, 1, 3) * w
        out.append(img + rng.normal(0, 0.01, img.shape))
    return np.clip(np.rint(np.stack(out) * 255), 0, 255).astype(np.uint8)


def assert_exact(result, key):
    assert result.determined and result.consistent and result.reason == ""
    assert result.undetermined_positions == 0 and result.undetermined_blocks == 0
    assert np.array_equal(result.key.block_perm, key.block_perm)
    assert np.array_equal(result.key.perm, key.perm)
    assert np.array_equal(result.key.flip, key.flip)
    assert result.key.grid == key.grid
    assert (result.block_candidates == 1).all()


# ----------------------------------------------------------------------------- recovery


@pytest.mark.parametrize("size", [(32, 32), (16, 24)])
def test_one_pair_gives_the_exact_key(size):
    h, w = size
    key = generate_key(4, 3, grid=(h // 4, w // 4))  # OS CSPRNG
    x = natural_images(1, h, w, seed=h + w)[0]
    result = recover_scrambled_key_known_plaintext(x, encrypt_images_reference(x, key), 4)
    assert_exact(result, key)
    assert result.grid == key.grid and result.pairs == 1
    # float images in [0, 1], and the grid given explicitly
    xf = x.astype(np.float32) / 255
    zf = encrypt_images_reference(xf, key)
    assert_exact(recover_scrambled_key_known_plaintext(xf, zf, 4, grid=key.grid), key)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_natural_pairs_give_every_key(seed):
    key = generate_key(4, 3, seed=seed, grid=(4, 6))
    x = natural_images(2, 16, 24, seed=7)
    assert_exact(recover_scrambled_key_known_plaintext(x, encrypt_images_reference(x, key), 4), key)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from([(0, 255), (0, 1, 254, 255), (3, 100, 155)]),
    st.integers(1, 2),
    st.sampled_from([(2, 3), (3, 1), (2, 2)]),
    st.booleans(),
)
def test_few_levels_never_give_a_wrong_key_or_block(seed, levels, n, grid, as_float):
    """Images of two to four values repeat blocks and values everywhere: whatever is
    reported as determined is right, and the rest is counted as undetermined."""
    rng = np.random.default_rng(seed)
    m, c = 2, int(rng.integers(1, 4))
    key = generate_key(m, c, seed=seed, grid=grid)
    x = rng.choice(np.array(levels, np.uint8), (n, grid[0] * m, grid[1] * m, c))
    if as_float:
        x = x.astype(np.float32) / 255
    r = recover_scrambled_key_known_plaintext(x, encrypt_images_reference(x, key), m)
    assert r.consistent
    placed = r.block_perm >= 0
    assert np.array_equal(r.block_perm[placed], np.asarray(key.block_perm)[placed])
    assert r.undetermined_blocks == int((~placed).sum())
    assert ((r.block_candidates == 1) == placed).all()
    known = r.perm >= 0
    assert np.array_equal(r.perm[known], np.asarray(key.perm)[known])
    assert np.array_equal(r.flip[r.flip >= 0], np.asarray(key.flip)[r.flip >= 0])
    if r.determined:
        assert_exact(r, key)
    else:
        assert r.key is None and "undetermined" in r.reason
        assert r.undetermined_positions + r.undetermined_blocks > 0


def test_a_flat_image_determines_nothing():
    key = generate_key(4, 3, grid=(4, 6))
    x = np.full((16, 24, 3), 77, np.uint8)
    r = recover_scrambled_key_known_plaintext(x, encrypt_images_reference(x, key), 4)
    assert not r.determined and r.key is None and r.consistent
    assert (r.undetermined_positions, r.undetermined_blocks) == (48, 24)
    assert (r.block_perm == -1).all() and (r.block_candidates == 24).all()
    assert "48 of 48 pixel positions and 24 of 24 blocks" in r.reason


def test_flat_background_leaves_only_its_blocks_open():
    """A textured 2 x 2 region of blocks on a flat background: the pixel key and the
    textured blocks' places come out, the 12 identical flat blocks stay open."""
    key = generate_key(4, 3, grid=(4, 4))
    x = np.full((16, 16, 3), 40, np.uint8)
    x[4:12, 4:12] = natural_images(1, 8, 8, seed=3)[0]
    r = recover_scrambled_key_known_plaintext(x, encrypt_images_reference(x, key), 4)
    assert not r.determined and r.consistent and r.undetermined_positions == 0
    assert np.array_equal(r.perm, key.perm) and np.array_equal(r.flip, key.flip)
    textured = np.isin(np.asarray(key.block_perm), [5, 6, 9, 10])
    assert np.array_equal(r.block_perm[textured], np.asarray(key.block_perm)[textured])
    assert (r.block_perm[~textured] == -1).all() and r.undetermined_blocks == 12
    assert (r.block_candidates[~textured] == 12).all()


def test_blocks_alike_up_to_the_key_are_told_apart_by_the_pixel_key():
    """A block and its complement (the same values up to a flip of every value) and a
    block with its values reversed have the same invariant; the pixel key that the other
    blocks determine places them."""
    key = generate_key(4, 3, grid=(4, 4))
    b = to_blocks(natural_images(1, 16, 16, seed=4)[0], 4).copy()
    b[0, 1] = 255 - b[0, 0]
    b[1, 1] = b[0, 0][::-1]
    x = from_blocks(b, 4, 3)
    assert_exact(recover_scrambled_key_known_plaintext(x, encrypt_images_reference(x, key), 4), key)


def test_pairs_that_no_key_explains_are_inconsistent():
    key = generate_key(4, 3, grid=(4, 4))
    x = natural_images(2, 16, 16, seed=5)
    z = encrypt_images_reference(x, key)
    tampered = z[0].copy()
    tampered[5, 6, 1] ^= 1
    for plain, enc in ((x[0], z[1]), (x[0], tampered)):
        r = recover_scrambled_key_known_plaintext(plain, enc, 4)
        assert not r.determined and not r.consistent and r.key is None
        assert r.reason and (r.block_perm == -1).all()


def test_a_key_without_block_scrambling_comes_out_with_blocks_in_place():
    pixel_key = generate_key(4, 3)
    x = natural_images(1, 16, 16, seed=8)[0]
    r = recover_scrambled_key_known_plaintext(x, encrypt_images_reference(x, pixel_key), 4)
    assert r.determined and np.array_equal(r.key.block_perm, np.arange(16))
    assert np.array_equal(r.key.perm, pixel_key.perm)
    assert np.array_equal(r.key.flip, pixel_key.flip)


@pytest.mark.parametrize(
    "plain, encrypted, block_size, grid, message",
    [
        ((16, 16, 3), (16, 24, 3), 4, None, "shape (16, 24, 3)"),
        ((18, 16, 3), (18, 16, 3), 4, None, "not divisible by the block size 4"),
        ((16, 16, 3), (16, 16, 3), 4, (4, 5), "does not fit 16 x 16 images"),
        ((16, 16, 3), (16, 16, 3), 4, (0, 4), "two positive integers"),
        ((16, 16), (16, 16), 4, None, "(N, H, W, C) or (H, W, C)"),
        ((0, 16, 16, 3), (0, 16, 16, 3), 4, None, "no image pairs"),
        ((16, 16, 3), (16, 16, 3), 0, None, "positive integer"),
        ((16, 16, 1), (16, 16, 1), 1, None, "1 value per block"),
    ],
)
def test_bad_inputs_are_one_line_errors(plain, encrypted, block_size, grid, message):
    with pytest.raises(ValueError) as err:
        recover_scrambled_key_known_plaintext(
            np.zeros(plain, np.uint8), np.zeros(encrypted, np.uint8), block_size, grid
        )
    assert message in str(err.value) and "\n" not in str(err.value)


def test_mixed_dtypes_and_out_of_range_floats_are_refused():
    x = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="same dtype"):
        recover_scrambled_key_known_plaintext(x, x.astype(np.float32), 4)
    f = np.full((8, 8, 3), 2.0, np.float32)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        recover_scrambled_key_known_plaintext(f, f, 4)


# ----------------------------------------------------------------------------- report section


def tiny_vit_context(images, seed: int = 3):
    from convmixer_jax.attacks.protocol import AttackContext
    from convmixer_jax.model.config import ViTConfig

    cfg = ViTConfig(dim=16, depth=1, num_heads=2, patch_size=4, image_size=16, num_classes=3)
    data = (images, np.zeros(len(images), np.int64))
    stream = np.random.SeedSequence(seed)
    return AttackContext(cfg, None, data, data, data, stream, seeded=True)


def test_report_section_counts_exact_keys_per_pair_count():
    from convmixer_jax.attacks import vit_known_plaintext_report as section

    context = tiny_vit_context(natural_images(5, 16, 16, seed=6))
    config = section.ViTKnownPlaintextConfig(vit_kp_keys=3, vit_kp_pairs=(1, 2))
    res = section.ATTACK.run(context, config)
    assert (res["keys"], res["grid"], res["block_len"]) == (3, [4, 4], 48)
    assert [row["pairs"] for row in res["rows"]] == [1, 2]
    keys = [generate_key(4, 3, seed=[context.key_seed(0), i], grid=(4, 4)) for i in range(3)]
    for row in res["rows"]:
        assert row["keys"] == 3
        for name in ("exact", "exact_pixel_key", "exact_block_key", "claimed"):
            assert row[name] == 3
        assert row["claimed_wrong"] == row["inconsistent"] == 0
        assert row["pixel_positions_right"] == row["blocks_placed_right"] == 1.0
        assert row["undetermined_positions"] == row["undetermined_blocks"] == 0
        assert [t["key_fingerprint"] for t in row["trials"]] == [fingerprint(k) for k in keys]
    text = json.dumps(res)  # JSON-serializable, and keys appear only by fingerprint
    assert "perm" not in text.replace("undetermined", "")
    lines = section.ATTACK.summary(res)
    assert lines[0] == "## Known-plaintext key recovery on the ViT (block scrambling)"
    assert "mean undetermined positions (of 48) | mean undetermined blocks (of 16)" in lines[4]
    assert lines[6].startswith("| 1 | 3 | 3 | 3 | 3 | 3 | 0 | 1.000 | 0.00 | 0.00 | ")
    assert lines[7].startswith("| 2 | 3 | 3 | 3 | 3 | 3 | 0 | 1.000 | 0.00 | 0.00 | ")


def test_report_section_on_flat_images_claims_nothing():
    from convmixer_jax.attacks import vit_known_plaintext_report as section

    context = tiny_vit_context(np.full((3, 16, 16, 3), 200, np.uint8))
    res = section.ATTACK.run(context, section.ViTKnownPlaintextConfig(2, (1, 3)))
    for row in res["rows"]:
        assert (row["exact"], row["claimed"], row["claimed_wrong"], row["inconsistent"]) == (
            0,
            0,
            0,
            0,
        )
        assert row["undetermined_positions"] == row["max_undetermined_positions"] == 48
        assert row["undetermined_blocks"] == 16 and row["blocks_placed_right"] == 0.0
    with pytest.raises(ValueError, match="4 pairs requested but only 3"):
        section.ATTACK.run(context, section.ViTKnownPlaintextConfig(1, (4,)))


def test_report_section_applies_to_vits_and_has_its_own_options():
    from convmixer_jax.attacks import vit_known_plaintext_report as section
    from convmixer_jax.attacks import vit_model_report
    from convmixer_jax.attacks.protocol import merged_options
    from convmixer_jax.attacks.report import ATTACKS
    from convmixer_jax.model.config import PRESETS

    attack = section.ATTACK
    assert attack.skip_reason(PRESETS["vit_cifar"]) is None
    assert "ViT models only" in attack.skip_reason(PRESETS["paper"])
    assert not attack.enabled(section.ViTKnownPlaintextConfig(vit_kp_keys=0))
    assert attack in ATTACKS
    others = [a.config_type for a in ATTACKS if a is not attack]
    others.append(vit_model_report.ViTModelRecoveryConfig)
    names = [s.name for s in merged_options(others + [section.ViTKnownPlaintextConfig])]
    assert names.count("vit_kp_keys") == names.count("vit_kp_pairs") == 1
    assert len(names) == len(merged_options(others)) + 2


def test_report_section_without_a_seed_draws_keys_from_the_os():
    from convmixer_jax.attacks import vit_known_plaintext_report as section
    from convmixer_jax.attacks.protocol import AttackContext

    seeded = tiny_vit_context(natural_images(2, 16, 16, seed=9))
    context = AttackContext(
        seeded.model_config,
        None,
        seeded.test_data,
        seeded.test_data,
        seeded.test_data,
        seeded.stream,
        seeded=False,
    )
    config = section.ViTKnownPlaintextConfig(vit_kp_keys=2, vit_kp_pairs=(1,))
    first, second = (section.ATTACK.run(context, config)["rows"][0] for _ in range(2))
    assert first["exact"] == second["exact"] == 2
    prints = {t["key_fingerprint"] for row in (first, second) for t in row["trials"]}
    assert len(prints) == 4
