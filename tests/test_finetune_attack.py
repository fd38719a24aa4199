"""The fine-tuning attack: which leaves each mode trains, BatchNorm modes, scratch
independence, learning on a tiny task, the results dict, the plot, and input errors; on a
ViT encrypted with a key that scrambles blocks: the 'stem' leaves, the deployed model,
and the report section's keys."""

from __future__ import annotations

import copy
import json

import jax
import numpy as np
import optax
import pytest

from convmixer_jax.attacks.finetune import (
    DEFAULT_LR,
    _batch_indices,
    attack_subset,
    default_steps,
    finetune,
    finetune_attack,
    lr_schedule,
    plot_finetune,
)
from convmixer_jax.files.model_dir import abstract_variables
from convmixer_jax.model.build import init_variables_abstract
from convmixer_jax.model.config import ViTConfig
from convmixer_jax.model.convmixer import ConvMixerConfig
from convmixer_jax.model.inference import accuracy, predict_logits
from convmixer_jax.scheme.images import ImageError
from convmixer_jax.scheme.keys import fingerprint, generate_key
from convmixer_jax.scheme.params import encrypt_params
from convmixer_jax.training.loop import init_variables

CFG = ConvMixerConfig(dim=16, depth=1, kernel_size=3, patch_size=2, num_classes=3, image_size=8)
# One batch size, and one size of every evaluated set, so that the few step and
# evaluation shapes compile once for the whole file.
BATCH = 16
N_EVAL = 64


def leaves(tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def changed(a, b):
    """Names of the leaves that differ (bit-wise) between two variable trees."""
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys()
    return {k for k in la if not np.array_equal(la[k], lb[k])}


def color_task(n, seed):
    """Class c = the brightest channel: learnable by a tiny ConvMixer in a few dozen steps."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.integers(0, 120, (n, 8, 8, 3))
    x[np.arange(n), :, :, y] += 130
    return x.astype(np.uint8), y.astype(np.int32)


@pytest.fixture(scope="module")
def data():
    return color_task(N_EVAL, 0)


@pytest.fixture(scope="module")
def start():
    return init_variables(CFG, 3)


@pytest.fixture(scope="module")
def stem_run(start, data):
    before = copy.deepcopy(start)
    out, hist = finetune(CFG, start, *data, mode="stem", steps=3, batch_size=BATCH, seed=1)
    return before, out, hist


@pytest.fixture(scope="module")
def trained_and_encrypted():
    """A tiny model trained on the color task, and that model encrypted with a key."""
    x, y = color_task(256, 1)
    plain, _ = finetune(
        CFG, None, x, y, mode="scratch", steps=60, batch_size=BATCH, lr=1e-2, seed=0
    )
    enc = encrypt_params(plain, generate_key(2, 3, seed=[5]))
    return plain, jax.tree.map(np.asarray, enc)


def test_stem_mode_trains_only_the_patch_embedding(stem_run):
    before, out, hist = stem_run
    assert changed(before, out) == {"['params']['stem']['kernel']", "['params']['stem']['bias']"}
    assert hist["trained"] == ["stem"] and hist["batchnorm_train_mode"] == []
    assert len(hist["loss"]) == 3 and all(np.isfinite(hist["loss"]))


def test_inputs_are_not_modified(start, stem_run):
    before, _, _ = stem_run
    assert not changed(before, start)


def test_stem_mode_runs_batchnorm_in_eval_mode(start, data):
    """The first step's loss is the deployed (eval-mode) model's loss on that batch."""
    x, y = data
    _, hist = finetune(CFG, start, x, y, mode="stem", steps=1, batch_size=N_EVAL, augment=False)
    logits = predict_logits(CFG, start, x)
    expected = float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())
    assert hist["loss"][0] == pytest.approx(expected, rel=1e-5)


def test_stem_bn_option_trains_and_updates_only_the_stem_batchnorm(start, data):
    out, hist = finetune(CFG, start, *data, mode="stem", steps=2, batch_size=BATCH, stem_bn=True)
    diff = changed(start, out)
    assert {
        "['params']['stem_bn']['scale']",
        "['batch_stats']['stem_bn']['mean']",
        "['batch_stats']['stem_bn']['var']",
        "['params']['stem']['kernel']",
    } <= diff
    assert all("stem" in k for k in diff), diff  # block_0, head and their BatchNorms untouched
    assert hist["batchnorm_train_mode"] == ["stem_bn"]


def test_all_mode_trains_every_layer(start, data):
    out, hist = finetune(CFG, start, *data, mode="all", steps=2, batch_size=BATCH)
    assert changed(start, out) == set(leaves(start))
    assert hist["trained"] == sorted(start["params"])


def test_scratch_does_not_depend_on_the_given_variables(start, data):
    a, _ = finetune(CFG, start, *data, mode="scratch", steps=2, batch_size=BATCH, seed=4)
    b, _ = finetune(
        CFG, init_variables(CFG, 99), *data, mode="scratch", steps=2, batch_size=BATCH, seed=4
    )
    c, _ = finetune(CFG, None, *data, mode="scratch", steps=2, batch_size=BATCH, seed=4)
    assert not changed(a, b) and not changed(a, c)
    d, _ = finetune(CFG, None, *data, mode="scratch", steps=2, batch_size=BATCH, seed=5)
    assert changed(a, d)


def test_same_seed_same_result(start, data, stem_run):
    _, out, _ = stem_run
    again, _ = finetune(CFG, start, *data, mode="stem", steps=3, batch_size=BATCH, seed=1)
    assert not changed(out, again)


def test_float_images_match_uint8(start, data):
    x, y = data
    a, ha = finetune(CFG, start, x, y, mode="stem", steps=2, batch_size=BATCH)
    b, hb = finetune(
        CFG, start, x.astype(np.float32) / 255, y, mode="stem", steps=2, batch_size=BATCH
    )
    np.testing.assert_allclose(ha["loss"], hb["loss"], rtol=1e-5)
    for k, v in leaves(a).items():
        np.testing.assert_allclose(v, leaves(b)[k], atol=1e-5)


def test_fewer_images_than_a_batch(start, data):
    x, y = data
    idx = _batch_indices(5, 16, 5, seed=0)  # 80 draws of 5 images: each 16 times
    assert idx.shape == (5, 16) and np.all(np.bincount(idx.ravel(), minlength=5) == 16)
    out, hist = finetune(CFG, start, x[:5], y[:5], mode="stem", steps=2, batch_size=BATCH)
    assert hist["n"] == 5 and changed(start, out)


def test_stem_fine_tuning_repairs_an_encrypted_model(trained_and_encrypted):
    plain, enc = trained_and_encrypted
    x, y = color_task(200, 2)
    test_x, test_y = color_task(N_EVAL, 3)
    plain_acc = accuracy(CFG, plain, test_x, test_y)
    enc_acc = accuracy(CFG, enc, test_x, test_y)
    assert plain_acc > 0.9
    assert enc_acc < plain_acc - 0.2
    tuned, hist = finetune(CFG, enc, x, y, mode="stem", steps=40, batch_size=BATCH, lr=2e-2)
    tuned_acc = accuracy(CFG, tuned, test_x, test_y)
    assert tuned_acc > max(enc_acc + 0.2, 0.85), (enc_acc, tuned_acc)
    assert np.mean(hist["loss"][-5:]) < np.mean(hist["loss"][:5])


def test_finetune_attack_results(trained_and_encrypted, tmp_path):
    _, enc = trained_and_encrypted
    x, y = color_task(64, 4)
    tx, ty = color_task(N_EVAL, 5)
    res = finetune_attack(
        CFG,
        enc,
        x,
        y,
        tx,
        ty,
        sizes=(16, 8),
        steps={8: 2, 16: 3},
        batch_size=BATCH,
        lr={"stem": 1e-2},
        baseline_accuracy=0.95,
        progress=True,
    )
    res = json.loads(json.dumps(res))  # JSON-serializable, and keys survive the round trip
    assert res["settings"]["sizes"] == [8, 16]
    assert set(res["accuracy"]) == {"stem", "all", "scratch"}
    for accs in res["accuracy"].values():
        assert set(accs) == {"8", "16"} and all(0 <= a <= 1 for a in accs.values())
    assert len(res["runs"]) == 6
    for run in res["runs"]:
        assert run["steps"] == {8: 2, 16: 3}[run["n"]] and run["seconds"] > 0
        assert (
            run["lr"]
            == {"stem": 1e-2, "all": DEFAULT_LR["all"], "scratch": DEFAULT_LR["scratch"]}[
                run["mode"]
            ]
        )
    assert res["encrypted_accuracy"] == accuracy(CFG, enc, tx, ty)
    assert res["chance"] == pytest.approx(1 / 3) and res["baseline_accuracy"] == 0.95
    out = plot_finetune(res, tmp_path / "finetune.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_attack_subsets_are_seeded_and_nested():
    a, b = attack_subset(1000, 100, 0), attack_subset(1000, 500, 0)
    assert len(set(a)) == 100 and set(a) <= set(b)
    assert np.array_equal(a, attack_subset(1000, 100, 0))
    assert not np.array_equal(a, attack_subset(1000, 100, 1))


def test_schedule_and_default_steps():
    lrs = [lr_schedule(s, 20, 1.0, 0.1) for s in range(20)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and all(0 < v <= 1 for v in lrs)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))
    assert [default_steps(n) for n in (100, 500, 1000, 5000)] == [50, 81, 100, 162]


def test_errors(start, data):
    x, y = data
    with pytest.raises(ValueError, match="unknown fine-tuning mode 'head'"):
        finetune(CFG, start, x, y, mode="head")
    with pytest.raises(ImageError, match="16x16 but the model takes 8x8"):
        finetune(CFG, start, np.zeros((4, 16, 16, 3), np.uint8), y[:4], mode="stem")
    with pytest.raises(ValueError, match="one entry per image"):
        finetune(CFG, start, x, y[:-1], mode="stem")
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.2"):
        finetune(CFG, start, x, y + 1, mode="stem")
    other = jax.tree.map(
        lambda a: np.zeros(a.shape, a.dtype),
        abstract_variables(
            ConvMixerConfig(
                dim=8, depth=1, kernel_size=3, patch_size=2, num_classes=3, image_size=8
            )
        ),
    )
    with pytest.raises(ValueError, match="another model"):
        finetune(CFG, other, x, y, mode="all")
    with pytest.raises(ValueError, match="pass them"):
        finetune(CFG, None, x, y, mode="stem")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        finetune(CFG, start, x, y, mode="stem", steps=0)
    with pytest.raises(ValueError, match="stem_bn applies to mode 'stem' only"):
        finetune(CFG, start, x, y, mode="all", stem_bn=True)
    with pytest.raises(ValueError, match="unknown augmentations"):
        finetune(CFG, start, x, y, mode="stem", augment=("rotate",))
    with pytest.raises(ValueError, match="exceeds the 64 training images"):
        finetune_attack(CFG, start, x, y, x, y, sizes=(10, 100))
    with pytest.raises(ValueError, match="unknown fine-tuning mode"):
        finetune_attack(CFG, start, x, y, x, y, sizes=(10,), modes=("stem", "key"))
    with pytest.raises(ValueError, match="steps has no entry for n = 20"):
        finetune_attack(CFG, start, x, y, x, y, sizes=(10, 20), steps={10: 1})


# --------------------------------------------------------------------------- a ViT

VIT = ViTConfig(
    dim=16, depth=1, num_heads=2, mlp_ratio=2.0, patch_size=4, num_classes=3, image_size=8
)
VIT_STEM = {
    "['params']['patch_embed']['kernel']",
    "['params']['patch_embed']['bias']",
    "['params']['pos_embed']",
}


@pytest.fixture(scope="module")
def vit_models():
    """A ViT and the same ViT encrypted with a key that scrambles its 2 x 2 grid. Every leaf
    is standard-normal times 0.3 (shapes from ``jax.eval_shape``: nothing is compiled), so
    that the predictions depend on the input."""
    rng = np.random.default_rng(0)
    plain = jax.tree.map(
        lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32),
        jax.eval_shape(lambda: init_variables_abstract(VIT)),
    )
    key = generate_key(4, 3, seed=[6], grid=(2, 2))
    return plain, jax.tree.map(np.asarray, encrypt_params(plain, key))


def test_vit_stem_trains_patch_and_position_embeddings_of_the_deployed_model(vit_models, data):
    _, enc = vit_models
    before = copy.deepcopy(enc)
    x, y = data
    out, hist = finetune(
        VIT, enc, x, y, mode="stem", steps=2, batch_size=N_EVAL, augment=False, seed=1
    )
    assert set(out) == {"params"}  # no BatchNorm statistics appear
    assert changed(enc, out) == VIT_STEM  # cls_token, blocks, norm and head bitwise unchanged
    assert not changed(before, enc)
    assert hist["trained"] == ["patch_embed", "pos_embed"] and hist["batchnorm_train_mode"] == []
    assert hist["lr"] == DEFAULT_LR["stem"]
    # the first step's loss (every image once, no augmentation) is the encrypted model's
    logits = predict_logits(VIT, enc, x)
    expected = float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())
    assert hist["loss"][0] == pytest.approx(expected, rel=1e-5)


def test_vit_report_section_uses_scrambling_keys_on_the_model_grid(vit_models, tmp_path):
    from convmixer_jax.attacks import finetune_report
    from convmixer_jax.attacks.protocol import AttackContext

    plain, _ = vit_models
    x, y = color_task(N_EVAL, 6)
    context = AttackContext(
        model_config=VIT,
        variables=plain,
        train_data=(x, y),
        test_data=(x, y),
        eval_data=(x[:16], y[:16]),
        stream=np.random.SeedSequence(11),
        seeded=True,
    )
    assert finetune_report.ATTACK.skip_reason(VIT) is None
    assert finetune_report.ATTACK.skip_reason(CFG) is None
    config = finetune_report.FinetuneConfig(
        finetune_sizes=(8,), finetune_modes=("stem",), finetune_steps=1, finetune_keys=2
    )
    ft = json.loads(json.dumps(finetune_report.run(context, config)))
    keys = [generate_key(4, 3, seed=[context.key_seed(0), i], grid=(2, 2)) for i in (0, 1)]
    assert ft["key_grid"] == [2, 2]
    assert [k["key_fingerprint"] for k in ft["stem_keys"]] == [fingerprint(k) for k in keys]
    ex, ey = context.eval_data
    assert ft["encrypted_accuracy"] == accuracy(VIT, encrypt_params(plain, keys[0]), ex, ey)
    assert ft["stem_keys"][1]["encrypted_accuracy"] == accuracy(
        VIT, encrypt_params(plain, keys[1]), ex, ey
    )
    assert ft["runs"][0]["trained"] == ["patch_embed", "pos_embed"]
    text = "\n".join(finetune_report.summary_lines(ft))
    assert "scramble the blocks of its 2 x 2 grid" in text and "| stem | " in text
    out = plot_finetune(ft, tmp_path / "finetune.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vit_errors(vit_models, start, data):
    plain, _ = vit_models
    x, y = data
    with pytest.raises(ValueError, match="a ViT has no BatchNorm"):
        finetune(VIT, plain, x, y, mode="stem", stem_bn=True)
    with pytest.raises(ValueError, match=r"variables must be \{'params'\}"):
        finetune(VIT, start, x, y, mode="stem")
    with pytest.raises(ValueError, match=r"variables must be \{'params', 'batch_stats'\}"):
        finetune(CFG, plain, x, y, mode="stem")
