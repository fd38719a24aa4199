"""ConvMixer: the three depthwise formulations agree, and the model equals an independent
NHWC reference built from flax.linen.Conv / BatchNorm with the same parameters."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convmixer_jax.model.convmixer import (
    PRESETS,
    ConvMixer,
    ConvMixerConfig,
    depthwise,
    prepare_inference,
    resolve_depthwise_impl,
    toeplitz_matrices,
)

SETTINGS = settings(max_examples=8, deadline=None, database=None)


# ---------------------------------------------------------------- helpers


def random_variables(model: nn.Module, images, seed: int):
    """Variables of ``model`` with random values (no compiled init: eval_shape only).

    BatchNorm statistics are random too (var > 0), so eval-mode BatchNorm is not an identity.
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = path[-1].key
        if name == "var":
            return rng.uniform(0.5, 2.0, s.shape).astype(np.float32)
        if name == "scale":
            return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
        if name == "mean":
            return rng.normal(0, 0.3, s.shape).astype(np.float32)
        if name == "kernel":
            fan_in = int(np.prod(s.shape[:-1]))
            return (rng.normal(0, 1, s.shape) / np.sqrt(fan_in)).astype(np.float32)
        return rng.normal(0, 0.2, s.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


class RefConvMixer(nn.Module):
    """ConvMixer written the plain NHWC way (locuslab's definition with flax layers)."""

    dim: int
    depth: int
    kernel_size: int
    patch_size: int
    num_classes: int
    mean: tuple
    std: tuple
    approximate: bool = False
    activation: str = "gelu"

    @nn.compact
    def __call__(self, x, train: bool = False):
        act = (
            jax.nn.relu
            if self.activation == "relu"
            else lambda v: jax.nn.gelu(v, approximate=self.approximate)
        )

        def bn(name):
            return nn.BatchNorm(
                use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name
            )

        x = (x - jnp.asarray(self.mean)) / jnp.asarray(self.std)
        p = self.patch_size
        x = nn.Conv(self.dim, (p, p), strides=(p, p), padding="VALID", name="stem")(x)
        x = bn("stem_bn")(act(x))
        for i in range(self.depth):
            y = nn.Conv(
                self.dim,
                (self.kernel_size, self.kernel_size),
                padding="SAME",
                feature_group_count=self.dim,
                name=f"dw_{i}",
            )(x)
            x = x + bn(f"dw_bn_{i}")(act(y))
            x = nn.Conv(self.dim, (1, 1), name=f"pw_{i}")(x)
            x = bn(f"pw_bn_{i}")(act(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


def ref_for(cfg: ConvMixerConfig) -> RefConvMixer:
    return RefConvMixer(
        cfg.dim,
        cfg.depth,
        cfg.kernel_size,
        cfg.patch_size,
        cfg.num_classes,
        cfg.norm_mean,
        cfg.norm_std,
        cfg.gelu_approximate,
        cfg.activation,
    )


def to_reference_tree(tree: dict, depth: int) -> dict:
    """Map one collection (params or batch_stats) of our model to the reference's names."""
    out = {k: tree[k] for k in ("stem", "stem_bn", "head") if k in tree}
    for i in range(depth):
        block = tree[f"block_{i}"]
        for ours, ref in (
            ("depthwise", "dw"),
            ("depthwise_bn", "dw_bn"),
            ("pointwise", "pw"),
            ("pointwise_bn", "pw_bn"),
        ):
            if ours in block:
                out[f"{ref}_{i}"] = block[ours]
    return out


def to_reference_variables(variables: dict, depth: int) -> dict:
    return {col: to_reference_tree(tree, depth) for col, tree in variables.items()}


def shapes_of(tree):
    return jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), tree)


@st.composite
def configs(draw, impl="auto"):
    c = draw(st.integers(1, 3))
    p = draw(st.integers(1, 3))
    grid = draw(st.integers(1, 4))
    cfg = ConvMixerConfig(
        dim=draw(st.sampled_from([8, 12, 16])),
        depth=draw(st.integers(1, 2)),
        kernel_size=draw(st.integers(1, 6)),
        patch_size=p,
        num_classes=draw(st.integers(2, 5)),
        image_size=p * grid,
        channels=c,
        gelu_approximate=draw(st.booleans()),
        depthwise_impl=impl,
        activation=draw(st.sampled_from(["gelu", "relu"])),
    )
    return cfg, draw(st.integers(1, 3)), draw(st.integers(0, 2**31))


def images_for(cfg, n, seed):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (n, cfg.image_size, cfg.image_size, cfg.channels)).astype(np.float32)


# ---------------------------------------------------------------- depthwise formulations


def depthwise_by_hand(x, kernel):
    """Stride-1 'same' cross-correlation, channel-major x (C, h, w, N); low padding (k-1)//2."""
    c, h, w, n = x.shape
    k = kernel.shape[0]
    lo = (k - 1) // 2
    y = np.zeros_like(x, dtype=np.float64)
    for di in range(k):
        for dj in range(k):
            for ho in range(h):
                for wo in range(w):
                    hi, wi = ho + di - lo, wo + dj - lo
                    if 0 <= hi < h and 0 <= wi < w:
                        y[:, ho, wo, :] += x[:, hi, wi, :] * kernel[di, dj, 0, :, None]
    return y


@pytest.mark.parametrize(
    "k,h,w", [(1, 3, 2), (2, 1, 1), (2, 4, 5), (3, 4, 5), (4, 3, 2), (5, 2, 4)]
)
def test_depthwise_impls_equal_hand_computation(k, h, w):
    rng = np.random.default_rng(k * 100 + h * 10 + w)
    x = rng.normal(size=(3, h, w, 2)).astype(np.float32)
    kernel = rng.normal(size=(k, k, 1, 3)).astype(np.float32)
    want = depthwise_by_hand(x.astype(np.float64), kernel.astype(np.float64))
    for impl in ("toeplitz", "shift", "conv"):
        got = np.asarray(depthwise(jnp.asarray(x), jnp.asarray(kernel), impl))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=impl)
    with pytest.raises(ValueError):
        depthwise(jnp.asarray(x), jnp.asarray(kernel), "fft")


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_auto_depthwise_rule(backend):
    # Grids up to 8 x 8 use the dense matrices everywhere (measured fastest on CPU and
    # on an H200); larger ones shifts (measured on CPU for timm's 16 x 16 and 32 x 32
    # grids, benchmarks/depthwise_grids.py); explicit choices stand.
    assert resolve_depthwise_impl("auto", (8, 8), backend) == "toeplitz"
    assert resolve_depthwise_impl("auto", (4, 16), backend) == "toeplitz"
    assert resolve_depthwise_impl("auto", (16, 16), backend) == "shift"
    assert resolve_depthwise_impl("auto", (32, 32), backend) == "shift"
    for impl in ("toeplitz", "shift", "conv"):
        assert resolve_depthwise_impl(impl, (32, 32), backend) == impl


@given(st.integers(1, 7), st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**31))
@settings(max_examples=10, deadline=None, database=None)
def test_toeplitz_matrices_match_hand_built_and_conv_gradient(k, h, w, seed):
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(k, k, 1, 2)).astype(np.float32)
    lo = (k - 1) // 2
    want = np.zeros((2, h * w, h * w), np.float32)
    for ho in range(h):
        for wo in range(w):
            for hi in range(h):
                for wi in range(w):
                    di, dj = hi - ho + lo, wi - wo + lo
                    if 0 <= di < k and 0 <= dj < k:
                        want[:, ho * w + wo, hi * w + wi] = kernel[di, dj, 0, :]
    got = np.asarray(toeplitz_matrices(jnp.asarray(kernel), h, w))
    np.testing.assert_array_equal(got, want)
    # The kernel gradient through the dense form equals the grouped conv's.
    x = jnp.asarray(rng.normal(size=(2, h, w, 3)).astype(np.float32))
    cot = jnp.asarray(rng.normal(size=(2, h, w, 3)).astype(np.float32))
    grads = {
        impl: np.asarray(
            jax.grad(lambda kk, impl=impl: jnp.sum(depthwise(x, kk, impl) * cot))(
                jnp.asarray(kernel)
            )
        )
        for impl in ("toeplitz", "conv")
    }
    np.testing.assert_allclose(grads["toeplitz"], grads["conv"], rtol=0, atol=1e-4)


def test_even_kernel_padding_is_asymmetric_like_lax_same():
    # k = 2: output (ho) sees inputs ho and ho + 1 (low pad 0, high pad 1).
    x = np.zeros((1, 3, 1, 1), np.float32)
    x[0, :, 0, 0] = [1.0, 10.0, 100.0]
    kernel = np.zeros((2, 2, 1, 1), np.float32)
    kernel[0, 0, 0, 0] = 1.0  # tap (0, 0): the same position
    kernel[1, 0, 0, 0] = 2.0  # tap (1, 0): one row below
    for impl in ("toeplitz", "shift", "conv"):
        y = np.asarray(depthwise(jnp.asarray(x), jnp.asarray(kernel), impl))[0, :, 0, 0]
        np.testing.assert_allclose(y, [1 + 20, 10 + 200, 100], err_msg=impl)


@given(configs())
@settings(max_examples=5, deadline=None, database=None)
def test_three_depthwise_impls_give_same_logits(case):
    cfg, n, seed = case
    x = images_for(cfg, n, seed)
    variables = random_variables(ConvMixer(cfg), x, seed)
    logits = {}
    for impl in ("toeplitz", "shift", "conv"):
        model = ConvMixer(dataclasses.replace(cfg, depthwise_impl=impl))
        logits[impl] = np.asarray(jax.jit(model.apply)(variables, x))
        assert logits[impl].shape == (n, cfg.num_classes) and logits[impl].dtype == np.float32
    np.testing.assert_allclose(logits["shift"], logits["toeplitz"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(logits["conv"], logits["toeplitz"], rtol=0, atol=1e-5)


def random_stems(variables, k, seed):
    """K random stem kernels and biases shaped like ``variables``' stem:
    ((K, P, P, C, d), (K, d))."""
    rng = np.random.default_rng(seed)
    stem = variables["params"]["stem"]
    return (
        rng.normal(size=(k,) + stem["kernel"].shape).astype(np.float32),
        rng.normal(size=(k,) + stem["bias"].shape).astype(np.float32),
    )


@given(configs(), st.integers(1, 4))
@settings(max_examples=5, deadline=None, database=None)
def test_stems_equal_one_model_per_stem(case, k):
    """apply(stems=(K kernels, K biases)) == K separate models, key-major rows."""
    cfg, n, seed = case
    x = images_for(cfg, n, seed)
    model = ConvMixer(cfg)
    variables = random_variables(model, x, seed)
    kernels, biases = random_stems(variables, k, seed)
    got = np.asarray(
        jax.jit(lambda v, x, s: model.apply(v, x, stems=s))(variables, x, (kernels, biases))
    )
    assert got.shape == (k * n, cfg.num_classes)
    for i in range(k):
        vi = {
            **variables,
            "params": {**variables["params"], "stem": {"kernel": kernels[i], "bias": biases[i]}},
        }
        want = np.asarray(jax.jit(model.apply)(vi, x))
        np.testing.assert_allclose(got[i * n : (i + 1) * n], want, rtol=0, atol=1e-4)


def test_stems_shape_is_checked():
    cfg = ConvMixerConfig(dim=8, depth=1, kernel_size=3, patch_size=2, num_classes=3, image_size=4)
    model = ConvMixer(cfg)
    x = images_for(cfg, 2, 0)
    variables = random_variables(model, x, 0)
    with pytest.raises(ValueError, match="stems must be"):
        model.apply(
            variables,
            x,
            stems=(np.zeros((2, 2, 2, 3, 8), np.float32), np.zeros((3, 8), np.float32)),
        )


# ---------------------------------------------------------------- prepared inference


@given(configs(impl="toeplitz"), st.integers(0, 3))
@settings(max_examples=6, deadline=None, database=None)
def test_prepared_inference_equals_plain_and_uses_the_matrices(case, k):
    cfg, n, seed = case
    x = images_for(cfg, n, seed)
    model = ConvMixer(cfg)
    variables = random_variables(model, x, seed)
    prepared = prepare_inference(cfg, variables)
    assert set(prepared) == {"params", "batch_stats", "prepared"} and "prepared" not in variables
    g = cfg.grid_size
    for i in range(cfg.depth):
        mat = prepared["prepared"][f"block_{i}"]["depthwise"]["matrix"]
        assert mat.shape == (cfg.dim, g * g, g * g)
    apply = jax.jit(model.apply)
    np.testing.assert_allclose(
        np.asarray(apply(prepared, x)), np.asarray(apply(variables, x)), rtol=0, atol=1e-5
    )
    # the stems path too (the weight-space wrong-key sweep)
    if k:
        stems = random_stems(variables, k, seed)
        sweep = jax.jit(lambda v, x, s: model.apply(v, x, stems=s))
        np.testing.assert_allclose(
            np.asarray(sweep(prepared, x, stems)),
            np.asarray(sweep(variables, x, stems)),
            rtol=0,
            atol=1e-4,
        )
    # the prepared matrices are what runs: zeroing them changes the logits
    zeroed = {**prepared, "prepared": jax.tree.map(jnp.zeros_like, prepared["prepared"])}
    assert np.max(np.abs(np.asarray(apply(zeroed, x)) - np.asarray(apply(variables, x)))) > 1e-6
    # images of another size than the config's fall back to building the matrices
    x2 = images_for(dataclasses.replace(cfg, image_size=2 * cfg.image_size), n, seed)
    np.testing.assert_allclose(
        np.asarray(apply(zeroed, x2)), np.asarray(apply(variables, x2)), rtol=0, atol=1e-5
    )


def test_prepared_variables_refused_for_training_and_skipped_for_other_impls():
    cfg = ConvMixerConfig(
        dim=8,
        depth=2,
        kernel_size=3,
        patch_size=2,
        num_classes=3,
        image_size=4,
        depthwise_impl="toeplitz",
    )
    model = ConvMixer(cfg)
    x = images_for(cfg, 2, 0)
    variables = random_variables(model, x, 0)
    prepared = prepare_inference(cfg, variables)
    with pytest.raises(ValueError, match="train with the plain variables"):
        model.apply(prepared, x, train=True, mutable=["batch_stats"])
    for impl in ("shift", "conv"):
        other = dataclasses.replace(cfg, depthwise_impl=impl)
        assert set(prepare_inference(other, variables)) == {"params", "batch_stats"}
    # preparing prepared variables recomputes from the current kernels
    again = prepare_inference(cfg, prepared)
    np.testing.assert_array_equal(
        np.asarray(again["prepared"]["block_1"]["depthwise"]["matrix"]),
        np.asarray(prepared["prepared"]["block_1"]["depthwise"]["matrix"]),
    )


# ---------------------------------------------------------------- independent reference


@given(configs(), st.sampled_from(["toeplitz", "shift", "conv"]))
@SETTINGS
def test_model_matches_nhwc_flax_reference(case, impl):
    cfg, n, seed = case
    cfg = dataclasses.replace(cfg, depthwise_impl=impl)
    x = images_for(cfg, n, seed)
    model = ConvMixer(cfg)
    variables = random_variables(model, x, seed)
    ref = ref_for(cfg)
    ref_vars = to_reference_variables(variables, cfg.depth)
    # our parameter layouts are exactly those of flax's Conv / BatchNorm / Dense
    assert shapes_of(ref_vars) == shapes_of(jax.eval_shape(ref.init, jax.random.key(0), x))
    got = np.asarray(jax.jit(model.apply)(variables, x))
    want = np.asarray(jax.jit(ref.apply)(ref_vars, x))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_train_mode_matches_reference_and_updates_batch_stats():
    cfg = ConvMixerConfig(
        dim=8,
        depth=2,
        kernel_size=3,
        patch_size=2,
        num_classes=4,
        image_size=8,
        channels=3,
        depthwise_impl="toeplitz",
    )
    x = images_for(cfg, 3, 0)
    model, ref = ConvMixer(cfg), ref_for(cfg)
    variables = random_variables(model, x, 1)
    ref_vars = to_reference_variables(variables, cfg.depth)

    def ours(v, x):
        return model.apply(v, x, train=True, mutable=["batch_stats"])

    def theirs(v, x):
        return ref.apply(v, x, train=True, mutable=["batch_stats"])

    logits, updates = jax.jit(ours)(variables, x)
    ref_logits, ref_updates = jax.jit(theirs)(ref_vars, x)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=0, atol=1e-4)
    new_stats = to_reference_tree(updates["batch_stats"], cfg.depth)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
        new_stats,
        ref_updates["batch_stats"],
    )
    # the statistics moved away from the given values...
    old = variables["batch_stats"]
    for name in ("stem_bn",):
        assert not np.allclose(updates["batch_stats"][name]["mean"], old[name]["mean"])
        assert not np.allclose(updates["batch_stats"][name]["var"], old[name]["var"])
    # ...by exactly momentum 0.9 toward the batch statistics of the stem output
    p = cfg.patch_size
    xn = (x - 0.5) / 0.5
    cols = xn.reshape(3, 4, p, 4, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, p * p * 3)
    stem = cols @ np.asarray(variables["params"]["stem"]["kernel"]).reshape(-1, cfg.dim)
    stem = np.asarray(jax.nn.gelu(stem + variables["params"]["stem"]["bias"], approximate=False))
    bm, bv = stem.mean(axis=0), stem.var(axis=0)
    np.testing.assert_allclose(
        updates["batch_stats"]["stem_bn"]["mean"],
        0.9 * old["stem_bn"]["mean"] + 0.1 * bm,
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        updates["batch_stats"]["stem_bn"]["var"],
        0.9 * old["stem_bn"]["var"] + 0.1 * bv,
        rtol=1e-5,
        atol=1e-5,
    )
    # train and eval differ (batch statistics vs running statistics); eval mutates nothing
    eval_logits = model.apply(variables, x, train=False)
    assert not np.allclose(np.asarray(eval_logits), np.asarray(logits), atol=1e-3)


def test_init_gives_flax_layouts():
    # eval_shape only: compiling init (its many random draws) takes seconds on a busy CPU
    cfg = ConvMixerConfig(
        dim=8, depth=1, kernel_size=3, patch_size=2, num_classes=3, image_size=4, channels=3
    )
    x = images_for(cfg, 2, 0)
    variables = jax.eval_shape(ConvMixer(cfg).init, jax.random.key(0), x)
    p = variables["params"]
    assert p["stem"]["kernel"].shape == (2, 2, 3, 8)
    assert p["block_0"]["depthwise"]["kernel"].shape == (3, 3, 1, 8)
    assert p["block_0"]["pointwise"]["kernel"].shape == (1, 1, 8, 8)
    assert p["head"]["kernel"].shape == (8, 3)
    assert set(variables["batch_stats"]["stem_bn"]) == {"mean", "var"}
    assert set(p["stem_bn"]) == {"scale", "bias"}
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))


# ---------------------------------------------------------------- config


def test_paper_preset():
    cfg = PRESETS["paper"]
    assert (cfg.dim, cfg.depth, cfg.kernel_size, cfg.patch_size) == (256, 8, 9, 4)
    assert (cfg.num_classes, cfg.image_size, cfg.channels) == (10, 32, 3)
    assert cfg.norm_mean == (0.5, 0.5, 0.5) and cfg.norm_std == (0.5, 0.5, 0.5)
    assert cfg.gelu_approximate is False
    assert cfg.grid_size == 8


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(dim=0),
        dict(depth=-1),
        dict(kernel_size=0),
        dict(patch_size=0),
        dict(num_classes=0),
        dict(image_size=0),
        dict(channels=0),
        dict(dim=8.0),
        dict(dim=True),
        dict(depth="2"),
        dict(image_size=30, patch_size=4),
        dict(image_size=32, patch_size=3),
        dict(depthwise_impl="fft"),
        dict(mean=(0.5, 0.5)),
        dict(std=(0.5,) * 4),
        dict(std=(0.5, 0.0, 0.5)),
        dict(std=(0.5, -1.0, 0.5)),
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        ConvMixerConfig(**kwargs)


def test_config_dict_round_trip_and_unknown_fields():
    cfg = ConvMixerConfig(dim=8, depth=1, mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.4])
    assert cfg.mean == (0.4, 0.5, 0.6) and isinstance(cfg.std, tuple)
    d = cfg.to_dict()
    back = ConvMixerConfig.from_dict(d)
    assert back == cfg and hash(back) == hash(cfg)
    with pytest.raises(ValueError, match="unknown"):
        ConvMixerConfig.from_dict({**d, "dropout": 0.1})
    assert ConvMixerConfig(image_size=12, patch_size=3).grid_size == 4


def test_model_rejects_images_that_do_not_fit():
    cfg = ConvMixerConfig(
        dim=8, depth=1, kernel_size=3, patch_size=2, num_classes=3, image_size=4, channels=3
    )
    model = ConvMixer(cfg)
    variables = random_variables(model, images_for(cfg, 1, 0), 0)
    with pytest.raises(ValueError):
        model.apply(variables, np.zeros((1, 4, 4, 1), np.float32))
    with pytest.raises(ValueError):
        model.apply(variables, np.zeros((1, 5, 4, 3), np.float32))


def test_timm_presets_and_activation_field():
    """The timm ImageNet presets (timm 1.0 convmixer.py) and the activation in config.json."""
    from convmixer_jax.cli.options import PRESET_NAMES
    from convmixer_jax.model.config import TIMM_NAMES
    from convmixer_jax.model.convmixer import IMAGENET_MEAN, IMAGENET_STD, PRESETS

    assert PRESET_NAMES == list(PRESETS)  # the CLI reads them from the JAX-free registry
    assert TIMM_NAMES[:3] == (
        "convmixer_768_32",
        "convmixer_1536_20",
        "convmixer_1024_20_ks9_p14",
    )
    shapes = {
        name: (c.dim, c.depth, c.kernel_size, c.patch_size, c.activation)
        for name, c in PRESETS.items()
        if c.family == "convmixer"
    }
    assert shapes["convmixer_768_32"] == (768, 32, 7, 7, "relu")
    assert shapes["convmixer_1536_20"] == (1536, 20, 9, 7, "gelu")
    assert shapes["convmixer_1024_20_ks9_p14"] == (1024, 20, 9, 14, "gelu")
    for name in TIMM_NAMES[:3]:
        c = PRESETS[name]
        assert (c.image_size, c.num_classes, c.mean, c.std) == (
            224,
            1000,
            IMAGENET_MEAN,
            IMAGENET_STD,
        )
    relu = ConvMixerConfig(
        dim=8, depth=1, kernel_size=3, patch_size=2, image_size=4, activation="relu"
    )
    assert ConvMixerConfig.from_dict(relu.to_dict()) == relu
    old = relu.to_dict()
    del old["activation"]  # config.json written before the field existed
    assert ConvMixerConfig.from_dict(old).activation == "gelu"
    with pytest.raises(ValueError, match="activation"):
        ConvMixerConfig(activation="tanh")
