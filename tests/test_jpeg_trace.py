"""The JPEG trace (attacks/jpeg_trace.py): real JPEGs written and decoded by Pillow, of
smooth random fields (natural-like images, tests/attack_helpers.py), against never-compressed
ones."""

from __future__ import annotations

import io

import numpy as np
import pytest
from attack_helpers import smooth_fields
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from convmixer_jax.attacks.image_prior import COLOUR_VARIANTS, apply_variant, colour_variants
from convmixer_jax.attacks.jpeg_trace import (
    NO_TRACE_PRIOR,
    ijg_luma_table,
    jpeg_log_evidence,
    jpeg_quality,
    luma_blocks,
)


def jpeg_round_trip(images: np.ndarray, quality: int, subsampling: int = 2) -> np.ndarray:
    """Each image written as a JPEG by Pillow (4:2:0 by default) and decoded again."""
    out = []
    for x in images:
        buf = io.BytesIO()
        Image.fromarray(x.squeeze(-1) if x.shape[-1] == 1 else x).save(
            buf, "JPEG", quality=int(quality), subsampling=subsampling
        )
        y = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
        out.append(y[..., None] if y.ndim == 2 else y)
    return np.stack(out)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 100))
def test_tables_are_the_ones_pillow_writes(quality):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "JPEG", quality=quality)
    written = np.array(Image.open(io.BytesIO(buf.getvalue())).quantization[0], np.float64).reshape(
        8, 8
    )
    assert np.array_equal(ijg_luma_table(quality), written)


def test_luma_blocks_are_jpegs_coefficients():
    # a constant block of value v has DC 8 (v - 128) and no AC; floats in [0, 1] round to
    # the same bytes
    x = np.full((1, 16, 8, 3), 200, np.uint8)
    c = luma_blocks(x)
    assert c.shape == (2, 64)
    np.testing.assert_allclose(c[:, 0], 8 * (200 - 128), atol=1e-9)
    np.testing.assert_allclose(c[:, 1:], 0, atol=1e-9)
    np.testing.assert_allclose(luma_blocks(x / 255.0), c, atol=1e-9)
    with pytest.raises(ValueError, match="1 or 3"):
        luma_blocks(np.zeros((1, 8, 8, 2), np.uint8))


@settings(max_examples=12, deadline=None)
@given(st.integers(20, 90), st.integers(0, 11), st.integers(0, 2**31 - 1), st.sampled_from([0, 2]))
def test_the_channel_order_that_undoes_a_variant_decodes_as_a_jpeg(quality, v, seed, subsampling):
    jpeg = jpeg_round_trip(smooth_fields(2, 32, 3, seed=seed), quality, subsampling)
    variant = COLOUR_VARIANTS[v]
    ev = jpeg_log_evidence(apply_variant(jpeg, variant), COLOUR_VARIANTS)
    orders = [o for _, o in COLOUR_VARIANTS]
    best = {}  # per channel order, the better of its two signs
    for e, o in zip(ev, orders, strict=True):
        best[o] = max(best.get(o, -np.inf), e)
    ranked = sorted(best, key=lambda o: -best[o])
    assert ranked[0] == variant[1]
    assert best[ranked[0]] - best[ranked[1]] > 20
    # neighbouring qualities' tables differ in a few high-frequency steps that smooth images
    # leave at 0
    assert abs(jpeg_quality(jpeg) - quality) <= 2


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 7))
def test_no_trace_leaves_every_variant_alike(seed, shift):
    # never compressed, and a JPEG cropped off its 8 x 8 grid: the same evidence for every
    # variant, about log 1/2 (the quality-100 table of ones adds its 1/200 in every case)
    plain = smooth_fields(2, 32, 3, seed=seed)
    shifted = jpeg_round_trip(smooth_fields(2, 40, 3, seed=seed), 60)[
        :, shift : shift + 32, shift : shift + 32
    ]
    for x in (plain, shifted):
        ev = jpeg_log_evidence(x, COLOUR_VARIANTS)
        assert np.ptp(ev) < 1e-3 and abs(ev.max() - np.log(NO_TRACE_PRIOR)) < 0.02
        assert jpeg_quality(x) is None


def test_grey_jpegs_and_other_channel_counts():
    grey = jpeg_round_trip(smooth_fields(2, 32, 1, seed=5), 50)
    ev = jpeg_log_evidence(grey, colour_variants(1))
    assert ev.shape == (2,) and ev.min() > 100  # negation keeps every AC coefficient on the lattice
    assert jpeg_quality(grey) == 50
    np.testing.assert_array_equal(
        jpeg_log_evidence(np.zeros((1, 32, 32, 4), np.uint8), colour_variants(4)), np.zeros(2)
    )
    np.testing.assert_array_equal(
        jpeg_log_evidence(np.zeros((1, 4, 4, 3), np.uint8), COLOUR_VARIANTS), np.zeros(12)
    )


def test_ciphertext_only_attack_takes_the_channel_order_from_the_trace():
    # no colour prior: without the trace the order is left as the layout search found it;
    # with it the key is right up to the global sign
    from convmixer_jax.attacks.ciphertext_only import (
        block_template,
        colour_key,
        recover_key_ciphertext_only,
    )
    from convmixer_jax.scheme.images import encrypt_images_reference
    from convmixer_jax.scheme.keys import generate_key

    template = block_template(smooth_fields(80, 24, 3, seed=200), 2)
    images = jpeg_round_trip(smooth_fields(4, 24, 3, seed=3), 70)
    wrong_without = 0
    for seed in range(3):
        key = generate_key(2, 3, seed=[21, seed])
        enc = encrypt_images_reference(images, key)
        res = recover_key_ciphertext_only(enc, 2, template, starts=8)
        same = [
            np.array_equal(k.perm, key.perm) and np.array_equal(k.flip, key.flip)
            for k in (res.best_guess, colour_key(res.best_guess, (True, (0, 1, 2))))
        ]
        assert any(same) and "JPEG trace" in res.notes and res.jpeg_log_evidence.shape == (12,)
        off = recover_key_ciphertext_only(enc, 2, template, starts=8, jpeg_trace=False)
        assert off.jpeg_log_evidence.size == 0 and "JPEG" not in off.notes
        wrong_without += not any(
            np.array_equal(k.perm, key.perm) and np.array_equal(k.flip, key.flip)
            for k in (off.best_guess, colour_key(off.best_guess, (True, (0, 1, 2))))
        )
    assert wrong_without >= 1  # these keys' channel orders are not the search's own


def test_cli_reports_the_trace_and_turns_it_off(tmp_path, capsys):
    import json

    from cli_helpers import run

    from convmixer_jax.scheme.images import encrypt_images_reference
    from convmixer_jax.scheme.keys import generate_key

    np.save(tmp_path / "public.npy", smooth_fields(80, 24, 3, seed=200))
    key = generate_key(2, 3, seed=[21, 0])
    np.save(
        tmp_path / "enc.npy",
        encrypt_images_reference(jpeg_round_trip(smooth_fields(4, 24, 3, seed=3), 70), key),
    )
    common = [
        "recover-key",
        "--encrypted",
        str(tmp_path / "enc.npy"),
        "--block-size",
        "2",
        "--public",
        str(tmp_path / "public.npy"),
        "--best-guess",
    ]
    seen = {}
    for flag in ([], ["--no-jpeg-trace"]):
        out_key = tmp_path / f"key{len(flag)}.json"
        rc, out, err = run(capsys, *common, *flag, "--out", str(out_key))
        assert rc == 0 and out_key.exists(), err
        summary = json.loads([line for line in err.splitlines() if line.startswith("{")][-1])
        seen[bool(flag)] = summary["jpeg_trace"]
    assert seen == {False: True, True: False}
    np.save(tmp_path / "p.npy", smooth_fields(1, 8, 3, seed=0))
    rc, out, err = run(
        capsys,
        "recover-key",
        "--plain",
        str(tmp_path / "p.npy"),
        "--encrypted",
        str(tmp_path / "p.npy"),
        "--block-size",
        "2",
        "--no-jpeg-trace",
        "--out",
        str(tmp_path / "k.json"),
    )
    assert rc != 0 and "--no-jpeg-trace" in err and not (tmp_path / "k.json").exists()
