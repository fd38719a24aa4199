"""The one training step (convmixer_jax/training/step.py): what the trainable mask freezes,
which BatchNorm statistics each mode updates, the loss against a hand-computed
cross-entropy, and the learning-rate argument against optax's own learning rate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from convmixer_jax.model.convmixer import ConvMixer
from convmixer_jax.training.loop import init_variables
from convmixer_jax.training.step import (
    freeze,
    integer_cross_entropy,
    make_train_step,
    one_hot_cross_entropy,
    top_level_mask,
)


def leaves(tree) -> dict[str, np.ndarray]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def changed(a, b) -> set[str]:
    """The leaves of two trees of one structure that differ bit-wise."""
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys()
    return {k for k in la if not np.array_equal(la[k], lb[k])}


@pytest.fixture(scope="module")
def setup(tiny_config, tinted_images):
    variables = init_variables(tiny_config, 0)
    images = tinted_images(6).astype(np.float32) / 255.0
    labels = np.array([0, 1, 2, 0, 1, 2], np.int32)
    return tiny_config, variables, images, labels


def one_step(config, variables, x, y, **kw):
    """(state before, state after, loss, metric) of one step with Adam at 1e-2."""
    train_step = make_train_step(
        ConvMixer(config), optax.adam(1e-2), one_hot_cross_entropy(config.num_classes), **kw
    )
    state = {
        "params": jax.tree.map(jnp.array, variables["params"]),
        "batch_stats": jax.tree.map(jnp.array, variables["batch_stats"]),
        "step": jnp.zeros((), jnp.int32),
    }
    state["opt_state"] = train_step.init_opt_state(state["params"])
    before = jax.tree.map(np.array, state)
    after, loss, metric = train_step(state, x, y)
    return before, jax.tree.map(np.asarray, after), float(loss), int(metric)


@pytest.fixture(scope="module")
def runs(setup):
    """One step in each setting the tests look at (each compiles once): 'frozen' trains the
    stem and the head with every BatchNorm in eval mode, 'train' and 'stem_bn' train every
    parameter with every / the stem's BatchNorm in train mode."""
    config, variables, x, y = setup
    return {
        "frozen": one_step(
            config, variables, x, y, trainable=top_level_mask({"stem", "head"}), batch_norm="eval"
        ),
        "train": one_step(config, variables, x, y, batch_norm="train"),
        "stem_bn": one_step(config, variables, x, y, batch_norm=frozenset({"stem_bn"})),
    }


def test_the_mask_freezes_what_it_says(runs):
    before, after, _, _ = runs["frozen"]
    moved = changed(before["params"], after["params"])
    assert moved == {
        "['stem']['kernel']",
        "['stem']['bias']",
        "['head']['kernel']",
        "['head']['bias']",
    }
    assert not changed(before["batch_stats"], after["batch_stats"])
    assert after["step"] == 1


def test_frozen_leaves_hold_no_optimizer_state(setup):
    """The mask as a function of the parameters or as a tree of bools: the optimizer keeps
    state for the trained leaves only."""
    _, variables, _, _ = setup
    params = variables["params"]
    mask = top_level_mask({"stem"})
    n_stem_only = len(jax.tree.leaves(optax.adam(1e-2).init(params["stem"])))
    for trainable in (mask, mask(params)):
        n_state = len(jax.tree.leaves(freeze(optax.adam(1e-2), trainable).init(params)))
        assert n_state == n_stem_only
    assert n_stem_only < len(jax.tree.leaves(optax.adam(1e-2).init(params)))


def test_no_mask_trains_every_parameter(runs, setup):
    _, variables, _, _ = setup
    before, after, _, _ = runs["train"]
    assert changed(before["params"], after["params"]) == set(leaves(variables["params"]))


def test_batchnorm_statistics_update_only_in_the_mode_that_says_so(runs, setup):
    _, variables, _, _ = setup
    stats = variables["batch_stats"]
    assert changed(stats, runs["train"][1]["batch_stats"]) == set(leaves(stats))
    assert not changed(stats, runs["frozen"][1]["batch_stats"])  # 'eval'
    assert changed(stats, runs["stem_bn"][1]["batch_stats"]) == {
        "['stem_bn']['mean']",
        "['stem_bn']['var']",
    }


def test_train_mode_statistics_are_the_batchs(runs, setup):
    """One step in train mode moves the stem BatchNorm's running mean by (1 - momentum)
    towards the mean of its input over the batch (channel-major: every axis but the first)."""
    import flax.linen as nn

    config, variables, x, y = setup
    _, after, _, _ = runs["train"]
    seen = []

    def record(next_fun, args, kwargs, context):
        if context.module.name == "stem_bn" and context.method_name == "__call__":
            seen.append(np.asarray(args[0]))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        ConvMixer(config).apply(variables, x, train=False)
    (stem_bn_input,) = seen
    batch_mean = stem_bn_input.reshape(stem_bn_input.shape[0], -1).mean(1)
    start = np.asarray(variables["batch_stats"]["stem_bn"]["mean"])
    expected = 0.9 * start + 0.1 * batch_mean
    np.testing.assert_allclose(after["batch_stats"]["stem_bn"]["mean"], expected, atol=1e-5)


def test_the_loss_is_the_cross_entropy_by_hand(runs, setup):
    """The loss of the eval-mode step (computed before its update) by hand, in float64."""
    config, variables, x, y = setup
    _, _, loss, correct = runs["frozen"]
    logits = np.asarray(ConvMixer(config).apply(variables, x, train=False), np.float64)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    by_hand = -np.mean(log_softmax[np.arange(len(y)), y])
    assert loss == pytest.approx(by_hand, rel=1e-5)
    assert correct == int(np.sum(logits.argmax(-1) == y))


def test_both_cross_entropies_and_label_smoothing_by_hand():
    logits = jnp.array([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
    labels = jnp.array([0, 1])
    lsm = np.asarray(jax.nn.log_softmax(logits), np.float64)
    plain = -np.mean(lsm[[0, 1], [0, 1]])
    for value, correct in (
        one_hot_cross_entropy(3)(logits, labels),
        integer_cross_entropy(logits, labels),
    ):
        assert float(value) == pytest.approx(plain, rel=1e-6) and int(correct) == 1
    eps = 0.1
    target = np.full((2, 3), eps / 3) + (1 - eps) * np.eye(3)[[0, 1]]
    smooth = -np.mean((target * lsm).sum(-1))
    value, _ = one_hot_cross_entropy(3, eps)(logits, labels)
    assert float(value) == pytest.approx(smooth, rel=1e-6)


def test_the_learning_rate_argument_equals_optax_learning_rate(setup):
    config, variables, x, y = setup
    model, loss = ConvMixer(config), one_hot_cross_entropy(config.num_classes)
    by_argument = make_train_step(
        model, optax.scale_by_adam(), loss, batch_norm="eval", learning_rate_argument=True
    )
    by_optax = make_train_step(model, optax.adam(3e-3), loss, batch_norm="eval")
    outs = []
    for train_step, extra in ((by_argument, (jnp.float32(3e-3),)), (by_optax, ())):
        state = {
            "params": jax.tree.map(jnp.array, variables["params"]),
            "batch_stats": jax.tree.map(jnp.array, variables["batch_stats"]),
        }
        state["opt_state"] = train_step.init_opt_state(state["params"])
        state, _, _ = train_step(state, x, y, *extra)
        outs.append(state["params"])
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_prepare_and_after_hooks_run_inside_the_step(setup):
    config, variables, x, y = setup

    def prepare(state, images, labels):
        return images[:, ::-1], labels  # an augmentation: mirror every image

    def after(old, new):
        return dict(new, seen=old["seen"] + 1)

    train_step = make_train_step(
        ConvMixer(config),
        optax.sgd(0.0),
        one_hot_cross_entropy(config.num_classes),
        batch_norm="eval",
        prepare=prepare,
        after=after,
    )
    state = {
        "params": jax.tree.map(jnp.array, variables["params"]),
        "batch_stats": jax.tree.map(jnp.array, variables["batch_stats"]),
        "seen": jnp.zeros((), jnp.int32),
    }
    state["opt_state"] = train_step.init_opt_state(state["params"])
    state, loss, _ = train_step(state, x, y)
    assert int(state["seen"]) == 1
    logits = ConvMixer(config).apply(variables, x[:, ::-1], train=False)
    expected, _ = one_hot_cross_entropy(config.num_classes)(logits, y)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_an_unknown_batchnorm_mode_is_refused(setup):
    config, _, _, _ = setup
    with pytest.raises(ValueError, match="batch_norm must be"):
        make_train_step(
            ConvMixer(config),
            optax.adam(1e-3),
            one_hot_cross_entropy(config.num_classes),
            batch_norm="frozen",
        )
