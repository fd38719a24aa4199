"""The Vision Transformer family: its config, its module, training and model directories."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_helpers import ok, run
from hypothesis import given, settings
from hypothesis import strategies as st


def _vit(**overrides):
    from convmixer_jax.model.config import ViTConfig

    fields = dict(
        dim=8, depth=1, num_heads=2, mlp_ratio=2.0, patch_size=2, num_classes=3, image_size=8,
        channels=3,
    )
    fields.update(overrides)
    return ViTConfig(**fields)


def _random_variables(cfg, seed, scale=0.3):
    """Variables of ``cfg`` with every leaf standard-normal times ``scale`` (shapes from
    ``jax.eval_shape``: no initializer runs, nothing is compiled)."""
    import jax

    from convmixer_jax.model.build import init_variables_abstract

    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_variables_abstract(cfg))
    return jax.tree.map(
        lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32), dict(shapes)
    )


def test_config_checks_and_round_trip():
    from convmixer_jax.model.config import (
        ConvMixerConfig,
        ViTConfig,
        config_from_dict,
    )

    cfg = _vit(class_token=False, global_pool="avg", mean=(0.1, 0.2, 0.3), std=(1, 2, 3))
    d = cfg.to_dict()
    assert d["family"] == "vit"
    assert config_from_dict(json.loads(json.dumps(d))) == cfg
    assert config_from_dict(ConvMixerConfig().to_dict()) == ConvMixerConfig()
    assert "family" not in ConvMixerConfig().to_dict()  # model files written before ViTs
    with pytest.raises(ValueError, match="num_heads"):
        _vit(dim=10, num_heads=4)
    with pytest.raises(ValueError, match="class token"):
        _vit(class_token=False, global_pool="token")
    with pytest.raises(ValueError, match="divisible by patch_size"):
        _vit(image_size=9)
    with pytest.raises(ValueError, match="unknown model family 'mlp'"):
        config_from_dict({"family": "mlp"})
    with pytest.raises(ValueError, match="not a ViT"):
        ViTConfig.from_dict({"family": "convmixer"})
    with pytest.raises(ValueError, match="unknown ViT config fields"):
        config_from_dict({**d, "kernel_size": 3})
    assert (_vit().pos_rows, _vit(no_embed_class=True).pos_rows) == (17, 16)
    assert _vit(class_token=False, global_pool="avg").pos_rows == 16


@pytest.mark.parametrize(
    "overrides, head_norm",
    [({}, "norm"), ({"class_token": False, "global_pool": "avg"}, "fc_norm"),
     ({"no_embed_class": True, "global_pool": "avg"}, "fc_norm")],
)
def test_parameter_tree_follows_timm(overrides, head_norm):
    import jax

    from convmixer_jax.model.build import init_variables_abstract

    cfg = _vit(depth=2, **overrides)
    variables = jax.eval_shape(lambda: init_variables_abstract(cfg))
    assert set(variables) == {"params"}
    p = variables["params"]
    assert p["patch_embed"]["kernel"].shape == (2, 2, 3, 8)
    assert p["pos_embed"].shape == (1, cfg.pos_rows, 8)
    assert ("cls_token" in p) == cfg.class_token
    assert head_norm in p and {"norm", "fc_norm"} - {head_norm} & set(p) == set()
    assert p["blocks_1"]["attn"]["qkv"]["kernel"].shape == (8, 24)
    assert p["blocks_1"]["mlp"]["fc1"]["kernel"].shape == (8, 16)
    assert p["head"]["kernel"].shape == (8, 3)
    assert sum(x.size for x in jax.tree.leaves(p)) > 0


def _forward_numpy(cfg, p, images):
    """The ViT written out in NumPy from its description (pre-norm blocks, erf GELU)."""
    from math import erf

    def ln(x, q):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg.norm_eps) * q["scale"] + q["bias"]

    def dense(x, q):
        return x @ q["kernel"] + q["bias"]

    x = (images.astype(np.float64) - np.asarray(cfg.norm_mean)) / np.asarray(cfg.norm_std)
    n, s = len(x), cfg.patch_size
    g = cfg.image_size // s
    tokens = np.zeros((n, g * g, cfg.dim))
    for r in range(g):
        for c in range(g):
            block = x[:, r * s : (r + 1) * s, c * s : (c + 1) * s, :].reshape(n, -1)
            tokens[:, r * g + c] = block @ p["patch_embed"]["kernel"].reshape(-1, cfg.dim)
    tokens += p["patch_embed"]["bias"]
    pos = p["pos_embed"][0]
    if cfg.class_token:
        cls = np.broadcast_to(p["cls_token"][0], (n, 1, cfg.dim))
        if cfg.no_embed_class:
            t = np.concatenate([cls, tokens + pos], 1)
        else:
            t = np.concatenate([cls, tokens], 1) + pos
    else:
        t = tokens + pos
    h, hd = cfg.num_heads, cfg.dim // cfg.num_heads
    v_erf = np.vectorize(erf)
    for i in range(cfg.depth):
        b = p[f"blocks_{i}"]
        y = dense(ln(t, b["norm1"]), b["attn"]["qkv"]).reshape(n, -1, 3, h, hd)
        q, k, v = y[:, :, 0], y[:, :, 1], y[:, :, 2]
        att = np.einsum("nqhc,nkhc->nhqk", q, k) / np.sqrt(hd)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("nhqk,nkhc->nqhc", att, v).reshape(n, -1, cfg.dim)
        t = t + dense(o, b["attn"]["proj"])
        hid = dense(ln(t, b["norm2"]), b["mlp"]["fc1"])
        hid = 0.5 * hid * (1 + v_erf(hid / np.sqrt(2)))
        t = t + dense(hid, b["mlp"]["fc2"])
    if cfg.global_pool == "token":
        pooled = ln(t, p["norm"])[:, 0]
    else:
        pooled = ln(t[:, 1 if cfg.class_token else 0 :].mean(1), p["fc_norm"])
    return dense(pooled, p["head"])


@pytest.mark.parametrize(
    "overrides",
    [{}, {"class_token": False, "global_pool": "avg"},
     {"no_embed_class": True, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}],
)
def test_logits_equal_the_written_out_forward(overrides, tinted_images):
    import jax

    from convmixer_jax.model.build import build_model

    cfg = _vit(depth=2, **overrides)
    # every parameter random, so that no zero-initialized bias hides a wrong wiring
    variables = _random_variables(cfg, 1)
    x = tinted_images(5, 8, seed=2).astype(np.float32) / 255.0
    got = np.asarray(build_model(cfg).apply(variables, x))
    p64 = jax.tree.map(lambda v: np.asarray(v, np.float64), variables["params"])
    want = _forward_numpy(cfg, p64, x)
    assert got.shape == (5, 3)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    grid=st.sampled_from([(2, 2), (3, 3)]),
    mode=st.sampled_from(["cls", "avg", "no_embed_class"]),
)
def test_permuting_tokens_and_position_rows_together_changes_nothing(seed, grid, mode):
    """The ViT property block scrambling rests on: moving every patch to another position and
    its position-embedding row with it leaves the logits unchanged."""
    from convmixer_jax.model.build import build_model
    from convmixer_jax.scheme.blocks import from_blocks, to_blocks

    overrides = {
        "cls": {},
        "avg": {"class_token": False, "global_pool": "avg"},
        "no_embed_class": {"no_embed_class": True},
    }[mode]
    g = grid[0]
    cfg = _vit(image_size=2 * g, **overrides)
    rng = np.random.default_rng(seed)
    variables = _random_variables(cfg, seed, scale=0.2)
    x = rng.random((3, 2 * g, 2 * g, 3)).astype(np.float32)
    perm = rng.permutation(g * g)
    blocks = to_blocks(x, 2).reshape(3, g * g, -1)[:, perm].reshape(3, g, g, -1)
    moved = from_blocks(blocks, 2, 3)
    pos = variables["params"]["pos_embed"]
    off = cfg.pos_rows - g * g
    new_pos = np.concatenate([pos[:, :off], pos[:, off:][:, perm]], axis=1)
    moved_vars = {"params": {**variables["params"], "pos_embed": new_pos}}
    model = build_model(cfg)
    plain = np.asarray(model.apply(variables, x))
    np.testing.assert_allclose(
        np.asarray(model.apply(moved_vars, moved)), plain, rtol=1e-5, atol=1e-5
    )
    if g > 1 and not np.array_equal(perm, np.arange(g * g)):  # the rows do matter
        assert not np.allclose(np.asarray(model.apply(variables, moved)), plain, atol=1e-5)


def test_wrong_image_size_is_refused():
    import jax.numpy as jnp

    from convmixer_jax.model.build import build_model

    cfg = _vit()
    variables = _random_variables(cfg, 0)
    with pytest.raises(ValueError, match="do not fit this ViT"):
        build_model(cfg).apply(variables, jnp.zeros((1, 12, 12, 3)))


def test_train_save_load_and_evaluate_a_vit(tmp_path, capsys, png_tree):
    """train on a tiny image folder with a ViT preset changed to tiny options; the saved
    model holds {'params'} only, evaluates to the accuracy train reported, and a second
    train with an option of the other family is refused before anything is written."""
    root = png_tree(tmp_path / "data", n_per_class=8, classes=3, size=8)
    out, work = tmp_path / "vit-model", tmp_path / "work"
    arch = ["--preset", "vit_cifar", "--dim", "8", "--depth", "1", "--num-heads", "2",
            "--patch-size", "2", "--image-size", "8"]
    line = ok(
        capsys, "train", "--data-dir", str(root), *arch, "--recipe", "paper", "--epochs", "1",
        "--batch-size", "8", "--holdout", "0", "--workdir", str(work), "--out", str(out),
        "--quiet",
    )
    trained = json.loads(line.strip().splitlines()[-1])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["family"] == "vit" and cfg["model"]["num_classes"] == 3
    from convmixer_jax.files.model_dir import load_model

    config, variables, _ = load_model(out)
    assert set(variables) == {"params"} and config.family == "vit"
    res = json.loads(
        ok(capsys, "evaluate", str(out), "--data-dir", str(root)).strip().splitlines()[-1]
    )
    assert res["accuracy"] == pytest.approx(trained["test_accuracy"])
    code, _, err = run(
        capsys, "train", "--data-dir", str(root), *arch, "--kernel-size", "3",
        "--workdir", str(tmp_path / "w2"), "--out", str(tmp_path / "m2"),
    )
    assert code != 0 and "--kernel-size does not apply to a vit model" in err
    assert not (tmp_path / "m2").exists() and not (tmp_path / "w2").exists()
