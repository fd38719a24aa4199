"""Ciphertext-only key recovery (attacks/ciphertext_only.py, attacks/layout_search.py) and
recover-key without --plain, on smooth random fields (natural-like images,
tests/attack_helpers.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from attack_helpers import smooth_fields
from cli_helpers import run
from hypothesis import given, settings
from hypothesis import strategies as st

from convmixer_jax.attacks import layout_search as ls
from convmixer_jax.attacks.ciphertext_only import (
    block_template,
    colour_key,
    match_scale,
    recover_key_ciphertext_only,
)
from convmixer_jax.attacks.kernel_algebra import correlation_signs
from convmixer_jax.scheme.blocks import normalized_blocks, normalized_images
from convmixer_jax.scheme.images import ImageError, encrypt_images_reference
from convmixer_jax.scheme.keys import generate_key


def planted(rng, n: int, t: int = 2):
    """A (t, n, n) and B = A relabelled by a random permutation ``truth``: f is maximal exactly
    at ``truth`` (f(truth) = |A|^2, Cauchy-Schwarz)."""
    a = rng.normal(size=(t, n, n))
    truth = rng.permutation(n)
    b = np.empty_like(a)
    b[:, truth[:, None], truth[None, :]] = a
    return a, b, truth


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 9), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_swap_gains_equal_the_change_of_the_objective(n, t, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(t, n, n)), rng.normal(size=(t, n, n))
    p = rng.permutation(n)
    gains = ls.swap_gains(a, b, p)
    f0 = ls.objective(a, b, p)
    for x in range(n):
        for y in range(n):
            q = p.copy()
            q[x], q[y] = p[y], p[x]
            assert gains[x, y] == pytest.approx(
                ls.objective(a, b, q) - f0, abs=1e-9 * max(1, abs(f0))
            )


@settings(max_examples=25, deadline=None)
@given(st.integers(3, 10), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_gains_updated_after_exchanges_equal_recomputed_ones(n, t, seed):
    # local_search updates the gains in O(T n^2) after each exchange instead of recomputing them
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(t, n, n)), rng.normal(size=(t, n, n))
    p = rng.permutation(n)
    gains, m = ls.swap_gains(a, b, p), b[:, p][:, :, p]
    for _ in range(4):
        x, y = (int(v) for v in rng.choice(n, 2, replace=False))
        p[[x, y]] = p[[y, x]]
        m[:, [x, y]] = m[:, [y, x]]
        m[:, :, [x, y]] = m[:, :, [y, x]]
        ls._update_gains(gains, a, m, x, y)
        np.testing.assert_allclose(
            gains, ls.swap_gains(a, b, p), atol=1e-9 * max(1.0, np.abs(gains).max())
        )
    q, v, g = ls.local_search(a, b, rng.permutation(n))
    assert v == pytest.approx(ls.objective(a, b, q)) and np.all(g <= 1e-9 * max(1.0, abs(v)))


def test_search_finds_a_planted_permutation():
    # B is A relabelled by a permutation: f is maximal exactly at that permutation
    a, b, truth = planted(np.random.default_rng(0), 12)
    sols = ls.search([(a, b)], starts=8, keep=3)
    p, v, hits = sols[0]
    assert v == pytest.approx(ls.objective(a, b, truth))
    assert np.array_equal(p, truth) and hits >= 1


@pytest.mark.parametrize("seed", range(6))
def test_iterated_local_search_escapes_where_exchanges_stop(seed):
    # a planted permutation (maximum of f, as above) and exchanges from random starts until
    # one stops short of it: the kicks reach the maximum, and never return worse
    rng = np.random.default_rng(seed)
    n = 16
    a, b, truth = planted(rng, n)
    while True:
        p, v, _ = ls.local_search(a, b, rng.permutation(n))
        if not np.array_equal(p, truth):
            break
    q, w = ls.iterated_local_search(a, b, p, kicks=100, seed=seed)
    assert w >= v
    assert np.array_equal(q, truth) and w == pytest.approx(ls.objective(a, b, truth))
    assert w == pytest.approx(ls.objective(a, b, q))


@pytest.mark.parametrize(
    "m,c,size,seed", [(3, 1, 24, 0), (3, 1, 24, 1), (2, 3, 24, 2), (4, 3, 32, 3), (4, 3, 32, 4)]
)
def test_signature_layout_polished_by_exchanges_is_the_layout(m, c, size, seed):
    # the constructive start alone (sorted correlation profiles, one linear assignment),
    # then exchanges on every level, lands on the key's layout (up to its colour variants)
    from convmixer_jax.attacks import ciphertext_only as co
    from convmixer_jax.attacks.image_prior import colour_variants

    template = block_template(smooth_fields(80, size, c, seed=200), m)
    key = generate_key(m, c, seed=[3, seed])
    grid = normalized_blocks(encrypt_images_reference(smooth_fields(4, size, c, seed=seed), key), m)
    pb = grid.shape[-1]
    s, _ = correlation_signs(np.nan_to_num(np.corrcoef(grid.reshape(-1, pb), rowvar=False)))
    p = co.signature_layout(template, grid * s)
    assert sorted(p.tolist()) == list(range(pb))
    for ph, pv in template.precisions:
        p = ls.local_search(*co._terms(ph, pv, grid * s), p)[0]
    truth = [co._layout_of(colour_key(key, v)) for v in colour_variants(c)]
    assert any(np.array_equal(p, q) for q in truth)


def test_one_start_is_searched_again():
    # a single start cannot give the MIN_HITS a claim needs: the layout search runs again
    # (two more searches, then kicks) and the hits of all three add up
    from convmixer_jax.attacks import ciphertext_only as co

    template = block_template(smooth_fields(60, 24, 1, seed=100), 3)
    key = generate_key(3, 1, seed=[7, 5])
    grid = normalized_blocks(encrypt_images_reference(smooth_fields(4, 24, 1, seed=5), key), 3)
    s, _ = correlation_signs(np.nan_to_num(np.corrcoef(grid.reshape(-1, 9), rowvar=False)))
    levels = [co._terms(ph, pv, grid * s) for ph, pv in template.precisions]
    notes: list[str] = []
    once = ls.search(levels, starts=1)
    assert once[0][2] == 1
    sols = co._layout_search(levels, 1, 0, False, notes)
    assert "searched again" in notes[0]
    p, v, hits = sols[0]
    assert hits >= co.MIN_HITS and v >= once[0][1]
    assert [t[1] for t in sols] == sorted((t[1] for t in sols), reverse=True)
    # a template of one regularization has no second level to start from: the same level again
    one = co._layout_search(levels[-1:], 1, 0, False, [])
    assert one[0][1] >= ls.search(levels[-1:], starts=1)[0][1]
    # with the signature start, one start and the constructive guess already agree
    res = recover_key_ciphertext_only(
        encrypt_images_reference(smooth_fields(4, 24, 1, seed=5), key), 3, template, starts=1
    )
    assert res.determined, res.reason
    assert np.array_equal(res.key.perm, key.perm) and np.array_equal(res.key.flip, key.flip)


def test_normalized_blocks_round_trip():
    x = smooth_fields(2, 12, 3, seed=1)
    g = normalized_blocks(x, 3)
    assert g.shape == (2, 4, 4, 27)
    assert np.array_equal(np.rint(normalized_images(g, 3, 3) * 255).astype(np.uint8), x)


def test_images_that_do_not_split_into_blocks_are_refused():
    template = block_template(smooth_fields(60, 24, 1, seed=100), 3)
    with pytest.raises(ImageError, match="do not split into 3 x 3 blocks"):
        recover_key_ciphertext_only(smooth_fields(2, 20, 1, seed=0), 3, template)


def test_colour_key_applies_the_variant():
    from convmixer_jax.attacks.image_prior import apply_variant, colour_variants
    from convmixer_jax.scheme.images import decrypt_images

    key = generate_key(2, 3, seed=5)
    x = smooth_fields(1, 8, 3, seed=2)
    enc = encrypt_images_reference(x, key)
    base = np.asarray(decrypt_images(enc, key), np.float64) / 255
    for v in colour_variants(3):
        got = np.asarray(decrypt_images(enc, colour_key(key, v)), np.float64) / 255
        assert np.allclose(got, apply_variant(base, v), atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_key_from_encrypted_smooth_fields_alone(seed):
    # odd pb (M = 3, one channel: pb = 9) fixes the global sign by the flip count and there
    # is no channel order, so the layout search decides everything
    public = smooth_fields(60, 24, 1, seed=100)
    template = block_template(public, 3)
    key = generate_key(3, 1, seed=[7, seed])
    enc = encrypt_images_reference(smooth_fields(4, 24, 1, seed=seed), key)
    res = recover_key_ciphertext_only(enc, 3, template, starts=8)
    assert res.determined, res.reason
    assert np.array_equal(res.key.perm, key.perm) and np.array_equal(res.key.flip, key.flip)
    assert res.layout_margin >= 5.0 and np.all(res.sign_support >= 6.0)


def test_rgb_layout_without_a_prior_is_right_up_to_the_colour_variants():
    from convmixer_jax.attacks.image_prior import colour_variants

    public = smooth_fields(80, 24, 3, seed=200)
    template = block_template(public, 2)
    key = generate_key(2, 3, seed=11)
    enc = encrypt_images_reference(smooth_fields(4, 24, 3, seed=3), key)
    res = recover_key_ciphertext_only(enc, 2, template, starts=8)
    assert (
        not res.determined and "channel order" in res.reason
    )  # no prior: the colour is not claimed
    variants = [colour_key(res.best_guess, v) for v in colour_variants(3)]
    assert any(
        np.array_equal(k.perm, key.perm) and np.array_equal(k.flip, key.flip) for k in variants
    )


def test_noise_is_refused():
    public = smooth_fields(60, 24, 1, seed=100)
    template = block_template(public, 3)
    noise = np.random.default_rng(0).integers(0, 256, (4, 24, 24, 1), dtype=np.uint8)
    enc = encrypt_images_reference(noise, generate_key(3, 1, seed=1))
    res = recover_key_ciphertext_only(enc, 3, template, starts=4)
    assert not res.determined and "flips" in res.reason


def test_match_scale():
    x = smooth_fields(2, 8, 3, seed=4)
    assert match_scale(x, 8, 8) is not None and np.array_equal(match_scale(x, 8, 8), x)
    y = match_scale(x, 16, 24)
    assert y.shape == (2, 16, 24, 3) and y.dtype == np.uint8
    assert abs(float(y.mean()) - float(x.mean())) < 3


def test_cli_recovers_from_encrypted_images_and_refuses_noise(tmp_path, capsys):
    public = smooth_fields(60, 24, 1, seed=100)
    np.save(tmp_path / "public.npy", public)
    key = generate_key(3, 1, seed=[7, 0])
    np.save(tmp_path / "enc.npy", encrypt_images_reference(smooth_fields(4, 24, 1, seed=0), key))
    rc, out, err = run(
        capsys,
        "recover-key",
        "--encrypted",
        str(tmp_path / "enc.npy"),
        "--block-size",
        "3",
        "--public",
        str(tmp_path / "public.npy"),
        "--quiet",
        "--out",
        str(tmp_path / "key.json"),
    )
    assert rc == 0, err
    got = json.loads((tmp_path / "key.json").read_text())
    assert got["perm"] == [int(v) for v in key.perm] and got["flip"] == [int(v) for v in key.flip]

    noise = np.random.default_rng(1).integers(0, 256, (4, 24, 24, 1), dtype=np.uint8)
    np.save(tmp_path / "noise.npy", encrypt_images_reference(noise, key))
    rc, out, err = run(
        capsys,
        "recover-key",
        "--encrypted",
        str(tmp_path / "noise.npy"),
        "--block-size",
        "3",
        "--public",
        str(tmp_path / "public.npy"),
        "--quiet",
        "--out",
        str(tmp_path / "noise-key.json"),
    )
    assert rc == 1 and "cannot determine the key" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "noise-key.json").exists()


def test_cli_known_plaintext_options_do_not_mix(tmp_path, capsys):
    x = smooth_fields(1, 8, 1, seed=0)
    np.save(tmp_path / "p.npy", x)
    rc, out, err = run(
        capsys,
        "recover-key",
        "--plain",
        str(tmp_path / "p.npy"),
        "--encrypted",
        str(tmp_path / "p.npy"),
        "--block-size",
        "2",
        "--best-guess",
        "--out",
        str(tmp_path / "k.json"),
    )
    assert rc != 0 and "--best-guess" in err and not (tmp_path / "k.json").exists()
