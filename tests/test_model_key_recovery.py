"""Key recovery from an encrypted model: with the original weights, with an
independently trained reference, and from the encrypted model alone."""

import itertools

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.special import erf

from convmixer_jax.attacks.from_model import evaluate_recovery, recover_key_from_encrypted_model
from convmixer_jax.attacks.from_weights import (
    ModelRecovery,
    recover_key_from_structure,
    recover_key_with_independent_reference,
    recover_key_with_reference,
)
from convmixer_jax.attacks.kernel_algebra import symmetric_keys
from convmixer_jax.attacks.layout_search import qap_local_maximum
from convmixer_jax.attacks.stem_statistics import rank_keys_by_batch_stats
from convmixer_jax.scheme.blocks import normalized_blocks
from convmixer_jax.scheme.keys import Key, generate_key, make_key, validate_key
from convmixer_jax.scheme.params import decrypt_kernel, encrypt_kernel


def _encrypt(kernel, key):
    enc, _ = encrypt_kernel(kernel, np.zeros(kernel.shape[-1], kernel.dtype), key)
    return np.asarray(enc, np.float64)


def _smooth_kernel(seed, p=4, c=3, d=256, length=0.8, alpha=(1.0, 1.25, 0.7), beta=0.5):
    """A (P, P, C, d) kernel with the structure of a trained stem, planted:
    every output channel is a smooth P x P field shared by the colour channels
    (weights ``alpha``) plus a smaller smooth field per colour channel
    (``beta``). Rows of one pixel are the most correlated, then same-channel
    rows of 4-neighbours; channel 1 ("G") has the largest norm and channels
    0, 1 ("R", "G") are the most alike, as in the trained CIFAR-10 stem."""
    rng = np.random.default_rng(seed)
    ij = np.stack(np.divmod(np.arange(p * p), p), 1)
    dist2 = ((ij[:, None, :] - ij[None, :, :]) ** 2).sum(-1)
    chol = np.linalg.cholesky(np.exp(-dist2 / (2 * length**2)) + 1e-9 * np.eye(p * p))
    shared = chol @ rng.normal(size=(p * p, d))  # (P*P, d)
    own = np.einsum("ab,bcd->acd", chol, rng.normal(size=(p * p, c, d)))  # (P*P, C, d)
    k = np.asarray(alpha)[None, :, None] * shared[:, None, :] + beta * own
    return k.reshape(p, p, c, d)


def _same(a: Key, b: Key) -> bool:
    return np.array_equal(a.perm, b.perm) and np.array_equal(a.flip, b.flip)


# ------------------------------------------------------------ original weights


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 4), c=st.integers(1, 4), d=st.integers(4, 40), seed=st.integers(0, 10**6))
def test_original_weights_give_the_exact_key(m, c, d, seed):
    assume(m * m * c >= 2)  # odd pb too
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(m, m, c, d)).astype(np.float32)
    key = generate_key(m, c, seed=seed)
    enc, _ = encrypt_kernel(kernel, np.zeros(d, np.float32), key)
    rec = recover_key_with_reference(np.asarray(enc), kernel)
    assert rec.key is not None
    np.testing.assert_array_equal(rec.key.perm, key.perm)
    np.testing.assert_array_equal(rec.key.flip, key.flip)
    assert rec.fraction_correct(key) == 1.0
    np.testing.assert_allclose(rec.similarity, 1.0, atol=1e-5)


def test_unrelated_reference_recovers_little():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(4, 4, 3, 64))
    key = generate_key(4, 3, seed=1)
    enc, _ = encrypt_kernel(kernel, np.zeros(64), key)
    rec = recover_key_with_reference(np.asarray(enc), rng.normal(size=(4, 4, 3, 64)))
    assert rec.fraction_correct(key) < 0.2
    assert rec.similarity.max() < 0.9


# ---------------------------------------------------------------- the solver


def test_qap_stops_at_a_pair_exchange_local_maximum():
    rng = np.random.default_rng(3)
    n = 9
    a, b = rng.normal(size=(2, n, n))
    a, b = a + a.T, b + b.T
    np.fill_diagonal(a, 0)
    np.fill_diagonal(b, 0)
    unary = rng.normal(size=(n, n))

    def f(q):
        return np.sum(a * b[np.ix_(q, q)]) + unary[np.arange(n), q].sum()

    perm, val = qap_local_maximum(a, b, rng.permutation(n), unary)
    assert sorted(perm) == list(range(n))
    assert val == pytest.approx(f(perm))
    for x, y in itertools.combinations(range(n), 2):
        q = perm.copy()
        q[x], q[y] = q[y], q[x]
        assert f(q) <= val + 1e-9


def test_qap_finds_a_planted_isomorphism():
    rng = np.random.default_rng(4)
    a = np.abs(rng.normal(size=(12, 12)))
    a = a + a.T
    np.fill_diagonal(a, 0)
    true = rng.permutation(12)
    b = np.empty_like(a)
    b[np.ix_(true, true)] = a  # b[true[u], true[v]] = a[u, v]
    best = max(
        (qap_local_maximum(a, b, rng.permutation(12)) for _ in range(20)), key=lambda t: t[1]
    )
    np.testing.assert_array_equal(best[0], true)


# ---------------------------------------------------- independent reference


@pytest.mark.parametrize("mixing", ["orthogonal", "permutation"])
def test_independent_reference_with_mixed_output_channels(mixing):
    """Reference = the original kernel with its output channels permuted and
    rescaled, or mixed by a random orthogonal matrix, plus noise: row
    matching fails, the correlation-based attack recovers the permutation and
    the flips (the global sign only when the channels are not mixed: an
    orthogonal mix may negate the basis)."""
    kernel = _smooth_kernel(0)
    rng = np.random.default_rng(1)
    d = kernel.shape[-1]
    if mixing == "orthogonal":
        mix, _ = np.linalg.qr(rng.normal(size=(d, d)))
    else:
        mix = np.eye(d)[rng.permutation(d)] * rng.uniform(0.5, 2.0, d)
    ref = (kernel.reshape(48, d) @ mix).reshape(kernel.shape)
    ref = ref + 0.2 * ref.std() * rng.normal(size=ref.shape)
    for seed in (2, 3):
        key = generate_key(4, 3, seed=seed)
        enc = _encrypt(kernel, key)
        assert recover_key_with_reference(enc, ref).fraction_correct(key) < 0.3
        rec = recover_key_with_independent_reference(enc, ref, seed=0)
        validate_key(rec.key)
        ev = evaluate_recovery(key, rec)
        assert ev["fraction_perm"] == 1.0
        assert ev["exact_up_to_global_sign"]
        assert ev["true_key_in_candidates"] and ev["candidates"] == 96
        assert _same(rec.candidates[0], rec.key)  # then its global-sign twin, for re-ranking
        assert _same(rec.candidates[1], make_key(rec.key.perm, 1 - rec.key.flip, 4, 3))
        if mixing == "permutation":
            assert ev["exact"]


def test_independent_reference_always_returns_a_valid_key():
    rng = np.random.default_rng(5)
    key = generate_key(2, 3, seed=5)
    enc = _encrypt(rng.normal(size=(2, 2, 3, 16)), key)
    rec = recover_key_with_independent_reference(enc, rng.normal(size=(2, 2, 3, 24)))
    assert isinstance(rec, ModelRecovery)
    validate_key(rec.key)
    assert int(np.sum(rec.key.flip)) == 6
    with pytest.raises(ValueError):
        recover_key_with_independent_reference(enc, rng.normal(size=(4, 4, 3, 16)))


# ------------------------------------------------------ encrypted model only


def test_symmetric_keys_are_the_block_symmetries():
    """Decrypting with each of the 96 symmetric keys gives the original
    kernel up to a dihedral symmetry of the P x P block, a channel order and
    a global sign, and every such transform occurs once."""
    rng = np.random.default_rng(6)
    kernel = rng.normal(size=(4, 4, 3, 8))
    key = generate_key(4, 3, seed=6)
    enc = _encrypt(kernel, key)
    cands = symmetric_keys(key)
    assert len(cands) == 96 and _same(cands[0], key)
    for k in cands:
        validate_key(k)
    transforms = []
    for sign in (1, -1):
        for order in itertools.permutations(range(3)):
            for t in range(8):
                x = np.rot90(kernel, t % 4, axes=(0, 1))
                x = x.transpose(1, 0, 2, 3) if t >= 4 else x
                transforms.append(sign * x[:, :, list(order)])
    found = []
    for k in cands:
        dec = np.asarray(decrypt_kernel(enc, np.zeros(8), k)[0])
        hits = [i for i, x in enumerate(transforms) if np.allclose(dec, x)]
        assert len(hits) == 1
        found.append(hits[0])
    assert sorted(found) == list(range(96))


def test_odd_pb_has_no_global_sign_twin():
    """For an odd pb (P = 3, C = 3: 27 values, 13 flips) 1 - flip has 14 ones and is no key:
    the symmetric keys are the 8 x 6 layouts with the key's own sign, each once."""
    rng = np.random.default_rng(2)
    kernel = rng.normal(size=(3, 3, 3, 8))
    key = generate_key(3, 3, seed=2)
    enc = _encrypt(kernel, key)
    cands = symmetric_keys(key)
    assert len(cands) == 48 and _same(cands[0], key)
    found = set()
    for k in cands:
        validate_key(k)
        assert int(np.sum(k.flip)) == 13
        dec = np.asarray(decrypt_kernel(enc, np.zeros(8), k)[0])
        for order in itertools.permutations(range(3)):
            for t in range(8):
                x = np.rot90(kernel, t % 4, axes=(0, 1))
                x = (x.transpose(1, 0, 2, 3) if t >= 4 else x)[:, :, list(order)]
                if np.allclose(dec, x):
                    found.add((order, t))
    assert len(found) == 48


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_structure_recovers_the_layout_up_to_the_block_symmetry(seed):
    kernel = _smooth_kernel(10 + seed)
    key = generate_key(4, 3, seed=100 + seed)
    rec = recover_key_from_structure(_encrypt(kernel, key), seed=0)
    validate_key(rec.key)
    ev = evaluate_recovery(key, rec)
    assert ev["true_key_in_candidates"] and ev["candidates"] == 96
    # the planted channel asymmetry (R, G most alike; G largest) fixes the
    # channel order: the key is right up to a dihedral symmetry and global sign.
    assert any(_same(k, key) for k in symmetric_keys(rec.key, channel_orders=False))


def test_structure_fails_on_a_kernel_without_structure_but_returns_a_valid_key():
    rng = np.random.default_rng(7)
    key = generate_key(4, 3, seed=7)
    rec = recover_key_from_structure(_encrypt(rng.normal(size=(4, 4, 3, 64)), key))
    validate_key(rec.key)
    assert not evaluate_recovery(key, rec)["true_key_in_candidates"]


def _gelu(h):
    return 0.5 * h * (1 + erf(h / np.sqrt(2)))


def _normalized_rows(images, m):
    """(N, H, W, C) in [0, 1] -> (N*H/M*W/M, M*M*C) blocks in [-1, 1], the stem's input."""
    blocks = normalized_blocks(images, m)
    return blocks.reshape(-1, blocks.shape[-1])


def _images(seed, n, p=4):
    """Random colour images in [0, 1] with skewed brightness (dark with a few
    bright regions, so x and 1 - x differ in distribution) and unequal
    channel means (so channel orders differ)."""
    rng = np.random.default_rng(seed)
    base = rng.exponential(size=(n, 8, 8, 1)).repeat(4, 1).repeat(4, 2)
    x = 0.2 + 0.15 * base + 0.05 * rng.normal(size=(n, 32, 32, 3)) + np.array([0.1, 0.0, -0.1])
    return np.clip(x, 0, 1)


def test_batch_stats_pick_the_channel_order_and_global_sign():
    kernel = _smooth_kernel(20, d=64)
    bias = np.random.default_rng(21).normal(size=64) * 0.3
    blocks = _normalized_rows(_images(22, 64), 4)  # "training" images
    g = _gelu(blocks @ kernel.reshape(48, 64) + bias)
    bn_mean, bn_var = g.mean(0), g.var(0)
    key = generate_key(4, 3, seed=23)
    enc = _encrypt(kernel, key)
    rec = recover_key_from_structure(
        enc, stem_bias=bias, stem_bn_mean=bn_mean, stem_bn_var=bn_var, public_images=_images(24, 32)
    )  # other "public" images
    validate_key(rec.key)
    assert "BatchNorm" in rec.notes
    # images with dihedral-symmetric statistics cannot fix the grid orientation:
    assert any(
        _same(k, key) for k in symmetric_keys(rec.key, channel_orders=False, global_sign=False)
    )
    scores = rank_keys_by_batch_stats(
        enc, bias, bn_mean, bn_var, [key, make_key(key.perm, 1 - key.flip, 4, 3)], _images(24, 32)
    )
    assert scores[0] < scores[1]


def test_batch_stats_of_a_relu_stem_need_the_relu():
    """A ReLU model's statistics (timm's convmixer_768_32) ranked with its own activation put the
    key ahead of its negative; the ranking follows the activation it is given."""
    kernel = _smooth_kernel(30, d=64)
    bias = np.random.default_rng(31).normal(size=64) * 0.3
    g = np.maximum(_normalized_rows(_images(32, 64), 4) @ kernel.reshape(48, 64) + bias, 0.0)
    bn_mean, bn_var = g.mean(0), g.var(0)
    key = generate_key(4, 3, seed=33)
    enc = _encrypt(kernel, key)
    pair = [key, make_key(key.perm, 1 - key.flip, 4, 3)]
    relu = rank_keys_by_batch_stats(
        enc, bias, bn_mean, bn_var, pair, _images(34, 32), activation="relu"
    )
    gelu = rank_keys_by_batch_stats(enc, bias, bn_mean, bn_var, pair, _images(34, 32))
    assert relu[0] < relu[1] and relu[0] < gelu[0]
    with pytest.raises(ValueError, match="activation"):
        rank_keys_by_batch_stats(
            enc, bias, bn_mean, bn_var, pair, _images(34, 32), activation="silu"
        )


# -------------------------------------------------------------- measurement


def test_evaluate_recovery_counts():
    key = generate_key(4, 3, seed=8)
    exact = ModelRecovery(key.perm, key.flip, np.ones(48), key, candidates=(key,))
    ev = evaluate_recovery(key, exact)
    assert ev == {
        "fraction_both": 1.0,
        "fraction_perm": 1.0,
        "fraction_flip": 1.0,
        "exact": True,
        "exact_up_to_global_sign": True,
        "valid_key": True,
        "true_key_in_candidates": True,
        "candidates": 1,
    }
    neg = make_key(key.perm, 1 - key.flip, 4, 3)
    ev = evaluate_recovery(key, ModelRecovery(neg.perm, neg.flip, np.ones(48), neg))
    assert ev["fraction_flip"] == 0.0 and ev["fraction_both"] == 0.0 and ev["fraction_perm"] == 1.0
    assert (
        ev["exact_up_to_global_sign"] and not ev["exact"] and ev["true_key_in_candidates"] is None
    )
    perm = np.asarray(key.perm).copy()
    perm[[0, 1]] = perm[[1, 0]]
    ev = evaluate_recovery(key, ModelRecovery(perm, key.flip, np.ones(48), None))
    assert ev["fraction_perm"] == pytest.approx(46 / 48) and not ev["valid_key"]


def test_whole_model_attack_plumbing():
    """recover_key_from_encrypted_model on a tiny model: a valid key among the
    symmetric candidates, with and without public images."""
    import jax

    from convmixer_jax.model.convmixer import ConvMixerConfig
    from convmixer_jax.scheme.params import encrypt_params
    from convmixer_jax.training.loop import init_variables_abstract

    config = ConvMixerConfig(
        dim=16, depth=1, kernel_size=3, patch_size=2, num_classes=3, image_size=8
    )
    rng = np.random.default_rng(33)
    variables = jax.tree_util.tree_map_with_path(  # shapes only: a full init compiles for seconds
        lambda path, s: (
            np.ones(s.shape, np.float32)
            if "var" in jax.tree_util.keystr(path)
            else (0.3 * rng.normal(size=s.shape)).astype(np.float32)
        ),
        jax.eval_shape(lambda: init_variables_abstract(config)),
    )
    stem = dict(
        variables["params"]["stem"], kernel=_smooth_kernel(30, p=2, d=16).astype(np.float32)
    )
    variables = {**variables, "params": {**variables["params"], "stem": stem}}
    key = generate_key(2, 3, seed=31)
    enc = encrypt_params(variables, key)
    images = (np.random.default_rng(32).uniform(size=(6, 8, 8, 3)) * 255).astype(np.uint8)
    for imgs in (None, images):
        rec = recover_key_from_encrypted_model(config, enc, imgs, top=3)
        validate_key(rec.key)
        assert len(rec.candidates) == 96 and _same(rec.candidates[0], rec.key)
    assert rec.method == "structure+confidence"


def test_confidence_rerank_weighs_the_negative_of_each_leading_candidate():
    """The BatchNorm ranking can put a key's negative ahead of it; the re-rank scores both."""
    import jax

    from convmixer_jax.attacks.from_model import (
        negated_key,
        rank_keys_by_confidence,
        rerank_by_confidence,
    )
    from convmixer_jax.model.convmixer import ConvMixerConfig
    from convmixer_jax.scheme.params import encrypt_params
    from convmixer_jax.training.loop import init_variables_abstract

    config = ConvMixerConfig(
        dim=16, depth=1, kernel_size=3, patch_size=2, num_classes=3, image_size=8
    )
    rng = np.random.default_rng(5)
    variables = jax.tree_util.tree_map_with_path(
        lambda path, s: (
            np.ones(s.shape, np.float32)
            if "var" in jax.tree_util.keystr(path)
            else (0.5 * rng.normal(size=s.shape)).astype(np.float32)
        ),
        jax.eval_shape(lambda: init_variables_abstract(config)),
    )
    key, other = generate_key(2, 3, seed=1), generate_key(2, 3, seed=2)
    enc = encrypt_params(variables, key)
    images = (rng.uniform(size=(16, 8, 8, 3)) * 255).astype(np.uint8)
    neg = negated_key(key)
    assert _same(negated_key(neg), key) and np.all(np.asarray(neg.flip) != np.asarray(key.flip))
    assert negated_key(generate_key(1, 3, seed=3)) is None  # odd pb: the flip count fixes the sign
    rec = ModelRecovery(neg.perm, neg.flip, np.ones(12), neg, candidates=(neg, other))
    out = rerank_by_confidence(rec, config, enc, images, top=1)
    assert len(out.candidates) == 3 and any(_same(k, key) for k in out.candidates[:2])
    ent = rank_keys_by_confidence(config, enc, [neg, key], images)
    assert _same(out.key, (neg, key)[int(np.argmin(ent))]) and _same(out.candidates[2], other)
