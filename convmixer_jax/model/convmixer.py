"""ConvMixer (Trockman & Kolter, "Patches Are All You Need?") in Flax Linen.

The architecture follows the locuslab reference definition::

    stem:   Conv(C -> dim, kernel P, stride P) -> GELU -> BatchNorm
    L x:    Residual(depthwise Conv k x k 'same' -> GELU -> BatchNorm)
            -> pointwise 1x1 Conv -> GELU -> BatchNorm
    head:   global average pooling -> Dense(dim -> num_classes)

Inputs are NHWC images in [0, 1]; the per-channel normalization
``(x - mean) / std`` (paper: 0.5 / 0.5) happens inside the model, so that
block-wise bit flipping of an image is a sign flip of the normalized value.

Parameters keep the standard Flax layouts so that any checkpoint can be
encrypted or converted:

- ``params['stem']['kernel']``: (P, P, C, dim), HWIO; viewed as a matrix
  (P*P*C, dim) its rows are in (row, column, channel) order, channel fastest,
  the block flattening of ``docs/method.md``.
- ``params['block_i']['depthwise']['kernel']``: (k, k, 1, dim), as
  ``nn.Conv(feature_group_count=dim)``.
- ``params['block_i']['pointwise']['kernel']``: (1, 1, dim, dim).

Internally activations are kept channel-major with the batch fastest, shape
(dim, h, w, N), so the 1x1 convolutions and the dense depthwise form are
plain (batched) matrix products with no activation transposes.  The depthwise
convolution has three exact formulations (see :func:`depthwise`), chosen by grid
size by ``depthwise_impl='auto'``: XLA's grouped convolution is many times slower
than PyTorch's, on CPU and on GPU, while a per-channel dense (Toeplitz) matrix built
from the same k x k kernel runs at matrix-product speed while the grid is small.
The measurements behind these choices, and behind the XLA:CPU details noted in the
code below, are in ``docs/design.md`` ("Speed") and ``benchmarks/README.md``.

The architecture's data (:class:`ConvMixerConfig`, ``PRESETS`` and the constants)
live in :mod:`convmixer_jax.model.config`, which imports no JAX; they are re-exported here.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from convmixer_jax.model.config import (
    ACTIVATIONS,
    DEPTHWISE_IMPLS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    ConvMixerConfig,
)
from convmixer_jax.scheme.blocks import to_blocks

PREPARED = "prepared"  # variable collection of prepare_inference()


def same_padding(kernel_size: int) -> tuple[int, int]:
    """(low, high) padding of a stride-1 'same' convolution (as lax and PyTorch)."""
    total = kernel_size - 1
    return total // 2, total - total // 2


def toeplitz_matrices(kernel: jax.Array, h: int, w: int) -> jax.Array:
    """Per-channel dense matrices of a stride-1 'same' depthwise convolution.

    Args:
      kernel: (k, k, 1, C), the layout of ``nn.Conv(feature_group_count=C)``.
      h, w: the spatial grid.
    Returns:
      (C, h*w, h*w): entry [c, q, p] is ``kernel[hi - ho + lo, wi - wo + lo, 0, c]``
      for output q = (ho, wo) and input p = (hi, wi) when that tap exists, else 0
      (lo = the low 'same' padding), so ``y[c] = mat[c] @ x[c]`` with x flattened
      row-major over (h, w).

    The matrix is assembled from static slices of the zero-padded kernel (one
    window of the kernel per output row and column), pure data movement whose
    gradient is a sum of the same windows: several times cheaper on XLA:CPU than
    a product with a one-hot (k*k, hw, hw) tensor, forward and backward
    (``docs/design.md``, "Speed").
    """
    k, _, _, c = kernel.shape
    lo, _ = same_padding(k)
    # Offset a = hi - ho + lo spans [lo - (h-1), lo + h - 1]; pad the kernel so
    # every offset indexes a row (zero where the tap does not exist).
    pad_h = (max(0, h - 1 - lo), max(0, lo + h - k))
    pad_w = (max(0, w - 1 - lo), max(0, lo + w - k))
    kp = jnp.pad(jnp.moveaxis(kernel[:, :, 0, :], -1, 0), ((0, 0), pad_h, pad_w))  # (C, kh', kw')
    # Rows: r[c, ho, hi, :] = kp[c, lo + pad - ho + hi, :].
    rows = jnp.stack(
        [kp[:, lo + pad_h[0] - ho : lo + pad_h[0] - ho + h, :] for ho in range(h)], axis=1
    )
    # Columns: m[c, ho, hi, wo, wi] = rows[c, ho, hi, lo + pad - wo + wi].
    mat = jnp.stack(
        [rows[..., lo + pad_w[0] - wo : lo + pad_w[0] - wo + w] for wo in range(w)], axis=3
    )
    return mat.transpose(0, 1, 3, 2, 4).reshape(c, h * w, h * w)


def resolve_depthwise_impl(impl: str, grid: tuple[int, int], backend: str | None = None) -> str:
    """Pick the depthwise formulation: dense per-channel matrices for grids of at
    most 8 x 8 = 64 positions, shifted multiply-adds for larger ones, on every backend.

    The rule follows the measurements of ``benchmarks/depthwise_impls.py`` and
    ``benchmarks/depthwise_grids.py`` on CPU and on an NVIDIA H200 (tables in
    ``docs/design.md``, "Speed"): on small grids the matrices are the fastest
    formulation and the grouped convolution the slowest; on timm's 16 x 16 and
    32 x 32 grids the matrices cost more time and far more memory than shifts."""
    if impl != "auto":
        return impl
    if grid[0] * grid[1] <= 64:
        return "toeplitz"
    return "shift"


def depthwise(x: jax.Array, kernel: jax.Array, impl: str) -> jax.Array:
    """Stride-1 'same' depthwise cross-correlation in channel-major layout.

    Args:
      x: (C, h, w, N) activations.
      kernel: (k, k, 1, C), the layout of ``nn.Conv(feature_group_count=C)``.
      impl: 'toeplitz' | 'shift' | 'conv'; all compute the same function.
    Returns:
      (C, h, w, N).
    """
    c, h, w, n = x.shape
    k = kernel.shape[0]
    if impl == "toeplitz":
        return depthwise_with_matrices(x, toeplitz_matrices(kernel.astype(x.dtype), h, w))
    if impl == "shift":
        taps = kernel.reshape(k * k, c)  # (k*k, C), tap-major
        lo, hi = same_padding(k)
        xp = jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
        y = jnp.zeros_like(x)
        for di in range(k):
            for dj in range(k):
                y = y + xp[:, di : di + h, dj : dj + w, :] * taps[di * k + dj][:, None, None, None]
        return y
    if impl == "conv":
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(1, 1),
            padding="SAME",
            dimension_numbers=("CHWN", "HWIO", "CHWN"),
            feature_group_count=c,
        )
    raise ValueError(f"unknown depthwise implementation {impl!r}; use one of {DEPTHWISE_IMPLS}")


def depthwise_with_matrices(x: jax.Array, mat: jax.Array) -> jax.Array:
    """Depthwise convolution given its dense matrices (:func:`toeplitz_matrices`).

    x: (C, h, w, N); mat: (C, h*w, h*w) -> (C, h, w, N).
    """
    c, h, w, n = x.shape
    y = jnp.einsum("cqp,cpn->cqn", mat.astype(x.dtype), x.reshape(c, h * w, n))
    return y.reshape(c, h, w, n)


class ChannelBatchNorm(nn.Module):
    """BatchNorm over every axis but the first (channel-major activations).

    Variables match ``nn.BatchNorm``: params ``scale``/``bias``, batch_stats
    ``mean``/``var``; momentum 0.9 and eps 1e-5 as PyTorch's defaults.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[0]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        bshape = (c,) + (1,) * (x.ndim - 1)
        if train:
            # Statistics as matrix-vector products with a constant 1/M vector:
            # XLA:CPU splits a plain mean over (h, w, N) into a slow
            # reduce-window pass (a measurable share of a training step,
            # docs/design.md "Speed"); the product runs at memory speed.
            xf = x.reshape(c, -1)  # (C, M)
            inv_m = jnp.full((xf.shape[1],), 1.0 / xf.shape[1], x.dtype)
            mean = xf @ inv_m
            var = jnp.square(xf - mean[:, None]) @ inv_m
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * mean
                ra_var.value = m * ra_var.value + (1 - m) * var
        else:
            mean, var = ra_mean.value, ra_var.value
        mul = scale * jax.lax.rsqrt(var + self.epsilon)
        return x * mul.reshape(bshape) + (bias - mean * mul).reshape(bshape)


def gelu(x: jax.Array, approximate: bool = False) -> jax.Array:
    """GELU. Exact form ``x * Phi(x)`` written with ``erf`` (as PyTorch), which
    XLA:CPU evaluates in one fused loop; ``jax.nn.gelu`` uses ``erfc``, which
    XLA splits into several passes over memory."""
    if approximate:
        return nn.gelu(x, approximate=True)
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.float32(1.0 / np.sqrt(2.0))))


def add_channel_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """``y + bias`` per channel for channel-major ``y`` (C, ...).

    The barrier keeps XLA:CPU from fusing the add into the library matrix
    product, which materializes the broadcast bias (a full extra pass over
    memory); left outside, the add fuses into the following GELU loop.
    """
    y = jax.lax.optimization_barrier(y)
    return y + bias.reshape((-1,) + (1,) * (y.ndim - 1))


def torch_like_conv_init(fan_in: int):
    """PyTorch's default Conv/Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class PatchEmbed(nn.Module):
    """Conv(C -> dim, kernel P, stride P) as a matrix product over blocks.

    ``x``: (N, H, W, C) normalized images -> (dim, H/P, W/P, N).
    The kernel is stored as (P, P, C, dim) (HWIO), so ``kernel.reshape(P*P*C, dim)``
    is the matrix E of the paper with rows in block-flattening order.
    """

    patch_size: int
    dim: int

    @nn.compact
    def __call__(self, x: jax.Array, stems: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        n, h, w, c = x.shape
        p = self.patch_size
        pb = p * p * c
        kernel = self.param("kernel", torch_like_conv_init(pb), (p, p, c, self.dim), jnp.float32)
        bias = self.param("bias", torch_like_conv_init(pb), (self.dim,), jnp.float32)
        gh, gw = h // p, w // p
        # (pb, gh * gw * N): one column per block, rows in block order k = (i*P + j)*C + c.
        cols = to_blocks(x, p).transpose(3, 1, 2, 0).reshape(pb, -1)
        if stems is None:
            e_t = jax.lax.optimization_barrier(kernel.reshape(pb, self.dim).T)  # (dim, pb)
            y = (e_t @ cols).reshape(self.dim, gh, gw, n)
            return add_channel_bias(y, bias)
        kernels, biases = stems  # (K, P, P, C, dim), (K, dim)
        k = kernels.shape[0]
        e_t = jax.lax.optimization_barrier(
            jnp.swapaxes(kernels.reshape(k, pb, self.dim), 1, 2)
        )  # (K, dim, pb)
        y = jnp.einsum("kdp,pm->kdm", e_t, cols)  # one product for all K kernels
        y = jax.lax.optimization_barrier(y.reshape(k, self.dim, gh * gw, n))
        y = y + biases.reshape(k, self.dim, 1, 1)
        # key-major batch: (dim, gh, gw, K * N), entry k * N + i is image i under kernel k.
        return y.transpose(1, 2, 0, 3).reshape(self.dim, gh, gw, k * n)


def activation_fn(activation: str, gelu_approximate: bool = False):
    """The elementwise activation of a ConvMixer: exact (or tanh) GELU, or ReLU."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation == "relu":
        return nn.relu
    return functools.partial(gelu, approximate=gelu_approximate)


class MixerBlock(nn.Module):
    """Residual(depthwise -> act -> BN) -> pointwise -> act -> BN, act GELU or ReLU.

    ``x``: (dim, h, w, N) -> (dim, h, w, N).
    """

    kernel_size: int
    impl: str
    gelu_approximate: bool = False
    activation: str = "gelu"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        act = activation_fn(self.activation, self.gelu_approximate)
        y = DepthwiseConv(self.kernel_size, self.impl, name="depthwise")(x, train)
        y = ChannelBatchNorm(name="depthwise_bn")(act(y), train)
        x = x + y
        x = PointwiseConv(name="pointwise")(x)
        return ChannelBatchNorm(name="pointwise_bn")(act(x), train)


class DepthwiseConv(nn.Module):
    """Depthwise k x k 'same' conv with bias; kernel (k, k, 1, dim).

    With the 'toeplitz' formulation, a ``prepared`` variable ``matrix``
    (see :func:`prepare_inference`) of the right shape replaces building the
    dense matrices from the kernel on every call (inference only).
    """

    kernel_size: int
    impl: str

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        d, h, w, _ = x.shape
        k = self.kernel_size
        kernel = self.param("kernel", torch_like_conv_init(k * k), (k, k, 1, d), jnp.float32)
        bias = self.param("bias", torch_like_conv_init(k * k), (d,), jnp.float32)
        if self.has_variable(PREPARED, "matrix"):
            if train:
                raise ValueError(
                    "variables from prepare_inference() hold precomputed depthwise matrices that "
                    "would not follow the kernel during training; train with the plain variables"
                )
            mat = self.get_variable(PREPARED, "matrix")
            if self.impl == "toeplitz" and mat.shape == (d, h * w, h * w):
                return add_channel_bias(depthwise_with_matrices(x, mat), bias)
        return add_channel_bias(depthwise(x, kernel, self.impl), bias)


class PointwiseConv(nn.Module):
    """1x1 conv with bias as a matrix product; kernel (1, 1, dim_in, dim_out)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[0]
        kernel = self.param("kernel", torch_like_conv_init(d), (1, 1, d, d), jnp.float32)
        bias = self.param("bias", torch_like_conv_init(d), (d,), jnp.float32)
        # XLA:CPU runs a dot whose left operand is contracted on its first axis
        # markedly slower; materialize the (tiny) transposed weight instead of
        # letting the transpose fold back into the dot.
        w_t = jax.lax.optimization_barrier(kernel[0, 0].T)  # (out, in)
        # A 2-D product over the flattened (h, w, N) axis: its weight gradient
        # then needs a 2-D transpose of the activations, which XLA:CPU does
        # far faster than the 4-D one of an einsum over 'ihwn' (a faster
        # training step, docs/design.md "Speed").
        y = (w_t @ x.reshape(d, -1)).reshape(x.shape)
        return add_channel_bias(y, bias)


class ConvMixer(nn.Module):
    """ConvMixer as a Flax Linen module: ``apply(variables, images, train=...)``.

    ``images``: (N, H, W, C) float in [0, 1] with H = W = config.image_size.
    Returns logits (N, num_classes) float32.

    ``stems=(kernels, biases)``, shapes (K, P, P, C, dim) and (K, dim),
    replaces the patch embedding by K alternatives evaluated on the same
    images in one pass (the weight-space wrong-key sweep): the logits are then
    (K * N, num_classes), key-major (row k * N + i is image i under stem k);
    the model's own stem parameters are not used.  The K x N evaluations share
    one batch, so with ``train=True`` BatchNorm statistics pool over all of them.
    """

    config: ConvMixerConfig

    @nn.compact
    def __call__(
        self,
        images: jax.Array,
        *,
        train: bool = False,
        stems: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array:
        cfg = self.config
        x = normalize_input(cfg, images)
        _, h, w, c = images.shape
        p, d = cfg.patch_size, cfg.dim
        gh, gw = h // p, w // p
        impl = resolve_depthwise_impl(cfg.depthwise_impl, (gh, gw))

        # Stem: the patch embedding as one matrix product over flattened blocks.
        if stems is not None:
            kernels, biases = stems
            kk = kernels.shape[0]
            if kernels.shape != (kk, p, p, c, d) or biases.shape != (kk, d):
                raise ValueError(
                    f"stems must be kernels (K, {p}, {p}, {c}, {d}) and biases (K, {d}); "
                    f"got {kernels.shape} and {biases.shape}"
                )
        x = PatchEmbed(p, d, name="stem")(x, stems)  # (d, gh, gw, N), or (d, gh, gw, K * N)
        return after_stem(cfg, x, impl, train)


def normalize_input(cfg: ConvMixerConfig, images: jax.Array) -> jax.Array:
    """(N, H, W, C) in [0, 1] -> ``(x - mean) / std`` in float32 with the config's normalization;
    refuses images whose channels or size do not fit the model."""
    _, h, w, c = images.shape
    p = cfg.patch_size
    if c != cfg.channels or h % p or w % p:
        raise ValueError(
            f"images of shape {images.shape} do not fit this model (channels {cfg.channels}, "
            f"height and width divisible by patch size {p})"
        )
    mean = jnp.asarray(cfg.norm_mean, jnp.float32)
    std = jnp.asarray(cfg.norm_std, jnp.float32)
    return (images.astype(jnp.float32) - mean) / std


def after_stem(cfg: ConvMixerConfig, x: jax.Array, impl: str, train: bool) -> jax.Array:
    """Everything after the patch embedding, (dim, gh, gw, N) -> logits (N, classes).

    Call it inside a compact ``__call__``: its submodules (``stem_bn``, ``block_i``, ``head``)
    become the caller's, under those names.
    """
    d = cfg.dim
    x = activation_fn(cfg.activation, cfg.gelu_approximate)(x)
    x = ChannelBatchNorm(name="stem_bn")(x, train)
    for i in range(cfg.depth):
        x = MixerBlock(
            cfg.kernel_size, impl, cfg.gelu_approximate, cfg.activation, name=f"block_{i}"
        )(x, train)
    pooled = jnp.mean(x, axis=(1, 2))  # (d, N)
    head = nn.Dense(
        cfg.num_classes,
        name="head",
        kernel_init=torch_like_conv_init(d),
        bias_init=torch_like_conv_init(d),
    )
    return head(pooled.T)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _depthwise_matrices(kernels: tuple, h: int, w: int) -> tuple:
    return tuple(toeplitz_matrices(kernel, h, w) for kernel in kernels)


def prepare_inference(config: ConvMixerConfig, variables: dict) -> dict:
    """Variables for repeated inference: the dense depthwise matrices computed once.

    With the 'toeplitz' depthwise formulation every call would otherwise
    rebuild a (dim, h*w, h*w) matrix per block from its k x k kernel (on CPU a
    noticeable share of an inference step: ``docs/design.md``, "Prepared inference").
    Returns a new dict: ``variables`` plus a ``"prepared"`` collection with one
    ``matrix`` per block, used by ``apply(..., train=False)`` for images of
    ``config.image_size``; other sizes and other formulations build as usual,
    and ``train=True`` refuses prepared variables.  Nothing changes if the
    formulation for this backend is not 'toeplitz'.  Prepared variables
    belong in memory only: prepare again after any change of the depthwise
    kernels, and save the plain variables.

    Args:
      config: the model's architecture.
      variables: {"params": ..., "batch_stats": ...} of a ConvMixer of ``config``.
    Returns:
      dict with the same collections plus "prepared" (when it applies).
    """
    g = config.grid_size
    out = {name: value for name, value in variables.items() if name != PREPARED}
    if getattr(config, "family", "convmixer") != "convmixer":  # a ViT: nothing to prepare
        return out
    if resolve_depthwise_impl(config.depthwise_impl, (g, g)) != "toeplitz":
        return out
    params = variables["params"]
    names = [f"block_{i}" for i in range(config.depth)]
    kernels = tuple(jnp.asarray(params[name]["depthwise"]["kernel"], jnp.float32) for name in names)
    mats = _depthwise_matrices(kernels, g, g)
    out[PREPARED] = {
        name: {"depthwise": {"matrix": m}} for name, m in zip(names, mats, strict=True)
    }
    return out


__all__ = [
    # the architecture's data, from convmixer_jax.model.config
    "ACTIVATIONS",
    "DEPTHWISE_IMPLS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "ConvMixerConfig",
    # the model
    "PREPARED",
    "ConvMixer",
    "PatchEmbed",
    "MixerBlock",
    "DepthwiseConv",
    "PointwiseConv",
    "ChannelBatchNorm",
    "after_stem",
    "normalize_input",
    "activation_fn",
    "gelu",
    "add_channel_bias",
    "torch_like_conv_init",
    "same_padding",
    "toeplitz_matrices",
    "depthwise",
    "depthwise_with_matrices",
    "resolve_depthwise_impl",
    "prepare_inference",
]
