"""recover-key on keys with block scrambling: from an encrypted ViT (its position embedding
and kernel, the encrypted images as its queries) and from encrypted images alone; the key
is written only when the evidence determines it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from cli_helpers import ok, run

from convmixer_jax.model.config import ViTConfig
from convmixer_jax.scheme.images import encrypt_images_reference
from convmixer_jax.scheme.keys import fingerprint, generate_key, load_key
from convmixer_jax.scheme.params import encrypt_params

SIZE, P = 16, 4  # a 4 x 4 grid of 4 x 4 RGB blocks
GRID = (SIZE // P, SIZE // P)
DIM = 64
# ViT-64/1 whose block does nothing (its output projections are zero) and whose head reads
# one feature: the patch-embedding response to light from above and a little from the left,
# strongest in red (LIGHT). Its confidence is highest on upright images in their own
# colours, the orientation and colour evidence the attack asks the encrypted model for.
VIT = ViTConfig(
    dim=DIM,
    depth=1,
    num_heads=2,
    mlp_ratio=1.0,
    patch_size=P,
    num_classes=3,
    image_size=SIZE,
    channels=3,
    global_pool="avg",
)
LIGHT = np.array([1.0, 0.6, 0.25])


def lit_images(n: int, seed: int) -> np.ndarray:
    """(n, SIZE, SIZE, 3) uint8: smooth texture under light from above (and a little from
    the left), strongest in the red channel."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    tex = sum(
        w * gaussian_filter(rng.normal(size=(n, SIZE, SIZE, c)), (0, 2, 2, 0), mode="wrap")
        for w, c in ((1.0, 1), (0.3, 3))
    )
    light = 0.35 * (1 - yy) + 0.15 * (1 - xx)
    x = 0.3 + rng.uniform(-0.05, 0.05, (n, 1, 1, 1)) + LIGHT * light[..., None]
    x = x + 0.15 * tex / tex.std()
    return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)


def sincos_rows(g: int, dim: int) -> np.ndarray:
    """(g*g, dim) position rows smooth over a g x g grid (2-D sin-cos)."""
    r, c = np.divmod(np.arange(g * g), g)
    w = np.pi / g * np.linspace(0.3, 2.0, dim // 4)
    return np.concatenate([f(x[:, None] * w) for x in (r, c) for f in (np.sin, np.cos)], 1)


def stem_kernel(seed: int) -> np.ndarray:
    """(P, P, 3, DIM) with a trained stem's structure (each output a smooth field over the
    block shared by the colour channels, plus a smaller one per channel), its first output
    the light detector, and every output paired with its negative (so that the pooled
    features' mean, which LayerNorm subtracts, does not depend on the image)."""
    rng = np.random.default_rng(seed)
    half = DIM // 2
    ij = np.stack(np.divmod(np.arange(P * P), P), 1)
    dist2 = ((ij[:, None] - ij[None]) ** 2).sum(-1)
    chol = np.linalg.cholesky(np.exp(-dist2 / (2 * 0.8**2)) + 1e-9 * np.eye(P * P))
    shared = chol @ rng.normal(size=(P * P, half))
    own = np.einsum("ab,bcd->acd", chol, rng.normal(size=(P * P, 3, half)))
    k = np.array([1.0, 1.25, 0.7])[None, :, None] * shared[:, None] + 0.5 * own
    i, j = ij[:, 0], ij[:, 1]
    light = (0.7 * ((P - 1) / 2 - i) + 0.3 * ((P - 1) / 2 - j))[:, None] * LIGHT
    k[:, :, 0] = light / np.abs(light).max() * np.abs(k).max()
    return np.concatenate([k, -k], -1).reshape(P, P, 3, DIM)


def vit_variables(pos_rows: np.ndarray) -> dict:
    import jax

    from convmixer_jax.model.build import init_variables_abstract

    shapes = jax.eval_shape(lambda: init_variables_abstract(VIT))
    v = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
    p = v["params"]
    bias = np.zeros(DIM)
    bias[1], bias[2] = 100.0, -100.0  # LayerNorm's spread, so that feature 0 passes ~linearly
    p["patch_embed"] = {"kernel": stem_kernel(0), "bias": bias}
    p["pos_embed"] = np.concatenate([np.zeros((1, DIM)), pos_rows])[None]
    for name in ("norm1", "norm2"):
        p["blocks_0"][name]["scale"] = np.ones(DIM)
    p["fc_norm"]["scale"] = np.eye(DIM)[0]
    p["head"]["kernel"] = np.zeros((DIM, 3))
    p["head"]["kernel"][0, 0] = 30.0
    return jax.tree.map(lambda a: np.asarray(a, np.float32), v)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The secret key (seed 5), encrypted ViT directories (smooth and random position
    embeddings, a kernel without layout, and one encrypted with the pixel key alone), public
    images, one encrypted query, one encrypted noise image, and four larger ones under
    another key, as files."""
    from convmixer_jax.files.model_dir import save_model
    from convmixer_jax.scheme.keys import Key

    root = tmp_path_factory.mktemp("vit-recover")
    key = generate_key(P, 3, seed=5, grid=GRID)
    smooth = vit_variables(sincos_rows(GRID[0], DIM))
    drawn = vit_variables(np.random.default_rng(6).normal(size=(GRID[0] * GRID[1], DIM)))
    save_model(root / "enc", VIT, encrypt_params(smooth, key), encryption=key)
    save_model(root / "enc-random-pos", VIT, encrypt_params(drawn, key), encryption=key)
    # a kernel still close to its random initialization but for the light detector (as a
    # ViT's patch embedding is after a few epochs): it shows no layout. The detector also
    # responds to red over blue, so that, as for a trained model, an image upside down and
    # negated does not make the model as sure (a linear light detector alone cannot tell)
    fresh = vit_variables(sincos_rows(GRID[0], DIM))
    kernel = np.array(fresh["params"]["patch_embed"]["kernel"])
    drawn_half = np.random.default_rng(8).uniform(-0.3, 0.3, (P, P, 3, DIM // 2 - 1))
    kernel[..., 1 : DIM // 2], kernel[..., DIM // 2 + 1 :] = drawn_half, -drawn_half
    red_over_blue = 0.1 * np.abs(kernel[..., 0]).max() * np.array([1.0, 0.0, -1.0])
    kernel[..., 0] += red_over_blue
    kernel[..., DIM // 2] -= red_over_blue
    fresh["params"]["patch_embed"]["kernel"] = kernel.astype(np.float32)
    save_model(root / "enc-fresh-kernel", VIT, encrypt_params(fresh, key), encryption=key)
    pixel_only = Key(key.perm, key.flip, P, 3)
    save_model(root / "enc-pixel", VIT, encrypt_params(smooth, pixel_only), encryption=pixel_only)
    np.save(root / "public.npy", lit_images(32, 1))
    np.save(root / "query.npy", encrypt_images_reference(lit_images(1, 2), key))
    noise = np.random.default_rng(3).integers(0, 256, (1, SIZE, SIZE, 3), np.uint8)
    np.save(root / "noise.npy", encrypt_images_reference(noise, key))
    # for the attack without the model: enough blocks for the flips' evidence to be weighed
    wide = generate_key(P, 3, seed=7, grid=(8, 8))
    noise = np.random.default_rng(4).integers(0, 256, (4, 2 * SIZE, 2 * SIZE, 3), np.uint8)
    np.save(root / "noise-32.npy", encrypt_images_reference(noise, wide))
    return SimpleNamespace(root=root, key=key)


def _recover(capsys, case, out, *extra):
    return run(
        capsys,
        "recover-key",
        "--block-size",
        P,
        "--public",
        case.root / "public.npy",
        "--out",
        out,
        *extra,
    )


def test_the_key_from_a_smooth_encrypted_vit_and_one_query(case, tmp_path, capsys):
    out = tmp_path / "key.json"
    rc, stdout, err = _recover(
        capsys, case, out, "--encrypted", case.root / "query.npy", "--model", case.root / "enc"
    )
    assert rc == 0, err
    # the model breaks the mirror symmetry (light partly from the left), so the attack claims
    # the key itself, not only up to its mirror twin
    assert '"determined": true' in err and '"grid": [4, 4]' in err
    assert stdout.strip() == fingerprint(case.key)
    got = load_key(out)
    assert got.grid == GRID and fingerprint(got) == fingerprint(case.key)
    np.testing.assert_array_equal(got.block_perm, case.key.block_perm)
    # the grid given explicitly is the same attack
    again = tmp_path / "again.json"
    stdout = ok(
        capsys,
        "recover-key",
        "--encrypted",
        case.root / "query.npy",
        "--model",
        case.root / "enc",
        "--block-size",
        P,
        "--grid",
        4,
        4,
        "--public",
        case.root / "public.npy",
        "--quiet",
        "--out",
        again,
    )
    assert stdout.strip() == fingerprint(case.key)


def test_the_key_from_a_vit_whose_kernel_shows_no_layout_and_one_query(case, tmp_path, capsys):
    from convmixer_jax.attacks.block_key import KERNEL_STRUCTURE, kernel_structure
    from convmixer_jax.files.model_dir import load_model

    _, variables, _ = load_model(case.root / "enc-fresh-kernel")
    score, null = kernel_structure(variables["params"]["patch_embed"]["kernel"])
    assert score < null + KERNEL_STRUCTURE  # its candidates would be a random key's
    out = tmp_path / "key.json"
    rc, stdout, err = _recover(
        capsys,
        case,
        out,
        "--encrypted",
        case.root / "query.npy",
        "--model",
        case.root / "enc-fresh-kernel",
        "--quiet",
    )
    # the pixel key from the query's blocks (checked on the query put back together), the
    # block key from the position embedding and the query's edges
    assert rc == 0, err
    assert stdout.strip() == fingerprint(case.key) == fingerprint(load_key(out))


@pytest.mark.parametrize("best_guess", [False, True])
def test_noise_images_give_no_key_unless_a_best_guess_is_asked_of_the_model(
    case, tmp_path, capsys, best_guess
):
    extra = ("--best-guess",) if best_guess else ()
    # alone: their flips are not supported, so not even a best guess is written
    out = tmp_path / "alone.json"
    rc, _, err = _recover(
        capsys,
        case,
        out,
        "--encrypted",
        case.root / "noise-32.npy",
        "--block-scrambling",
        "--quiet",
        *extra,
    )
    assert rc == 1 and err.count("\n") == 1 and not out.exists()
    assert "cannot determine the key from 4 encrypted image(s)" in err
    assert "no flip is supported" in err
    assert "these do not look like encrypted natural images" in err
    # as the queries of the smooth model: their blocks do not go together as a jigsaw, so
    # the block key is not determined; the model's own evidence still makes a best guess,
    # written only when asked for
    out = tmp_path / "model.json"
    rc, stdout, err = _recover(
        capsys,
        case,
        out,
        "--encrypted",
        case.root / "noise.npy",
        "--model",
        case.root / "enc",
        *extra,
    )
    assert "block key: " in err and "searches end in it" in err
    if not best_guess:
        assert rc == 1 and not out.exists() and not stdout
        assert "cannot determine the key from 1 encrypted image(s)" in err.splitlines()[-1]
        return
    assert rc == 0 and "writing the most likely key as asked (--best-guess)" in err
    guess = load_key(out)
    assert guess.grid == GRID and stdout.strip() == fingerprint(guess)


@pytest.mark.parametrize("best_guess", [False, True])
def test_a_position_embedding_drawn_at_random_gives_no_key(case, tmp_path, capsys, best_guess):
    out = tmp_path / "key.json"
    extra = ("--best-guess", "--quiet") if best_guess else ("--quiet",)
    rc, stdout, err = _recover(
        capsys,
        case,
        out,
        "--encrypted",
        case.root / "query.npy",
        "--model",
        case.root / "enc-random-pos",
        *extra,
    )
    assert rc == 1 and err.count("\n") == 1 and not out.exists() and not stdout
    assert "cannot determine the key from 1 encrypted image(s): position embedding:" in err
    assert "the model's position embedding shows no grid" in err


def test_bad_block_scrambling_options_are_refused_in_one_line(case, tmp_path, capsys):
    out = tmp_path / "key.json"
    query = case.root / "query.npy"
    cases = [
        (("--encrypted", query, "--grid", 2, 8), "--grid 2 8 does not fit the encrypted images"),
        (
            ("--encrypted", query, "--block-scrambling", "--model", case.root / "enc-pixel"),
            "encrypted with a key without block scrambling",
        ),
        (
            ("--encrypted", query, "--model", case.root / "enc", "--no-jpeg-trace"),
            "--no-jpeg-trace has no use with --model",
        ),
    ]
    for argv, message in cases:
        rc, _, err = _recover(capsys, case, out, *argv)
        assert rc == 2 and err.count("\n") == 1 and message in err, err
        assert not out.exists()
    plain = ("recover-key", "--plain", query, "--encrypted", query, "--block-size", P)
    rc, _, err = run(capsys, *plain, "--block-scrambling", "--out", out)
    assert rc == 2 and "--block-scrambling is for the ciphertext-only attack" in err
    big = tmp_path / "big.npy"
    np.save(big, np.zeros((1, 2 * SIZE, 2 * SIZE, 3), np.uint8))
    rc, _, err = _recover(capsys, case, out, "--encrypted", big, "--model", case.root / "enc")
    assert rc == 2 and "key scrambles a 4 x 4 grid of blocks" in err and not out.exists()
