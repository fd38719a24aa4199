"""Training the variant classifier on public natural images (a self-supervised pretext task).

Each example is a random public image, randomly flipped left-right and shifted by up to
``crop_pad`` pixels (reflect padding), under a random one of the colour variants; the
target is the variant's index. AdamW with a warm-up + cosine schedule; the step is the
package's one training step (:mod:`convmixer_jax.training.step`), with the scheduled
learning rate given to every call so that one compiled step serves every run length.
"""

from __future__ import annotations

import functools

import numpy as np

from convmixer_jax.attacks.image_prior.network import (
    ImagePrior,
    PriorConfig,
    resize_images,
    variant_net,
)
from convmixer_jax.attacks.image_prior.variants import colour_variants, variant_tables


def _optimizer(weight_decay: float):
    """AdamW without its learning rate (the step scales by the scheduled rate it is given)."""
    import optax

    return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(weight_decay))


@functools.lru_cache(maxsize=8)
def _train_step(config: PriorConfig, batch_size: int, crop_pad: int, variants, weight_decay: float):
    """The jitted ``(state, images (N, S, S, C), key, lr) -> (state, loss, correct)``, one per
    setting (the rate is an argument, so runs of other lengths or rates reuse the compiled
    step); state = {'params', 'opt_state'}."""
    import jax
    import jax.numpy as jnp

    from convmixer_jax.training.step import integer_cross_entropy, make_train_step

    negs, orders = (jnp.asarray(t) for t in variant_tables(variants))

    def batch(state, images, key):
        """A random batch: images (N, S, S, C) uint8 or float in [0, 1] -> x (B, S, S, C)
        float in [0, 1], y (B,) variant index."""
        k_idx, k_var, k_flip, k_dy, k_dx = jax.random.split(key, 5)
        idx = jax.random.randint(k_idx, (batch_size,), 0, images.shape[0])
        x = images[idx]
        x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
        s = x.shape[1]
        flip = jax.random.bernoulli(k_flip, 0.5, (batch_size,))
        x = jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)
        if crop_pad:
            pad = ((0, 0), (crop_pad, crop_pad), (crop_pad, crop_pad), (0, 0))
            x = jnp.pad(x, pad, mode="reflect")
            dy = jax.random.randint(k_dy, (batch_size,), 0, 2 * crop_pad + 1)
            dx = jax.random.randint(k_dx, (batch_size,), 0, 2 * crop_pad + 1)
            rows = dy[:, None] + jnp.arange(s)[None, :]
            cols = dx[:, None] + jnp.arange(s)[None, :]
            x = x[jnp.arange(batch_size)[:, None, None], rows[:, :, None], cols[:, None, :]]
        y = jax.random.randint(k_var, (batch_size,), 0, negs.shape[0])
        x = jnp.take_along_axis(x, orders[y][:, None, None, :], axis=-1)
        x = jnp.where(negs[y][:, None, None, None], 1.0 - x, x)
        return x, y

    return make_train_step(
        variant_net(config),
        _optimizer(weight_decay),
        integer_cross_entropy,
        batch_norm=None,
        prepare=batch,
        learning_rate_argument=True,
        jit_kwargs={"donate_argnums": 0},
    )


def train_image_prior(
    public_images,
    *,
    steps: int = 1500,
    batch_size: int = 128,
    seed: int = 0,
    input_size: int = 32,
    progress: bool = True,
    config: PriorConfig | None = None,
    learning_rate: float = 3e-3,
    weight_decay: float = 0.05,
    crop_pad: int = 2,
) -> ImagePrior:
    """Train the variant classifier on public natural images (module docstring).

    Args:
      public_images: (N, H, W, C) uint8, or float in [0, 1]; resized to
        ``input_size`` x ``input_size`` (:func:`~.network.resize_images`) when they differ.
      steps, batch_size: optimizer steps and examples per step.
      seed: initialization and sampling seed.
      config: the architecture (default :class:`PriorConfig` for C channels).
      learning_rate: the peak of the schedule; weight_decay: AdamW's decoupled decay.
      crop_pad: the largest random shift in pixels, in [0, input_size).
    Returns:
      the :class:`ImagePrior` (params as NumPy arrays).
    """
    import jax
    import optax

    images = resize_images(public_images, input_size)
    if not (np.issubdtype(images.dtype, np.floating) or images.dtype == np.uint8):
        raise ValueError(f"public images must be uint8 or float in [0, 1], got {images.dtype}")
    n, _, _, c = images.shape
    if n < 1:
        raise ValueError("train_image_prior needs at least one public image")
    variants = colour_variants(c)
    config = config or PriorConfig(channels=c, num_variants=len(variants))
    if (config.channels, config.num_variants) != (c, len(variants)):
        raise ValueError(
            f"the config is for {config.channels} channels and {config.num_variants} variants; "
            f"the images have {c} channels and {len(variants)} variants"
        )
    ImagePrior(config, None, input_size, variants)  # checks the input size before any work
    if not 0 <= crop_pad < input_size:
        raise ValueError(f"crop_pad must lie in [0, {input_size}), got {crop_pad}")
    k_init, k_data = jax.random.split(jax.random.PRNGKey(seed))
    dummy = np.zeros((1, input_size, input_size, c), np.float32)
    params = variant_net(config).init(k_init, dummy)["params"]
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, max(1, steps // 20), max(steps, 2)
    )
    step = _train_step(config, int(batch_size), int(crop_pad), variants, float(weight_decay))
    state = {"params": params, "opt_state": step.init_opt_state(params)}
    device_images = jax.device_put(
        images if images.dtype == np.uint8 else images.astype(np.float32)
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="image prior", unit="step")
    try:
        for i in range(steps):
            state, loss, correct = step(
                state, device_images, jax.random.fold_in(k_data, i), np.float32(schedule(i))
            )
            if bar is not None:
                bar.update(1)
                if i % 50 == 0 or i == steps - 1:
                    acc = int(correct) / batch_size
                    bar.set_postfix(loss=f"{float(loss):.3f}", acc=f"{acc:.3f}")
    finally:
        if bar is not None:
            bar.close()
    params = jax.tree_util.tree_map(np.asarray, state["params"])
    return ImagePrior(config, params, int(input_size), variants)


__all__ = ["train_image_prior"]
