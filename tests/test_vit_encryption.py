"""ViT model encryption (method.md, "Extension: block scrambling and Vision Transformers"):
the patch embedding is encrypted as the ConvMixer's stem, and a key with block scrambling
also permutes the patch rows of the position embedding, so the encrypted ViT on encrypted
images computes the plain ViT on plain images. Checked against images encrypted here, block
by block, from method.md; with the parameter transforms (inverse, rekey, vmap), the refusals
(a ConvMixer cannot absorb block scrambling; a key bound to another grid), the encryption
record of a model directory, and the model commands on a ViT."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convmixer_jax.files.model_dir import (
    ModelDirError,
    abstract_variables,
    check_key_fits_model,
    encrypt_model_dir,
    encryption_record,
    load_model,
    load_model_meta,
    model_digest,
    save_model,
)
from convmixer_jax.model.config import IMAGENET_MEAN, IMAGENET_STD, ConvMixerConfig, ViTConfig
from convmixer_jax.model.vit import ViT
from convmixer_jax.scheme.keys import Key, load_key
from convmixer_jax.scheme.params import (
    KeyModelMismatch,
    decrypt_params,
    encrypt_params,
    rekey_params,
)
from tests.cli_helpers import ok, run


def vit(p, c, g, **kw) -> ViTConfig:
    return ViTConfig(
        dim=8, depth=1, num_heads=2, mlp_ratio=2.0, patch_size=p, num_classes=4,
        image_size=p * g, channels=c, **kw,
    )


# Three architectures (each one is compiled once): even and odd pb (12, 9, 27), grids of
# 4 x 4, 3 x 3 and 2 x 2 blocks (8, 9 and 6 px), one and three channels, a class token with
# its own position row, one without (no_embed_class), no class token; token and mean
# pooling; the paper's normalization and ImageNet-like ones.
CONFIGS = [
    vit(2, 3, 4),  # pb 12, class row, token pool, paper normalization
    vit(3, 1, 3, class_token=False, global_pool="avg", mean=(0.3,), std=(0.2,)),  # pb 9
    vit(3, 3, 2, no_embed_class=True, global_pool="avg", mean=IMAGENET_MEAN, std=IMAGENET_STD),
]


def paper_norm(cfg) -> bool:
    return cfg.mean is None


def norm(cfg) -> dict:
    return dict(mean=cfg.mean, std=cfg.std)


@functools.lru_cache(maxsize=None)
def jitted_apply(cfg: ViTConfig):
    return jax.jit(ViT(cfg).apply)


@functools.lru_cache(maxsize=None)
def param_shapes(cfg: ViTConfig):
    x = np.zeros((1, cfg.image_size, cfg.image_size, cfg.channels), np.float32)
    return jax.eval_shape(ViT(cfg).init, jax.random.key(0), x)


def random_variables(cfg: ViTConfig, seed: int) -> dict:
    """{'params'} of ``cfg`` with random values, large enough that every parameter (the
    position embedding and the class token above all) changes the logits."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = path[-1].key
        if name == "scale":
            v = rng.uniform(0.5, 1.5, s.shape)
        elif name == "kernel":
            v = rng.normal(0, 1, s.shape) / np.sqrt(np.prod(s.shape[:-1]))
        elif name in ("pos_embed", "cls_token"):
            v = rng.normal(0, 1, s.shape)
        else:
            v = rng.normal(0, 0.3, s.shape)
        return v.astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, param_shapes(cfg))


def random_key(rng, p: int, c: int, grid=None) -> Key:
    """A key drawn here: perm, flip with floor(pb/2) ones, and block_perm for ``grid``."""
    pb = p * p * c
    flip = np.zeros(pb, np.uint8)
    flip[rng.choice(pb, pb // 2, replace=False)] = 1
    block_perm = None if grid is None else rng.permutation(grid[0] * grid[1]).astype(np.int32)
    return Key(rng.permutation(pb).astype(np.int32), flip, p, c, block_perm, grid)


def encrypt_by_blocks(x: np.ndarray, key: Key) -> np.ndarray:
    """method.md, block by block: the block at raster position b = r*gw + s of the output is
    the input block at block_perm[b] (b without block scrambling), flattened as
    k = (i*M + j)*C + c, shuffled y[k] = v[perm[k]] and flipped where flip[k]: 1 - y[k] for
    float images in [0, 1], 255 - y[k] for uint8."""
    n, h, w, c = x.shape
    m = key.block_size
    gh, gw = h // m, w // m
    perm, flip = np.asarray(key.perm), np.asarray(key.flip)
    out = np.empty_like(x)
    for r in range(gh):
        for s in range(gw):
            b = r * gw + s
            src = int(key.block_perm[b]) if key.scrambles else b
            rs, ss = divmod(src, gw)
            v = x[:, rs * m : (rs + 1) * m, ss * m : (ss + 1) * m, :].reshape(n, m * m * c)
            y = v[:, perm]
            z = np.where(flip == 1, (255 if x.dtype == np.uint8 else 1) - y, y)
            out[:, r * m : (r + 1) * m, s * m : (s + 1) * m, :] = z.reshape(n, m, m, c)
    return out


def assert_trees(a, b, exact: bool):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype
        if exact:
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def class_row(cfg: ViTConfig) -> bool:
    return cfg.class_token and not cfg.no_embed_class


# ---------------------------------------------------------------- the claim, and the transforms


@pytest.mark.parametrize("which", range(len(CONFIGS)))
@given(st.booleans(), st.booleans(), st.integers(0, 2**31))
@settings(max_examples=4, deadline=None, database=None)
def test_encrypted_vit_on_encrypted_images_equals_plain(which, scramble, scramble2, seed):
    cfg = CONFIGS[which]
    p, c, g = cfg.patch_size, cfg.channels, cfg.grid_size
    rng = np.random.default_rng(seed)
    key = random_key(rng, p, c, (g, g) if scramble else None)
    variables = random_variables(cfg, seed)
    x = rng.uniform(0, 1, (3, cfg.image_size, cfg.image_size, c)).astype(np.float32)
    apply = jitted_apply(cfg)
    enc_vars = encrypt_params(variables, key, **norm(cfg))
    plain = np.asarray(apply(variables, x))
    enc = np.asarray(apply(enc_vars, encrypt_by_blocks(x, key)))
    scale = float(np.max(np.abs(plain)))
    assert scale > 0.1
    np.testing.assert_allclose(enc, plain, rtol=0, atol=1e-5 * max(1.0, scale))
    # plain images on the encrypted model: another function
    assert np.max(np.abs(np.asarray(apply(enc_vars, x)) - plain)) > 1e-3 * scale
    if scramble:  # the block key is what the position embedding absorbs: without it, wrong
        pixel_only = Key(key.perm, key.flip, p, c)
        wrong = np.asarray(apply(encrypt_params(variables, pixel_only, **norm(cfg)),
                                 encrypt_by_blocks(x, key)))
        if not np.array_equal(key.block_perm, np.arange(g * g)):
            assert np.max(np.abs(wrong - plain)) > 1e-3 * scale

    # the position embedding, row by row: the class row unchanged, patch rows permuted
    pos = np.asarray(variables["params"]["pos_embed"])[0]
    pos_enc = np.asarray(enc_vars["params"]["pos_embed"])[0]
    off = 1 if class_row(cfg) else 0
    assert pos.shape[0] == off + g * g
    if off:
        np.testing.assert_array_equal(pos_enc[0], pos[0])
    for b in range(g * g):
        src = int(key.block_perm[b]) if scramble else b
        np.testing.assert_array_equal(pos_enc[off + b], pos[off + src])
    # nothing but the patch embedding and the position embedding changes
    for name, value in variables["params"].items():
        if name not in ("patch_embed", "pos_embed"):
            assert_trees(enc_vars["params"][name], value, exact=True)
    if paper_norm(cfg):  # the paper's normalization leaves the bias alone
        np.testing.assert_array_equal(
            enc_vars["params"]["patch_embed"]["bias"], variables["params"]["patch_embed"]["bias"]
        )

    exact = paper_norm(cfg)  # row permutations and sign flips: exact in float32
    assert_trees(decrypt_params(enc_vars, key, **norm(cfg)), variables, exact)
    key2 = random_key(rng, p, c, (g, g) if scramble2 else None)
    assert_trees(
        rekey_params(enc_vars, key, key2, **norm(cfg)),
        encrypt_params(variables, key2, **norm(cfg)),
        exact,
    )
    # a params tree (not nested in variables) gives the same
    assert_trees(
        encrypt_params(variables["params"], key, **norm(cfg)), enc_vars["params"], exact=True
    )


def test_vmap_over_keys_equals_key_by_key():
    which = 2  # a class token without a position row, ImageNet normalization
    cfg = CONFIGS[which]
    p, c, g = cfg.patch_size, cfg.channels, cfg.grid_size
    params = random_variables(cfg, 3)["params"]
    rng = np.random.default_rng(which)
    singles = [random_key(rng, p, c, (g, g)) for _ in range(4)]
    keys = Key(
        np.stack([k.perm for k in singles]),
        np.stack([k.flip for k in singles]),
        p,
        c,
        np.stack([k.block_perm for k in singles]),
        (g, g),
    )
    enc = functools.partial(encrypt_params, **norm(cfg))
    dec = functools.partial(decrypt_params, **norm(cfg))
    batched = jax.jit(jax.vmap(enc, in_axes=(None, 0)))(params, keys)
    back = jax.jit(jax.vmap(dec, in_axes=(0, 0)))(batched, keys)
    for i, key in enumerate(singles):
        one = jax.tree.map(lambda a, i=i: a[i], batched)
        assert_trees(one, enc(params, key), exact=paper_norm(cfg))
        assert_trees(jax.tree.map(lambda a, i=i: a[i], back), params, exact=paper_norm(cfg))


def test_inputs_are_not_modified():
    cfg = CONFIGS[0]
    variables = jax.tree.map(np.array, random_variables(cfg, 0))
    snapshot = jax.tree.map(np.copy, variables)
    key = random_key(np.random.default_rng(0), 2, 3, (4, 4))
    block_perm = np.copy(key.block_perm)
    encrypt_params(variables, key)
    rekey_params(variables, key, key)
    assert_trees(variables, snapshot, exact=True)
    np.testing.assert_array_equal(key.block_perm, block_perm)


# ---------------------------------------------------------------- refusals


def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def convmixer_tree(p=2, c=3, d=8) -> dict:
    rng = np.random.default_rng(0)
    return {
        "params": {
            "stem": {"kernel": rng.normal(size=(p, p, c, d)).astype(np.float32),
                     "bias": np.zeros(d, np.float32)},
            "head": {"kernel": np.zeros((d, 3), np.float32)},
        },
        "batch_stats": {"stem_bn": {"mean": np.zeros(d, np.float32)}},
    }


def test_a_convmixer_refuses_a_scrambling_key():
    tree = convmixer_tree()
    rng = np.random.default_rng(1)
    scrambling, plain = random_key(rng, 2, 3, (2, 2)), random_key(rng, 2, 3)
    enc = encrypt_params(tree, plain)  # the paper's key still works
    for call in (
        lambda: encrypt_params(tree, scrambling),
        lambda: encrypt_params(tree["params"], scrambling),
        lambda: decrypt_params(enc, scrambling),
        lambda: rekey_params(enc, plain, scrambling),
        lambda: encrypt_params(tree, scrambling, mean=(0.4,) * 3, std=(0.3,) * 3),
        lambda: check_key_fits_model(ConvMixerConfig(dim=8, depth=1, patch_size=2,
                                                     image_size=4), scrambling),
    ):
        with pytest.raises(KeyModelMismatch) as e:
            call()
        text = one_line(e)
        assert "ConvMixer" in text and "neighbours" in text and "--block-scrambling" in text


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("grid", [(2, 8), (3, 3), (5, 5), (1, 1)])
def test_a_key_for_another_grid_is_refused(which, grid):
    cfg = CONFIGS[which]
    g = cfg.grid_size
    if grid == (g, g):
        grid = (g + 1, g + 1)
    variables = random_variables(cfg, 0)
    rng = np.random.default_rng(2)
    bad = random_key(rng, cfg.patch_size, cfg.channels, grid)
    good = random_key(rng, cfg.patch_size, cfg.channels, (g, g))
    enc = encrypt_params(variables, good, **norm(cfg))
    for call in (
        lambda: encrypt_params(variables, bad, **norm(cfg)),
        lambda: decrypt_params(enc, bad, **norm(cfg)),
        lambda: rekey_params(enc, good, bad, **norm(cfg)),
        lambda: rekey_params(enc, bad, good, **norm(cfg)),
        lambda: check_key_fits_model(cfg, bad),
    ):
        with pytest.raises(KeyModelMismatch) as e:
            call()
        text = one_line(e)
        assert f"{grid[0]} x {grid[1]}" in text and f"{g} x {g}" in text
    check_key_fits_model(cfg, good)


def test_a_position_embedding_that_is_no_grid_is_refused():
    cfg = CONFIGS[1]  # no class token: 9 rows, a 3 x 3 grid
    params = random_variables(cfg, 0)["params"]
    key = random_key(np.random.default_rng(0), 3, 1, (3, 3))
    cut = {**params, "pos_embed": params["pos_embed"][:, :8]}
    with pytest.raises(KeyModelMismatch, match="8 rows"):
        encrypt_params(cut, key)


# ---------------------------------------------------------------- model directories


def zero_variables(cfg):
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_variables(cfg))


def reseal(path, edit):
    doc = json.loads((path / "config.json").read_text())
    edit(doc)
    doc["model_sha256"] = model_digest(doc)
    (path / "config.json").write_text(json.dumps(doc))


def test_the_encryption_record_holds_the_grid_of_a_scrambling_key_only(tmp_path):
    cfg = CONFIGS[0]
    rng = np.random.default_rng(5)
    scrambling, plain = random_key(rng, 2, 3, (4, 4)), random_key(rng, 2, 3)
    assert encryption_record(scrambling)["grid"] == [4, 4]
    assert "grid" not in encryption_record(plain)
    path = save_model(tmp_path / "enc", cfg, random_variables(cfg, 0), encryption=scrambling)
    _, meta = load_model_meta(path)
    assert meta["encryption"]["grid"] == [4, 4]
    path2 = save_model(tmp_path / "plainkey", cfg, random_variables(cfg, 0), encryption=plain)
    assert "grid" not in json.loads((path2 / "config.json").read_text())["encryption"]
    # a grid that is not the model's, on reading, even with a valid seal
    reseal(path, lambda d: d["encryption"].update(grid=[2, 8]))
    with pytest.raises(ModelDirError, match="2 x 8 grid of blocks.*4 x 4 grid of patches"):
        load_model_meta(path)
    reseal(path, lambda d: d["encryption"].update(grid=[4]))
    with pytest.raises(ModelDirError, match=r"'encryption.grid' must be \[gh, gw\]"):
        load_model_meta(path)
    # a ConvMixer cannot hold one
    cm = ConvMixerConfig(dim=8, depth=1, kernel_size=3, patch_size=2, num_classes=3,
                         image_size=8, channels=3)
    with pytest.raises(ModelDirError, match="neighbours"):
        save_model(tmp_path / "cm", cm, zero_variables(cm), encryption=scrambling)
    assert not (tmp_path / "cm").exists()
    path3 = save_model(tmp_path / "cm", cm, zero_variables(cm), encryption=plain)
    reseal(path3, lambda d: d["encryption"].update(grid=[4, 4]))
    with pytest.raises(ModelDirError, match="ConvMixer"):
        load_model_meta(path3)


def test_encrypt_model_dir_refuses_a_scrambling_key_for_a_convmixer_before_writing(tmp_path):
    cm = ConvMixerConfig(dim=8, depth=1, kernel_size=3, patch_size=2, num_classes=3,
                         image_size=8, channels=3)
    src = save_model(tmp_path / "cm", cm, zero_variables(cm))
    key = random_key(np.random.default_rng(0), 2, 3, (4, 4))
    with pytest.raises(KeyModelMismatch, match="ConvMixer"):
        encrypt_model_dir(src, tmp_path / "out", key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm"]


# ---------------------------------------------------------------- the command line on a ViT


def test_cli_model_commands_on_a_vit(tmp_path, capsys, tinted_images):
    from PIL import Image

    d = tmp_path
    arch = ["--preset", "vit_cifar", "--dim", "8", "--depth", "1", "--num-heads", "2",
            "--mlp-ratio", "2", "--patch-size", "2", "--image-size", "8", "--num-classes", "3"]
    ok(capsys, "init-model", *arch, "--seed", "3", "--out", d / "plain")
    cfg, plain_vars, meta = load_model(d / "plain")
    assert cfg == dataclasses.replace(CONFIGS[0], num_classes=3, class_token=False,
                                      global_pool="avg")
    assert set(plain_vars) == {"params"} and meta["encryption"] is None
    # an option of the other family is refused, nothing written
    rc, _, err = run(capsys, "init-model", *arch, "--kernel-size", "3", "--out", d / "x")
    assert rc != 0 and "--kernel-size" in err and not (d / "x").exists()

    for name, extra in (("k", ["--block-scrambling", "--image-size", "8"]), ("k2", [])):
        ok(capsys, "keygen", "--block-size", "2", "--channels", "3", *extra,
           "--key-seed", str(len(name)), "--out", d / f"{name}.json")
    ok(capsys, "encrypt-model", d / "plain", "--key", d / "k.json", "--out", d / "enc")
    _, enc_vars, meta = load_model(d / "enc")
    assert meta["encryption"]["grid"] == [4, 4]
    ok(capsys, "decrypt-model", d / "enc", "--key", d / "k.json", "--out", d / "dec")
    _, dec_vars, meta = load_model(d / "dec")
    assert meta["encryption"] is None
    assert_trees(dec_vars, plain_vars, exact=True)
    # the key without block scrambling cannot decrypt it, nothing written
    rc, _, err = run(capsys, "decrypt-model", d / "enc", "--key", d / "k2.json", "--out", d / "y")
    assert rc != 0 and "block scrambling" in err and not (d / "y").exists()
    # rekey to the key without block scrambling = encrypting with it
    ok(capsys, "rekey-model", d / "enc", "--old-key", d / "k.json", "--new-key", d / "k2.json",
       "--out", d / "re")
    _, re_vars, re_meta = load_model(d / "re")
    k2 = load_key(d / "k2.json")
    assert_trees(re_vars, jax.tree.map(np.asarray, encrypt_params(plain_vars, k2)), exact=True)
    assert re_meta["encryption"] == encryption_record(k2)
    assert "grid" not in re_meta["encryption"]

    # predict: the encrypted model on images encrypted here gives the plain logits
    images = tinted_images(12)
    np.save(d / "x.npy", images)
    np.save(d / "xe.npy", encrypt_by_blocks(images, load_key(d / "k.json")))
    ok(capsys, "predict", d / "plain", d / "x.npy", "--out", d / "lp.npy", "--quiet")
    ok(capsys, "predict", d / "enc", d / "xe.npy", "--out", d / "le.npy", "--quiet")
    lp, le = np.load(d / "lp.npy"), np.load(d / "le.npy")
    scale = float(np.max(np.abs(lp)))
    np.testing.assert_allclose(le, lp, rtol=0, atol=1e-5 * max(1.0, scale))

    # evaluate: test images labelled by the plain model's own predictions
    labels = np.argmax(lp, axis=1)
    for split in ("train", "test"):
        for c in range(3):
            (d / "data" / split / f"class{c}").mkdir(parents=True)
        for i, (im, c) in enumerate(zip(images, labels, strict=True)):
            Image.fromarray(im).save(d / "data" / split / f"class{c}" / f"{i}.png")

    def accuracy(*argv):
        out = ok(capsys, "evaluate", *argv, "--data-dir", d / "data", "--quiet")
        return json.loads(out.strip().splitlines()[-1])

    assert len(set(labels.tolist())) > 1  # the labels say something about the model
    right = accuracy(d / "enc", "--key", d / "k.json")
    assert right["accuracy"] == 1.0 and right["images"] == 12
    assert right["key_fingerprint"] == right["model_key_fingerprint"]

