"""The provider's attacks on keys with block scrambling: the block permutation from a
position embedding (attacks/position_embedding.py), the jigsaw of scrambled queries
(attacks/jigsaw.py), the choice among symmetric candidates and the whole attacks
(attacks/block_key.py), and the report sections that run them."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convmixer_jax.attacks import block_key as bk
from convmixer_jax.attacks import jigsaw as jg
from convmixer_jax.attacks import position_embedding as pe
from convmixer_jax.attacks.kernel_algebra import dihedral_keys
from convmixer_jax.scheme.images import encrypt_images_reference
from convmixer_jax.scheme.keys import Key, generate_key, make_key
from convmixer_jax.scheme.params import encrypt_params


def sincos_rows(gh: int, gw: int, dim: int, noise: float, seed: int) -> np.ndarray:
    """(gh*gw, dim) rows smooth over the grid (2-D sin-cos of row and column) plus noise."""
    rng = np.random.default_rng(seed)
    r, c = np.divmod(np.arange(gh * gw), gw)
    w = np.pi / max(gh, gw) * np.linspace(0.3, 2.0, dim // 4)
    rows = np.concatenate([f(x[:, None] * w) for x in (r, c) for f in (np.sin, np.cos)], axis=1)
    return rows + noise * rows.std() * rng.standard_normal(rows.shape)


def smooth_images(n: int, height: int = 32, width: int = 32, seed: int = 0) -> np.ndarray:
    """(n, height, width, 3) uint8: a colour ramp in a random direction with two
    antialiased discs of other colours, brighter at the top than at the bottom."""
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
        img = 0.6 * img + 0.4 * (1 - yy / yy.max())[..., None]  # light from above
        out.append(img)
    return np.clip(np.rint(np.stack(out) * 255), 0, 255).astype(np.uint8)


def keys_equal(a, b) -> bool:
    return bk.same_scrambling_key(a, b)


# ----------------------------------------------------------------------------- symmetries


@pytest.mark.parametrize("grid", [(8, 8), (4, 6)])
def test_global_symmetric_keys_decrypt_to_rotations_and_mirrors(grid):
    key = generate_key(4, 3, seed=1, grid=grid)
    x = np.random.default_rng(0).integers(0, 256, (2, grid[0] * 4, grid[1] * 4, 3), np.uint8)
    c = encrypt_images_reference(x, key)
    views = [x, x[:, ::-1, ::-1], x[:, :, ::-1], x[:, ::-1]]
    if grid[0] == grid[1]:
        t = x.transpose(0, 2, 1, 3)
        views += [np.rot90(x, 1, (1, 2)), np.rot90(x, 3, (1, 2)), t, t[:, ::-1, ::-1]]
    keys = bk.global_symmetric_keys(key)
    assert len(keys) == len(views) and keys_equal(keys[0], key)
    for k in keys:  # encrypt(h(x), K_h) == encrypt(x, K) for one view h each
        hits = [v for v in views if np.array_equal(encrypt_images_reference(v, k), c)]
        assert len(hits) == 1
    twin = bk.mirrored_key(key)
    assert np.array_equal(encrypt_images_reference(x[:, :, ::-1], twin), c)
    assert keys_equal(bk.mirrored_key(twin), key) and not keys_equal(twin, key)
    with pytest.raises(ValueError, match="does not scramble"):
        bk.mirrored_key(Key(key.perm, key.flip, 4, 3))


# ----------------------------------------------------------------------------- position embedding


@pytest.mark.parametrize("grid", [(4, 4), (6, 6), (4, 6)])
def test_block_perm_from_a_smooth_position_embedding(grid):
    n = grid[0] * grid[1]
    rows = sincos_rows(*grid, dim=32, noise=0.1, seed=n)
    block_perm = np.random.default_rng(n).permutation(n)
    rec = pe.block_perm_from_pos_embed(rows[block_perm], grid)  # row b is plain row bp[b]
    assert rec.determined, rec.reason
    expected = {tuple(g[block_perm]) for g in pe.grid_symmetries(grid)}
    assert {tuple(c) for c in rec.candidates} == expected
    assert len(rec.candidates) == (8 if grid[0] == grid[1] else 4)
    assert np.array_equal(rec.block_perm, rec.candidates[0])
    assert rec.margin >= pe.POSITION_MARGIN and rec.fit > rec.null_fits.max()
    assert rec.structured and rec.fit >= rec.null_fits.max() + pe.POSITION_STRUCTURE


@settings(max_examples=10, deadline=None)
@given(st.sampled_from([(4, 4), (4, 6)]), st.integers(0, 2**31 - 1))
def test_random_position_rows_are_not_determined(grid, seed):
    rows = np.random.default_rng(seed).standard_normal((grid[0] * grid[1], 16))
    rec = pe.block_perm_from_pos_embed(rows, grid, seed=seed % 1000)
    assert not rec.determined and rec.reason


def test_block_perm_read_off_an_encrypted_vit_with_a_class_token():
    g, dim = 4, 16
    rng = np.random.default_rng(3)
    pos = np.concatenate([rng.standard_normal((1, dim)), sincos_rows(g, g, dim, 0.05, 3)])
    params = {
        "patch_embed": {"kernel": rng.standard_normal((4, 4, 3, dim)), "bias": np.zeros(dim)},
        "pos_embed": pos[None].astype(np.float32),
        "cls_token": np.zeros((1, 1, dim), np.float32),
    }
    key = generate_key(4, 3, seed=5, grid=(g, g))
    rows, grid = pe.patch_position_rows({"params": encrypt_params(params, key)})
    assert grid == (g, g) and rows.shape == (g * g, dim)
    rec = pe.block_perm_from_pos_embed(rows, grid)
    assert rec.determined
    assert any(np.array_equal(c, key.block_perm) for c in rec.candidates)
    with pytest.raises(ValueError, match="pos_embed"):
        pe.patch_position_rows({"stem": params["patch_embed"]})


# ----------------------------------------------------------------------------- the jigsaw


@pytest.mark.parametrize("size", [(32, 32), (16, 24)])
def test_jigsaw_puts_smooth_queries_together_exactly(size):
    grid = (size[0] // 4, size[1] // 4)
    key = generate_key(4, 3, seed=7, grid=grid)
    enc = encrypt_images_reference(smooth_images(6, *size, seed=2), key)
    sol = jg.solve_jigsaw(jg.pixel_decrypted_blocks(enc, key), grid, seeds=16)
    assert sol.determined, sol.reason
    assert np.array_equal(sol.block_perm, key.block_perm)
    assert bk.blocks_placed_right(sol.block_perm, key.block_perm) == 1.0
    assert sol.margin >= jg.JIGSAW_MARGIN and sol.hits >= jg.JIGSAW_HITS
    h, v = jg.edge_evidence(jg.pixel_decrypted_blocks(enc, key))
    assert np.isclose(jg.placement_evidence(h, v, sol.block_perm, grid), sol.evidence)
    back = jg.unscrambled(enc, sol.block_perm, 4)
    assert np.array_equal(
        back,
        encrypt_images_reference(smooth_images(6, *size, seed=2), Key(key.perm, key.flip, 4, 3)),
    )


def test_jigsaw_of_noise_is_not_determined_on_the_full_grid():
    key = generate_key(4, 3, seed=8, grid=(8, 8))
    noise = np.random.default_rng(8).integers(0, 256, (5, 32, 32, 3), np.uint8)
    enc = encrypt_images_reference(noise, key)
    sol = jg.solve_jigsaw(jg.pixel_decrypted_blocks(enc, key), (8, 8), seeds=16)
    assert not sol.determined and sol.reason


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 20), st.integers(0, 2**31 - 1))
def test_jigsaw_of_noise_is_never_determined(n, seed):
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n, 16, 4, 4, 3), np.uint8)
    sol = jg.solve_jigsaw(blocks, (4, 4), seeds=8, seed=seed % 100)
    assert not sol.determined


def test_noise_queries_give_no_key_through_the_whole_ciphertext_attack():
    from convmixer_jax.attacks.ciphertext_only import block_template

    public = smooth_images(24, seed=9)
    key = generate_key(4, 3, seed=9, grid=(8, 8))
    noise = np.random.default_rng(9).integers(0, 256, (4, 32, 32, 3), np.uint8)
    rec = bk.recover_scrambled_key_ciphertext_only(
        encrypt_images_reference(noise, key), 4, block_template(public, 4), public_images=public
    )
    assert not rec.determined and rec.key is None and not rec.up_to_mirror
    assert "no flip is supported" in rec.reason and not rec.structured


def _slid(placement: np.ndarray, rows, cols, shift: int, axis: int) -> np.ndarray:
    """``placement`` (gh, gw) of blocks with the rectangle rows x cols rolled by ``shift``
    cells along ``axis``, as a block permutation (block b at position ``bp[b]``)."""
    g = placement.copy()
    g[rows, cols] = np.roll(g[rows, cols], shift, axis)
    return np.argsort(g.ravel())


def test_jigsaw_slides_a_piece_that_exchanges_cannot_move_back():
    from convmixer_jax.attacks.layout_search import local_search

    grid = (6, 6)
    key = generate_key(4, 3, seed=21, grid=grid)
    blocks = jg.pixel_decrypted_blocks(encrypt_images_reference(smooth_images(4, 24, 24), key), key)
    truth = np.argsort(np.asarray(key.block_perm)).reshape(grid)  # the block at each position
    starts = [
        _slid(truth, slice(2, 6), slice(1, 4), 1, 1),  # four rows of a piece, one cell right
        _slid(truth, slice(0, 4), slice(4, 6), 2, 0),  # two columns, two cells down
    ]
    h, v = jg.edge_evidence(blocks)
    a, b = jg.slot_adjacency(grid), np.stack([h, v])
    for bp in starts:  # a local maximum of exchanges of two blocks
        assert not np.array_equal(local_search(a, b, np.argsort(bp))[0], truth.ravel())
    sol = jg.solve_jigsaw(blocks, grid, seeds=0, starts=starts)
    assert np.array_equal(sol.block_perm, key.block_perm)
    assert sol.determined and (sol.hits, sol.seeds) == (2, 2) and sol.margin >= jg.JIGSAW_MARGIN


def test_jigsaw_prior_places_blocks_whose_edges_say_nothing():
    grid = (4, 4)
    key = generate_key(4, 3, seed=22, grid=grid)
    flat = np.full((2, 16, 16, 3), 128, np.uint8)  # every edge joins every other alike
    blocks = jg.pixel_decrypted_blocks(encrypt_images_reference(flat, key), key)
    pos = pe.block_perm_from_pos_embed(sincos_rows(4, 4, 32, 0.1, 22)[key.block_perm], grid)
    assert pos.determined and pe.position_evidence(pos)[0].shape == (1, 16, 16)
    sol = jg.solve_jigsaw(blocks, grid, seeds=4, prior=pe.position_evidence(pos))
    assert any(np.array_equal(sol.block_perm, c) for c in pos.candidates)
    assert any(np.array_equal(key.block_perm, c) for c in pos.candidates)
    alone = jg.solve_jigsaw(blocks, grid, seeds=4)
    assert not alone.determined and alone.margin <= 0
    with pytest.raises(ValueError, match="prior terms must be"):
        jg.solve_jigsaw(blocks, grid, prior=(np.zeros((1, 4, 4)), np.zeros((1, 4, 4))))


# ----------------------------------------------------------------------------- the pixel key


def smooth_kernel(dim: int, seed: int) -> np.ndarray:
    """(4, 4, 3, dim) with a trained stem's structure: each output a smooth field over the
    block shared by the channels, plus a smaller one per channel."""
    rng = np.random.default_rng(seed)
    ij = np.stack(np.divmod(np.arange(16), 4), 1)
    chol = np.linalg.cholesky(
        np.exp(-((ij[:, None] - ij[None]) ** 2).sum(-1) / (2 * 0.8**2)) + 1e-9 * np.eye(16)
    )
    shared = chol @ rng.normal(size=(16, dim))
    own = np.einsum("ab,bcd->acd", chol, rng.normal(size=(16, 3, dim)))
    return (shared[:, None] + 0.5 * own).reshape(4, 4, 3, dim)


def test_kernel_structure_tells_a_trained_kernel_from_its_random_initialization():
    key = generate_key(4, 3, seed=23)
    plain = {"patch_embed": {"kernel": smooth_kernel(32, 23), "bias": np.zeros(32)}}
    score, null = bk.kernel_structure(encrypt_params(plain, key)["patch_embed"]["kernel"], seed=1)
    assert score >= null + bk.KERNEL_STRUCTURE
    drawn = np.random.default_rng(23).uniform(-0.14, 0.14, (4, 4, 3, 32))
    score, null = bk.kernel_structure(drawn, seed=1)
    assert score < null + bk.KERNEL_STRUCTURE


def test_queries_of_noise_give_no_pixel_key_candidates():
    from convmixer_jax.attacks.ciphertext_only import block_template

    key = generate_key(4, 3, seed=24, grid=(8, 8))
    template = block_template(smooth_images(24, seed=24), 4)
    noise = np.random.default_rng(24).integers(0, 256, (4, 32, 32, 3), np.uint8)
    cands, note = bk.pixel_keys_from_queries(encrypt_images_reference(noise, key), template)
    assert cands == [] and "support no flip" in note
    smooth = encrypt_images_reference(smooth_images(4, seed=25), key)
    cands, _ = bk.pixel_keys_from_queries(smooth, template)
    assert len(cands) == 96 and all(not k.scrambles for k in cands)


# ----------------------------------------------------------------------------- symmetries chosen


def _relative_candidates(key):
    """Every pixel-layout rotation/mirror of ``key`` with every symmetry of its grid: the
    candidates the kernel and the position embedding leave (colour aside)."""
    return [
        make_key(k.perm, k.flip, 4, 3, np.asarray(bp), key.grid)
        for bp in (g[np.asarray(key.block_perm)] for g in pe.grid_symmetries(key.grid))
        for k in dihedral_keys(Key(key.perm, key.flip, 4, 3))
    ]


def test_queries_edges_keep_only_the_rotations_of_the_whole_image():
    key = generate_key(4, 3, seed=11, grid=(8, 8))
    queries = encrypt_images_reference(smooth_images(2, seed=11), key)
    cands = _relative_candidates(key)
    assert len(cands) == 64
    choice = bk.choose_symmetry(cands, queries=queries)
    tied = {(*k.perm, *k.block_perm) for k in choice.ranked[:8]}
    whole = {(*k.perm, *k.block_perm) for k in bk.global_symmetric_keys(key)}
    assert tied == whole
    assert choice.edge_margin >= bk.EDGE_MARGIN
    assert not choice.determined and not choice.up_to_mirror  # nothing tells the 8 apart


def test_confidence_picks_the_key_up_to_its_mirror_twin():
    key = generate_key(4, 3, seed=12, grid=(8, 8))
    public = smooth_images(24, seed=12)
    from convmixer_jax.scheme.images import decrypt_images

    known = np.concatenate([public, public[:, :, ::-1]]).astype(np.float64)

    def confidence(images):
        # a stand-in for a model trained with horizontal flips on images like the public
        # ones: it sees the plain image and is as sure of it as it is close to one it knows,
        # mirrored or not
        x = np.asarray(decrypt_images(images, key), np.float64)
        d = np.abs(x[:, None] - known[None]).mean((2, 3, 4))
        return -d.min(1)

    cands = []
    for k in bk.global_symmetric_keys(key):  # and the negative of each
        cands += [k, make_key(k.perm, 1 - np.asarray(k.flip), 4, 3, k.block_perm, k.grid)]
    choice = bk.choose_symmetry(
        cands, public_images=public, confidence=confidence, confidence_start=8
    )
    assert keys_equal(choice.key, key) or keys_equal(choice.key, bk.mirrored_key(key))
    assert choice.up_to_mirror and not choice.determined
    assert "mirror twin" in choice.reason


def test_public_images_orient_the_decrypted_queries_up_to_the_mirror():
    key = generate_key(4, 3, seed=13, grid=(8, 8))
    queries = encrypt_images_reference(smooth_images(20, seed=13), key)
    choice = bk.choose_symmetry(
        bk.global_symmetric_keys(key), queries=queries, public_images=smooth_images(200, seed=14)
    )
    assert keys_equal(choice.key, key) or keys_equal(choice.key, bk.mirrored_key(key))
    assert choice.up_to_mirror and not choice.determined


def test_a_model_with_random_position_rows_gives_no_key():
    rng = np.random.default_rng(15)
    dim = 16
    params = {
        "patch_embed": {"kernel": rng.standard_normal((4, 4, 3, dim)), "bias": np.zeros(dim)},
        "pos_embed": rng.standard_normal((1, 16, dim)).astype(np.float32),
    }
    key = generate_key(4, 3, seed=15, grid=(4, 4))
    queries = encrypt_images_reference(smooth_images(2, 16, 16, seed=15), key)
    rec = bk.recover_scrambled_key_from_model(
        None, {"params": encrypt_params(params, key)}, queries=queries
    )
    assert not rec.determined and rec.key is None and not rec.up_to_mirror
    assert "position embedding" in rec.reason and not rec.structured


# ----------------------------------------------------------------------------- report sections


def test_report_sections_apply_to_vits_only_and_share_the_ciphertext_option():
    from convmixer_jax.attacks import ciphertext_report, vit_ciphertext_report, vit_model_report
    from convmixer_jax.attacks.protocol import merged_options, options_of
    from convmixer_jax.model.config import PRESETS

    for attack in (vit_model_report.ATTACK, vit_ciphertext_report.ATTACK):
        assert attack.skip_reason(PRESETS["vit_cifar"]) is None
        assert "ViT models only" in attack.skip_reason(PRESETS["paper"])
        assert options_of(attack.config_type)
    names = [
        s.name
        for s in merged_options(
            [ciphertext_report.CiphertextOnlyConfig, vit_ciphertext_report.ViTCiphertextConfig]
        )
    ]
    assert names.count("ciphertext_images") == 1


def test_key_measures_count_the_mirror_twin_and_wrong_claims():
    from convmixer_jax.attacks.vit_model_report import key_measures

    key = generate_key(4, 3, seed=16, grid=(4, 4))
    twin = bk.mirrored_key(key)
    m = key_measures(twin, key, determined=False, up_to_mirror=True)
    assert (m["exact"], m["exact_up_to_mirror"], m["claimed_wrong"]) == (False, True, False)
    m = key_measures(twin, key, determined=True, up_to_mirror=True)
    assert m["claimed_wrong"] and m["pixel_positions_right"] < 1
    m = key_measures(key, key, determined=True, up_to_mirror=True)
    assert m["exact"] and m["exact_pixel_key"] and m["exact_block_key"] and not m["claimed_wrong"]
    assert m["blocks_placed_right"] == 1.0
