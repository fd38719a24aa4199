"""The fine-tuning attack: can an adversary without the key repair the encrypted model?

Threat: the adversary holds the *encrypted* model (its patch-embedding
rows permuted and sign-flipped with the secret key and, for a ViT encrypted with a key
that scrambles blocks, the patch rows of its position embedding permuted by the block
key; everything else the plain trained model) and ``n`` labeled *plain* images. On
plain images the encrypted model is near chance. The adversary fine-tunes

- ``'stem'``: the part of the model the key transforms, every other parameter frozen.
  On a ConvMixer that is the patch embedding only (``params['stem']`` kernel and bias),
  every BatchNorm running statistic frozen and every BatchNorm run in eval mode, so the
  network trained is exactly the network deployed. ``stem_bn=True`` also trains the
  stem BatchNorm (``params['stem_bn']`` scale and bias) and runs that one BatchNorm in
  train mode (its running statistics are updated); all other BatchNorms stay frozen in
  eval mode. On a ViT it is the patch embedding (``params['patch_embed']`` kernel and
  bias) *and* the position embedding (``params['pos_embed']``, all its rows, the class
  token's included): the block key lives in the order of the position embedding's patch
  rows, so the patch embedding alone cannot undo it (it sees one block at a time and
  does not know where the block lies), while the two together hold the exact repair
  (the decrypted kernel and the unpermuted rows). The class token, the transformer
  blocks, the norms and the head stay frozen; a ViT has no BatchNorm.
- ``'all'``: every parameter, every BatchNorm in train mode (ordinary fine-tuning).
- ``'scratch'``: the same architecture from a fresh initialization
  (:func:`~convmixer_jax.training.loop.init_variables` with ``seed``), trained like ``'all'``,
  the reference that tells whether the encrypted model helped at all.

Accuracy is measured on plain test images. The true repair is known to exist in
the ``'stem'`` search space (the key's signed permutation of the kernel rows, and for a
ViT the block key's permutation of the position rows), so ``'stem'`` is the attack that
exploits the scheme's structure.

Training (all modes): the package's one training step (:mod:`convmixer_jax.training.step`)
with Adam (``optax.scale_by_adam``) after global-norm gradient clipping; the layers that
are not trained are frozen by an optax mask and enter the loss through ``stop_gradient``,
so they cost no weight gradients and come out bitwise unchanged. A host-side
learning-rate schedule (linear warm-up over ``warmup_fraction`` of the steps, then cosine
decay to 0) is fed to the jit-compiled step as an argument, so a step function is
compiled once per (model, mode, batch shape) and reused for every ``n`` and learning rate.
Both model families take the same steps, batches, schedule and default peak learning
rates (:data:`DEFAULT_LR`).
Batches of a fixed size are read from a seeded stream of shuffled passes over the ``n``
images, so ``n`` smaller than the batch size simply repeats images within a batch (each
image equally often); on-device augmentation is
:func:`~convmixer_jax.training.loop.augment_batch` (default random crop and horizontal flip).

Default budget: the grid of :func:`finetune_attack` (``DEFAULT_SIZES``, three modes) takes
:func:`default_steps` steps of batch 64 per mode and n, plus one evaluation of the test
images per run; its cost is that of the model's training step (a 'stem' step costs less
than an 'all' step, since frozen layers need no weight gradients), measured per machine in
``benchmarks/README.md``, and the report records each run's seconds (``runs`` of the
result; ``docs/security.md`` describes the measured runs). On a GPU, scale up with
``steps=`` (an int, a mapping n -> steps, or a function of n).
"""

from __future__ import annotations

import functools
import io
import math
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from convmixer_jax.model.build import build_model, collections, has_batch_norm
from convmixer_jax.model.build import init_variables_abstract as abstract_init
from convmixer_jax.model.config import ConvMixerConfig, ViTConfig
from convmixer_jax.model.inference import accuracy, check_model_images
from convmixer_jax.scheme.images import ImageError
from convmixer_jax.training.loop import augment_batch, init_variables
from convmixer_jax.training.recipes import TrainConfig
from convmixer_jax.training.step import (
    TrainStep,
    make_train_step,
    one_hot_cross_entropy,
    top_level_mask,
)

PyTree = Any

MODES = ("stem", "all", "scratch")
DEFAULT_SIZES = (100, 500, 1000, 5000)
DEFAULT_BATCH_SIZE = 64
# Peak learning rates of the warm-up + cosine schedule, per mode. 'stem' moves a
# small, badly placed layer a long way (trained stem entries are O(0.1); on the
# paper's model, n = 500, 30 steps: 0.27 test accuracy at 1e-2, 0.38 at 3e-2);
# 'all' must not wreck the trained body; 'scratch' is a short from-scratch schedule.
# The same rates suit the vit_cifar ViT (its epoch-4 checkpoint in results/cifar10-vit,
# 0.516 on 500 test images; one key with block scrambling, n = 1,000, 100 steps): 'stem'
# reached 0.318 / 0.356 / 0.392 / 0.274 at 3e-3 / 1e-2 / 3e-2 / 1e-1, 'all' 0.320 / 0.350
# at 3e-4 / 1e-3.
#: Peak learning rate of each mode's warm-up + cosine schedule.
DEFAULT_LR = {"stem": 3e-2, "all": 1e-3, "scratch": 3e-3}
DEFAULT_AUGMENT = ("crop", "flip")
#: What ``'stem'`` trains, by model family: the top-level parameters the key transforms.
STEM_PARAMS = {"convmixer": ("stem",), "vit": ("patch_embed", "pos_embed")}
STEM_BN = "stem_bn"


def _family(config) -> str:
    return getattr(config, "family", "convmixer")


def default_steps(n: int) -> int:
    """Training steps (batch 64) for ``n`` images: ``round(50 * (n / 100) ** 0.3)``,
    at least 10; 50, 81, 100, 162 for n = 100, 500, 1000, 5000."""
    return max(10, int(round(50 * (n / 100) ** 0.3)))


def lr_schedule(step: int, total: int, peak: float, warmup_fraction: float = 0.1) -> float:
    """Learning rate of ``step`` (0-based) of ``total``: linear warm-up over
    ``ceil(warmup_fraction * total)`` steps to ``peak``, then cosine decay towards 0
    (every step's rate is > 0)."""
    warm = int(math.ceil(warmup_fraction * total)) if warmup_fraction > 0 else 0
    if step < warm:
        return peak * (step + 1) / warm
    rest = total - warm
    return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warm) / rest))


# --------------------------------------------------------------------------- checks


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown fine-tuning mode {mode!r}; use one of {MODES}")


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_labels(config: ConvMixerConfig | ViTConfig, images, labels) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(
            f"labels must be a vector with one entry per image; got shape {labels.shape} "
            f"for {len(images)} images"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if len(labels) and (labels.min() < 0 or labels.max() >= config.num_classes):
        raise ValueError(
            f"labels must lie in 0..{config.num_classes - 1} (the model has "
            f"{config.num_classes} classes); found {labels.min()}..{labels.max()}"
        )
    return labels.astype(np.int32)


def _check_data(
    config: ConvMixerConfig | ViTConfig, images, labels, what: str
) -> tuple[np.ndarray, np.ndarray]:
    try:
        check_model_images(config, images)
    except ImageError as e:
        raise ImageError(f"{what} images: {e}") from None
    if len(images) == 0:
        raise ValueError(f"no {what} images")
    return np.asarray(images), _check_labels(config, images, labels)


def _check_variables(config: ConvMixerConfig | ViTConfig, variables) -> None:
    """Raise ValueError unless ``variables`` has the tree and shapes of ``config``."""
    wanted = collections(config)
    if not isinstance(variables, Mapping) or set(variables) != set(wanted):
        got = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
        names = ", ".join(f"'{name}'" for name in wanted)
        raise ValueError(f"variables must be {{{names}}}, got {got}")
    expected = jax.eval_shape(lambda: abstract_init(config))
    exp = {
        jax.tree_util.keystr(p): leaf
        for p, leaf in jax.tree_util.tree_flatten_with_path(
            {name: expected[name] for name in wanted}
        )[0]
    }
    got = {
        jax.tree_util.keystr(p): leaf
        for p, leaf in jax.tree_util.tree_flatten_with_path(dict(variables))[0]
    }
    if set(exp) != set(got):
        missing, extra = sorted(set(exp) - set(got)), sorted(set(got) - set(exp))
        raise ValueError(
            f"variables do not belong to this model config (missing {missing[:3]}, "
            f"unexpected {extra[:3]})"
        )
    for name, leaf in exp.items():
        if tuple(np.shape(got[name])) != tuple(leaf.shape):
            raise ValueError(
                f"variables{name} has shape {tuple(np.shape(got[name]))} but the model "
                f"config implies {tuple(leaf.shape)}; the variables belong to another model"
            )


def _augment_tuple(augment) -> tuple[str, ...]:
    if augment is True:
        return DEFAULT_AUGMENT
    if augment is False or augment is None:
        return ()
    aug = tuple(augment)
    TrainConfig(augment=aug)  # validates the names
    return aug


# --------------------------------------------------------------------------- the step


@functools.lru_cache(maxsize=32)
def _train_step(
    config: ConvMixerConfig | ViTConfig,
    train_params: frozenset | None,
    train_bn: frozenset | None,
    augment: tuple[str, ...],
    cutout: int,
    grad_clip: float | None,
    label_smoothing: float,
) -> TrainStep:
    """The jit-compiled step of one setting (:mod:`convmixer_jax.training.step`).

    train_params: top-level parameter modules that are trained (None: all; the others
    are frozen by an optax mask). train_bn: top-level modules whose BatchNorms run in
    train mode (None: all; empty: every BatchNorm in eval mode); ignored for a model
    without BatchNorm (a ViT).
    ``step(state, images, labels, lr) -> (state, loss, correct)`` where
    state = {'params', 'batch_stats' (with BatchNorm), 'opt_state', 'step', 'rng'} holds
    every variable.
    """
    aug_cfg = TrainConfig(augment=augment, cutout=cutout)
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []

    def prepare(state, images, labels):
        rng = jax.random.fold_in(state["rng"], state["step"])
        return augment_batch(rng, images, aug_cfg), labels

    if not has_batch_norm(config):
        batch_norm = None
    else:
        batch_norm = "train" if train_bn is None else train_bn or "eval"
    return make_train_step(
        build_model(config),
        optax.chain(*parts, optax.scale_by_adam()),
        one_hot_cross_entropy(config.num_classes, label_smoothing),
        trainable=None if train_params is None else top_level_mask(train_params),
        batch_norm=batch_norm,
        prepare=prepare,
        learning_rate_argument=True,
    )


def _batch_indices(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """(steps, batch_size) indices into n images: consecutive slices of a stream of
    seeded random permutations of 0..n-1 (every image used equally often)."""
    rng = np.random.default_rng([seed, n])
    need = steps * batch_size
    stream = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])[:need]
    return stream.reshape(steps, batch_size)


def _merge(given: dict, trained: dict, names: frozenset | None) -> dict:
    """``given`` with the top-level entries ``names`` (None: all) taken from ``trained``, as
    NumPy arrays."""
    return {
        k: jax.tree.map(np.array, trained[k] if names is None or k in names else v)
        for k, v in given.items()
    }


def _trained_sets(family: str, mode: str, stem_bn: bool, param_names, bn_names):
    """(trained parameter modules or None for all, train-mode BatchNorm modules or None for all)."""
    if mode == "stem":
        names = set(STEM_PARAMS[family]) | ({STEM_BN} if stem_bn else set())
        return frozenset(names & set(param_names)), frozenset(names & set(bn_names))
    return None, None


# --------------------------------------------------------------------------- public API


def finetune(
    config: ConvMixerConfig | ViTConfig,
    variables: PyTree | None,
    images,
    labels,
    *,
    mode: str,
    steps: int = 100,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float | None = None,
    seed: int = 0,
    augment: bool | Sequence[str] = True,
    stem_bn: bool = False,
    cutout: int = 8,
    grad_clip: float | None = 1.0,
    warmup_fraction: float = 0.1,
    label_smoothing: float = 0.0,
    progress=False,
) -> tuple[dict, dict]:
    """Fine-tune (or, ``mode='scratch'``, train afresh) a ConvMixer or a ViT on labeled images.

    Args:
      config: the architecture (a ConvMixer's or a ViT's config).
      variables: ``{'params', 'batch_stats'}`` of a ConvMixer, ``{'params'}`` of a ViT,
        to start from (never modified); ignored by ``'scratch'`` (may be None there).
      images: (n, H, W, C) uint8, or float in [0, 1]; H = W = config.image_size.
      labels: (n,) integers in 0..num_classes-1.
      mode: 'stem' | 'all' | 'scratch' (module docstring).
      steps, batch_size: optimizer steps of ``batch_size`` images each; n may be
        smaller than ``batch_size`` (images then repeat within a batch).
      lr: peak learning rate (None: ``DEFAULT_LR[mode]``).
      seed: batch order, augmentation, and the initialization of 'scratch'.
      augment: True (crop + flip), False, or a tuple of 'crop' / 'flip' / 'cutout'.
      stem_bn: 'stem' mode of a ConvMixer only: also train the stem BatchNorm (module
        docstring).
      progress: True for a tqdm bar, or a tqdm-like object to ``update(1)`` per step.

    Returns:
      (variables as numpy arrays, history) where the frozen leaves are copies of the
      input's, and history is JSON-serializable: mode, n, steps, batch_size, lr,
      trained / train-mode-BatchNorm module names (none for a ViT), per-step ``loss`` and
      ``train_accuracy`` (on the augmented batch), ``seconds`` (wall time,
      including compilation on the first call for a configuration) and
      ``first_step_seconds`` (the first step alone, which holds any compilation).
    """
    _check_mode(mode)
    steps = _check_positive_int("steps", steps)
    batch_size = _check_positive_int("batch_size", batch_size)
    if stem_bn and mode != "stem":
        raise ValueError("stem_bn applies to mode 'stem' only")
    if stem_bn and not has_batch_norm(config):
        raise ValueError("stem_bn applies to a ConvMixer only: a ViT has no BatchNorm")
    lr = DEFAULT_LR[mode] if lr is None else float(lr)
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not 0 <= warmup_fraction < 1:
        raise ValueError(f"warmup_fraction must lie in [0, 1), got {warmup_fraction!r}")
    aug = _augment_tuple(augment)
    images, labels = _check_data(config, images, labels, "training")
    n = len(images)
    if mode == "scratch":
        variables = init_variables(config, seed)
    else:
        if variables is None:
            raise ValueError(
                f"mode {mode!r} fine-tunes given variables; pass them (only 'scratch' "
                "starts without)"
            )
        _check_variables(config, variables)
    params = dict(variables["params"])
    batch_stats = dict(variables["batch_stats"]) if has_batch_norm(config) else None

    train_params, train_bn = _trained_sets(
        _family(config), mode, stem_bn, params, batch_stats or ()
    )
    step_fn = _train_step(
        config,
        train_params,
        train_bn,
        aug,
        int(cutout),
        float(grad_clip) if grad_clip else None,
        float(label_smoothing),
    )
    copy = lambda t: jax.tree.map(lambda a: jnp.array(a, dtype=jnp.float32, copy=True), t)  # noqa: E731
    state = {
        "params": copy(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.fold_in(jax.random.PRNGKey(seed), 1),
    }  # not the init key
    if batch_stats is not None:
        state["batch_stats"] = copy(batch_stats)
    state["opt_state"] = step_fn.init_opt_state(state["params"])

    if images.dtype != np.uint8:  # augment_batch divides by 255
        images = images.astype(np.float32) * np.float32(255.0)
    order = _batch_indices(n, batch_size, steps, seed)
    bar, own_bar = None, False
    if progress is True:
        from tqdm.auto import tqdm

        bar, own_bar = tqdm(total=steps, desc=f"{mode} n={n}", unit="step", leave=False), True
    elif progress is not False and progress is not None:
        bar = progress
    t0 = time.perf_counter()
    losses, corrects = [], []
    try:
        for s in range(steps):
            idx = order[s]
            state, loss, correct = step_fn(
                state,
                images[idx],
                labels[idx],
                jnp.float32(lr_schedule(s, steps, lr, warmup_fraction)),
            )
            losses.append(loss)
            corrects.append(correct)
            if s == 0:
                jax.block_until_ready(loss)
                first_step = time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
                if own_bar and (s % 10 == 9 or s == steps - 1):
                    bar.set_postfix(loss=f"{float(loss):.3f}")
        jax.block_until_ready(state)
    finally:
        if own_bar:
            bar.close()
    seconds = time.perf_counter() - t0

    # trained leaves from the state, the frozen ones copied from the input
    out = {"params": _merge(params, state["params"], train_params)}
    if batch_stats is not None:
        out["batch_stats"] = _merge(batch_stats, state["batch_stats"], train_bn)
    history = {
        "mode": mode,
        "n": n,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "augment": list(aug),
        "warmup_fraction": warmup_fraction,
        "grad_clip": grad_clip,
        "label_smoothing": label_smoothing,
        "trained": sorted(params if train_params is None else train_params),
        "batchnorm_train_mode": sorted((batch_stats or ()) if train_bn is None else train_bn),
        "loss": [float(v) for v in jax.device_get(losses)],
        "train_accuracy": [int(c) / batch_size for c in jax.device_get(corrects)],
        "seconds": seconds,
        "first_step_seconds": first_step,
    }
    return out, history


def _steps_for(steps, n: int) -> int:
    if steps is None:
        return default_steps(n)
    if callable(steps):
        return _check_positive_int(f"steps({n})", steps(n))
    if isinstance(steps, Mapping):
        if n not in steps:
            raise ValueError(f"steps has no entry for n = {n}")
        return _check_positive_int(f"steps[{n}]", steps[n])
    return _check_positive_int("steps", steps)


def _lr_for(lr, mode: str) -> float:
    if lr is None:
        return DEFAULT_LR[mode]
    if isinstance(lr, Mapping):
        return float(lr.get(mode, DEFAULT_LR[mode]))
    return float(lr)


def attack_subset(n_pool: int, n: int, seed: int) -> np.ndarray:
    """Sorted indices of the ``n`` attack images in a pool of ``n_pool``: the first n of
    one seeded permutation, so the subsets are nested (100 within 500 within ...)."""
    return np.sort(np.random.default_rng([seed, 5]).permutation(n_pool)[:n])


def finetune_attack(
    config: ConvMixerConfig | ViTConfig,
    encrypted_variables: PyTree,
    train_images,
    train_labels,
    test_images,
    test_labels,
    *,
    sizes: Sequence[int] = DEFAULT_SIZES,
    modes: Sequence[str] = MODES,
    steps: int | Mapping[int, int] | Callable[[int], int] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float | Mapping[str, float] | None = None,
    seed: int = 0,
    augment: bool | Sequence[str] = True,
    stem_bn: bool = False,
    baseline_accuracy: float | None = None,
    eval_batch_size: int = 500,
    progress: bool = False,
) -> dict:
    """Fine-tune the encrypted model on n plain images per mode; test on plain images.

    Args:
      config, encrypted_variables: the encrypted model, a ConvMixer or a ViT (never
        modified).
      train_images, train_labels: the pool (plain) the n attack images come from;
        (N, H, W, C) uint8 or float in [0, 1], (N,) ints.
      test_images, test_labels: plain test images for the accuracies.
      sizes: the n to try (each <= N). The same n images for every mode, and the
        subsets are nested (:func:`attack_subset`).
      modes: among 'stem', 'all', 'scratch'.
      steps: None (:func:`default_steps`), an int for every n, a mapping n -> steps,
        or a function of n.
      lr: None (``DEFAULT_LR``), one float for every mode, or a mapping mode -> lr.
      baseline_accuracy: the plain model's accuracy on the same test images, if known
        (recorded, and drawn by :func:`plot_finetune`).

    Returns a JSON-serializable dict::

        {"model": config dict, "settings": {...}, "n_pool", "n_test", "chance",
         "baseline_accuracy", "encrypted_accuracy" (n = 0, no fine-tuning),
         "accuracy": {mode: {str(n): test accuracy, ...}},
         "runs": [{"mode", "n", "steps", "batch_size", "lr", "test_accuracy", "seconds",
                   "eval_seconds", "final_train_loss", "trained", "batchnorm_train_mode"}, ...],
         "seconds": total wall time}
    """
    t_start = time.perf_counter()
    modes = tuple(modes)
    if not modes:
        raise ValueError("modes is empty")
    for m in modes:
        _check_mode(m)
    if len(set(modes)) != len(modes):
        raise ValueError(f"modes repeat: {modes}")
    batch_size = _check_positive_int("batch_size", batch_size)
    train_images, train_labels = _check_data(config, train_images, train_labels, "training")
    test_images, test_labels = _check_data(config, test_images, test_labels, "test")
    sizes = [_check_positive_int("every size", n) for n in sizes]
    if not sizes:
        raise ValueError("sizes is empty")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"sizes repeat: {sizes}")
    sizes = sorted(sizes)
    if sizes[-1] > len(train_images):
        raise ValueError(
            f"n = {sizes[-1]} exceeds the {len(train_images)} training images available"
        )
    _check_variables(config, encrypted_variables)
    plan = [(m, n, _steps_for(steps, n), _lr_for(lr, m)) for m in modes for n in sizes]

    t0 = time.perf_counter()
    before = accuracy(
        config, encrypted_variables, test_images, test_labels, batch_size=eval_batch_size
    )
    before_seconds = time.perf_counter() - t0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(p[2] for p in plan), desc="fine-tuning attack", unit="step")
    runs = []
    try:
        for mode, n, n_steps, mode_lr in plan:
            idx = attack_subset(len(train_images), n, seed)
            if bar is not None:
                bar.set_description(f"{mode} n={n}")
            variables, hist = finetune(
                config,
                encrypted_variables,
                train_images[idx],
                train_labels[idx],
                mode=mode,
                steps=n_steps,
                batch_size=batch_size,
                lr=mode_lr,
                seed=seed,
                augment=augment,
                stem_bn=stem_bn and mode == "stem",
                progress=bar if bar is not None else False,
            )
            t0 = time.perf_counter()
            acc = accuracy(config, variables, test_images, test_labels, batch_size=eval_batch_size)
            runs.append(
                {
                    "mode": mode,
                    "n": n,
                    "steps": n_steps,
                    "batch_size": batch_size,
                    "lr": mode_lr,
                    "test_accuracy": acc,
                    "seconds": hist["seconds"],
                    "first_step_seconds": hist["first_step_seconds"],
                    "eval_seconds": time.perf_counter() - t0,
                    "final_train_loss": float(np.mean(hist["loss"][-max(1, n_steps // 10) :])),
                    "trained": hist["trained"],
                    "batchnorm_train_mode": hist["batchnorm_train_mode"],
                }
            )
            if bar is not None:
                bar.set_postfix(acc=f"{acc:.3f}")
    finally:
        if bar is not None:
            bar.close()
    return {
        "threat": "encrypted model + n labeled plain images, no key; accuracy on plain test images",
        "model": config.to_dict(),
        "settings": {
            "sizes": sizes,
            "modes": list(modes),
            "batch_size": batch_size,
            "seed": seed,
            "augment": list(_augment_tuple(augment)),
            "stem_bn": bool(stem_bn),
            "optimizer": "clip_by_global_norm(1.0) + Adam, linear warm-up 10% then cosine to 0",
            "steps": "default_steps(n) = round(50 * (n/100)**0.3)"
            if steps is None
            else {str(n): _steps_for(steps, n) for n in sizes},
            "lr": {m: _lr_for(lr, m) for m in modes},
        },
        "n_pool": int(len(train_images)),
        "n_test": int(len(test_images)),
        "chance": 1.0 / config.num_classes,
        "baseline_accuracy": None if baseline_accuracy is None else float(baseline_accuracy),
        "encrypted_accuracy": before,
        "encrypted_eval_seconds": before_seconds,
        "accuracy": {
            m: {str(r["n"]): r["test_accuracy"] for r in runs if r["mode"] == m} for m in modes
        },
        "runs": runs,
        "seconds": time.perf_counter() - t_start,
    }


MODE_LABELS = {
    "stem": "fine-tune patch embedding",
    "all": "fine-tune whole model",
    "scratch": "train from scratch",
}
#: A ViT's 'stem' also trains the position embedding (module docstring).
VIT_MODE_LABELS = {**MODE_LABELS, "stem": "fine-tune patch and position embeddings"}


def mode_labels(results: dict) -> dict[str, str]:
    """What each mode trains, in words, for the model family of ``results``
    (:func:`finetune_attack`'s)."""
    family = results.get("model", {}).get("family", "convmixer")
    return VIT_MODE_LABELS if family == "vit" else MODE_LABELS


def plot_finetune(results: dict, path, *, baseline_accuracy: float | None = None):
    """Test accuracy vs n (log x), one line per mode, with horizontal lines for the
    plain model's accuracy (``baseline_accuracy`` or ``results['baseline_accuracy']``),
    the encrypted model before fine-tuning, and chance; with ``results['stem_across_keys']``
    (the report's several keys) the stem line gets a band from min to max. Writes a PNG atomically;
    returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from convmixer_jax.files.atomic import write_bytes_atomic

    base = baseline_accuracy if baseline_accuracy is not None else results.get("baseline_accuracy")
    fig, ax = plt.subplots(figsize=(5.2, 4.0))
    markers = {"stem": "o", "all": "s", "scratch": "^"}
    spread = results.get("stem_across_keys")
    labels = mode_labels(results)
    for mode, accs in results["accuracy"].items():
        ns = sorted(int(n) for n in accs)
        label = labels.get(mode, mode)
        if mode == "stem" and spread:  # the line is the first key's, the band all keys'
            label += f", key 1 of {len(spread[str(ns[0])]['values'])}"
        (line,) = ax.plot(
            ns, [accs[str(n)] for n in ns], marker=markers.get(mode, "o"), label=label
        )
        if mode == "stem" and spread:
            ax.fill_between(
                ns,
                [spread[str(n)]["min"] for n in ns],
                [spread[str(n)]["max"] for n in ns],
                color=line.get_color(),
                alpha=0.2,
                label=f"{labels['stem']}, range over {len(spread[str(ns[0])]['values'])} keys",
            )
    if base is not None:
        ax.axhline(base, color="k", ls="--", lw=1, label=f"plain model ({base:.3f})")
    if results.get("encrypted_accuracy") is not None:
        ax.axhline(
            results["encrypted_accuracy"],
            color="tab:red",
            ls="-.",
            lw=1,
            label=f"encrypted, no fine-tuning ({results['encrypted_accuracy']:.3f})",
        )
    ax.axhline(
        results["chance"], color="gray", ls=":", lw=1, label=f"chance ({results['chance']:.2f})"
    )
    ax.set_xscale("log")
    ax.set_xlabel("labeled plain images n")
    ax.set_ylabel("test accuracy (plain images)")
    ax.set_ylim(0, 1)
    ax.set_title("Fine-tuning the encrypted model without the key", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=130, format="png")
    plt.close(fig)
    return write_bytes_atomic(path, buf.getvalue(), force=True)


__all__ = [
    "MODES",
    "DEFAULT_LR",
    "STEM_PARAMS",
    "DEFAULT_SIZES",
    "DEFAULT_BATCH_SIZE",
    "default_steps",
    "lr_schedule",
    "mode_labels",
    "finetune",
    "finetune_attack",
    "attack_subset",
    "plot_finetune",
]
