"""The learned colour-variant prior (convmixer_jax/attacks/image_prior/), on synthetic images.

The images are smooth random fields over a colour gradient (a bright bluish top, a
darker greenish bottom), so that the sign and the channel order of an image are
visible to a tiny prior trained for a few hundred steps.
"""

import hashlib
import json
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from convmixer_jax.attacks import image_prior as ip
from convmixer_jax.attacks.image_prior import cache as prior_cache

SIZE = 16
TINY = ip.PriorConfig(widths=(8,), first_stride=1)
FAST = dict(
    batch_size=64, input_size=SIZE, config=TINY, crop_pad=0, progress=False
)  # one compiled step for all


def natural_like(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8: a bluish-bright top fading into a darker greenish bottom,
    plus a smooth random field per image and a random brightness."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(n, size // 4, size // 4, 3))
    field = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)
    field = (
        field + np.roll(field, 1, 1) + np.roll(field, 1, 2) + np.roll(field, (1, 1), (1, 2))
    ) / 4
    t = np.linspace(0, 1, size)[None, :, None, None]
    top, bottom = np.array([0.55, 0.7, 0.9]), np.array([0.2, 0.35, 0.15])
    img = top * (1 - t) + bottom * t + 0.08 * field + rng.uniform(-0.1, 0.1, (n, 1, 1, 1))
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def prior():
    return ip.train_image_prior(natural_like(512), steps=150, learning_rate=1e-2, **FAST)


def test_the_variants():
    assert len(ip.COLOUR_VARIANTS) == 12 and len(set(ip.COLOUR_VARIANTS)) == 12
    assert ip.COLOUR_VARIANTS[0] == (False, (0, 1, 2))
    assert ip.colour_variants(1) == ((False, (0,)), (True, (0,)))
    assert ip.colour_variants(2) == (
        (False, (0, 1)),
        (False, (1, 0)),
        (True, (0, 1)),
        (True, (1, 0)),
    )
    assert ip.colour_variants(4) == ((False, (0, 1, 2, 3)), (True, (0, 1, 2, 3)))
    assert sum(neg for neg, _ in ip.COLOUR_VARIANTS) == 6
    assert ip.variant_index((True, (2, 1, 0))) == ip.COLOUR_VARIANTS.index((True, (2, 1, 0)))


def test_applying_a_variant_is_the_documented_rule():
    x = np.random.default_rng(0).uniform(size=(2, 3, 4, 3))
    out = ip.apply_variant(x, (True, (2, 0, 1)))
    np.testing.assert_array_equal(out[..., 0], 1 - x[..., 2])
    np.testing.assert_array_equal(out[..., 1], 1 - x[..., 0])
    np.testing.assert_array_equal(out[..., 2], 1 - x[..., 1])
    np.testing.assert_array_equal(ip.apply_variant(x, ip.COLOUR_VARIANTS[0]), x)
    with pytest.raises(ValueError, match="channels"):
        ip.apply_variant(x, (False, (0,)))


@settings(max_examples=60, deadline=None)
@given(v=st.sampled_from(ip.COLOUR_VARIANTS + ip.colour_variants(1)), data=st.data())
def test_invert_undoes_apply(v, data):
    c = len(v[1])
    x = data.draw(hnp.arrays(np.float64, (2, 3, 3, c), elements=st.floats(0, 1)))
    back = ip.apply_variant(ip.apply_variant(x, v), ip.invert_variant(v))
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-15)
    w = ip.invert_variant(v)
    np.testing.assert_allclose(ip.apply_variant(ip.apply_variant(x, w), v), x, rtol=0, atol=1e-15)
    u = data.draw(hnp.arrays(np.uint8, (2, 3, 3, c)))  # uint8: negated as 255 - x, exactly
    np.testing.assert_array_equal(ip.apply_variant(ip.apply_variant(u, v), w), u)
    np.testing.assert_array_equal(
        ip.apply_variant(u, v), np.round(ip.apply_variant(u / 255.0, v) * 255)
    )


def test_a_tiny_prior_learns_sign_and_channel_order(prior):
    held = natural_like(200, seed=1).astype(np.float64) / 255
    lp = np.stack(
        [ip.variant_log_probs(prior, ip.apply_variant(held, v)) for v in prior.variants]
    )  # (V, N, V)
    assert lp.shape == (12, 200, 12) and lp.dtype == np.float64
    np.testing.assert_allclose(np.log(np.exp(lp).sum(-1)), 0, atol=1e-5)
    truth = np.arange(12)[:, None]
    acc12 = np.mean(lp.argmax(-1) == truth)
    sign = np.mean((lp.argmax(-1) >= 6) == (truth >= 6))
    assert acc12 > 0.8, acc12  # chance: 1/12 (measured: 1.0 after 150 steps)
    assert sign > 0.95, sign  # chance: 1/2


def test_scoring_resizes_and_takes_uint8(prior):
    small = natural_like(4, seed=2)
    big = np.repeat(
        np.repeat(small, 2, axis=1), 2, axis=2
    )  # (4, 32, 32, 3): the area average is `small`
    np.testing.assert_allclose(
        ip.variant_log_probs(prior, big), ip.variant_log_probs(prior, small), atol=1e-5
    )
    odd = ip.variant_log_probs(prior, natural_like(3, size=20, seed=3), batch_size=2)
    assert odd.shape == (3, 12) and np.isfinite(odd).all()
    with pytest.raises(ValueError, match="channels|shape"):
        ip.variant_log_probs(prior, small[..., :1])


def test_save_load_round_trip(prior, tmp_path):
    x = natural_like(10, seed=4)
    path = ip.save_image_prior(prior, tmp_path / "prior")
    back = ip.load_image_prior(path)
    assert (
        back.config == prior.config and back.variants == prior.variants and back.input_size == SIZE
    )
    np.testing.assert_array_equal(ip.variant_log_probs(back, x), ip.variant_log_probs(prior, x))
    with pytest.raises(FileExistsError):
        ip.save_image_prior(prior, path)
    ip.save_image_prior(back, path, force=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an image prior"):
        ip.save_image_prior(prior, tmp_path / "other", force=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def _one_line_refusal(path, match):
    with pytest.raises(ip.ImagePriorError, match=match) as e:
        ip.load_image_prior(path)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


def test_a_damaged_prior_is_refused(prior, tmp_path):
    path = ip.save_image_prior(prior, tmp_path / "prior")
    blob = bytearray((path / ip.PARAMS_FILE).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (path / ip.PARAMS_FILE).write_bytes(bytes(blob))
    _one_line_refusal(path, "SHA-256 mismatch")
    (path / ip.PARAMS_FILE).write_bytes(b"not msgpack")
    doc = json.loads((path / ip.CONFIG_FILE).read_text())
    doc["params_sha256"] = hashlib.sha256(b"not msgpack").hexdigest()
    (path / ip.CONFIG_FILE).write_text(json.dumps(doc))
    _one_line_refusal(path, "do not fit")
    (path / ip.CONFIG_FILE).write_text("{broken")
    _one_line_refusal(path, "JSON")
    (path / ip.CONFIG_FILE).write_text(json.dumps({**doc, "format": "something-else"}))
    _one_line_refusal(path, "not an image prior")
    _one_line_refusal(tmp_path / "missing", "no config.json")


def test_the_cache_trains_once(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVMIXER_JAX_CACHE", str(tmp_path / "cache"))
    calls = []
    real = ip.train_image_prior
    monkeypatch.setattr(
        prior_cache, "train_image_prior", lambda *a, **k: calls.append(k) or real(*a, **k)
    )
    images = natural_like(512, seed=5)  # the fixture's shapes: its compiled step is reused
    kw = dict(steps=5, **FAST)
    first = ip.cached_image_prior(images, **kw)
    t = time.perf_counter()
    second = ip.cached_image_prior(images, **kw)
    elapsed = time.perf_counter() - t
    assert len(calls) == 1 and elapsed < 1.0, elapsed
    np.testing.assert_array_equal(
        ip.variant_log_probs(second, images), ip.variant_log_probs(first, images)
    )
    ip.cached_image_prior(images, **{**kw, "steps": 6})  # other settings: another entry
    changed = images.copy()
    changed[0, 0, 0, 0] ^= 1
    ip.cached_image_prior(changed, **kw)  # other images: another entry
    assert len(calls) == 3
    for entry in (
        tmp_path / "cache" / "image-prior"
    ).iterdir():  # a damaged entry is retrained, not trusted
        (entry / ip.PARAMS_FILE).write_bytes(b"damaged")
    again = ip.cached_image_prior(images, **kw)
    assert len(calls) == 4
    np.testing.assert_array_equal(
        ip.variant_log_probs(again, images), ip.variant_log_probs(first, images)
    )


@settings(max_examples=60, deadline=None)
@given(a=st.sampled_from(ip.COLOUR_VARIANTS), b=st.sampled_from(ip.COLOUR_VARIANTS), data=st.data())
def test_compose_is_applying_one_then_the_other(a, b, data):
    x = data.draw(hnp.arrays(np.float64, (2, 3, 3, 3), elements=st.floats(0, 1)))
    ab = ip.compose_variants(a, b)
    np.testing.assert_allclose(
        ip.apply_variant(ip.apply_variant(x, a), b), ip.apply_variant(x, ab), atol=1e-15
    )
    assert ip.compose_variants(a, ip.invert_variant(a)) == ip.COLOUR_VARIANTS[0]


def test_group_scores_follow_the_variant_and_ignore_the_mirror(prior):
    x = natural_like(6, seed=5).astype(np.float64) / 255
    base = ip.group_log_probs(prior, x)
    assert base.shape == (6, 12)
    np.testing.assert_allclose(np.exp(base).sum(-1), 1, atol=1e-9)
    np.testing.assert_allclose(ip.group_log_probs(prior, x[:, :, ::-1]), base, rtol=1e-6, atol=1e-4)
    index = {tuple(v): i for i, v in enumerate(prior.variants)}
    for g in prior.variants[1:]:
        # x is natural under v exactly when apply(x, g) is natural under compose(v, g)
        moved = ip.group_log_probs(prior, ip.apply_variant(x, g))
        cols = [index[ip.compose_variants(v, g)] for v in prior.variants]
        np.testing.assert_allclose(
            moved[:, cols], base, rtol=1e-6, atol=1e-4
        )  # float32 net: 1 - (1 - x) is not x
    single = ip.group_log_probs(prior, x, mirror=False)
    assert not np.allclose(single, base, atol=1e-3)  # the mirror views do count


def test_group_scores_are_at_least_as_accurate(prior):
    held = natural_like(120, seed=6).astype(np.float64) / 255
    truth = np.arange(12)[:, None]
    plain = np.stack(
        [ip.variant_log_probs(prior, ip.apply_variant(held, v)) for v in prior.variants]
    )
    group = np.stack([ip.group_log_probs(prior, ip.apply_variant(held, v)) for v in prior.variants])
    # the group view set is the same for every true variant, so its accuracy is too
    assert np.ptp([np.mean(group[t].argmax(-1) == t) for t in range(12)]) == 0
    assert np.mean(group.argmax(-1) == truth) >= np.mean(plain.argmax(-1) == truth) - 0.02


@pytest.mark.parametrize("model_says", ["negative", "key"])
def test_images_contradicting_the_models_colour_withhold_the_claim(prior, monkeypatch, model_says):
    """With --model, the kernel attack decides the colour and sign; when the encrypted images'
    prior prefers another variant by CONTRADICTION_MARGIN the key is not claimed."""
    from convmixer_jax.attacks import ciphertext_only as co
    from convmixer_jax.attacks import from_model
    from convmixer_jax.attacks.from_weights import ModelRecovery
    from convmixer_jax.scheme.images import encrypt_images_reference
    from convmixer_jax.scheme.keys import generate_key

    key = generate_key(4, 3, seed=21)
    told = from_model.negated_key(key) if model_says == "negative" else key
    monkeypatch.setattr(
        from_model,
        "recover_key_from_encrypted_model",
        lambda *a, **k: ModelRecovery(told.perm, told.flip, np.ones(48), told, candidates=(told,)),
    )
    template = co.block_template(natural_like(200, seed=7), 4)
    enc = encrypt_images_reference(natural_like(6, seed=8), key)
    res = co.recover_key_ciphertext_only(
        enc,
        4,
        template,
        prior=prior,
        model=("config", "variables"),
        public_images=natural_like(4, seed=9),
    )
    assert res.method == "ciphertext+model" and res.colour_log_probs.shape == (12,)
    if model_says == "negative":
        assert (
            not res.determined
            and "contradicts" in res.reason
            and res.colour_margin <= -co.CONTRADICTION_MARGIN
        )
        assert np.array_equal(
            res.best_guess.flip, told.flip
        )  # the model's key, not silently replaced
    else:
        assert "contradicts" not in res.reason and res.colour_margin == np.inf
        assert (
            int(np.argmax(res.colour_log_probs)) == 0
        )  # the images agree with the model's variant
