"""One training step: the loss, its gradient, the optimizer update and the BatchNorm statistics.

Every trainer of the package builds its step here: the classifier's train loop
(:mod:`convmixer_jax.training.loop`), the fine-tuning attack
(:mod:`convmixer_jax.attacks.finetune`) and the image prior
(:mod:`convmixer_jax.attacks.image_prior`). A step is described by

- a Flax ``model`` and a ``loss(logits, labels) -> (mean loss, number correct)``;
- an optax transform ``tx``;
- a ``trainable`` mask (a pytree of bools over the parameters, or a function of the
  parameters returning one; None: every parameter is trained). Frozen leaves take no
  weight gradient (they enter the loss through ``stop_gradient``), get exact zero
  updates from ``optax.set_to_zero`` and hold no optimizer state
  (``optax.multi_transform``), so they come out of a step bitwise unchanged;
- a BatchNorm mode: which BatchNorms normalize with the batch's statistics and update
  their running statistics. ``'train'``: every BatchNorm; ``'eval'``: none (each uses and
  keeps its running statistics); a frozenset of top-level module names (e.g.
  ``frozenset({'stem_bn'})``): the BatchNorms under those modules, all others in eval
  mode; None: the model has no BatchNorm (it is applied without a ``train`` argument and
  the state holds no ``'batch_stats'``).

The trainer keeps its own loop, schedule, checkpoints and weight averages; it gives
the step a ``prepare`` function (the batch and its augmentation, on device) and
optionally an ``after`` function (for example an EMA of the weights).

The state is a dict with ``'params'``, ``'opt_state'``, ``'batch_stats'`` (unless the
model has no BatchNorm) and optionally ``'step'`` (an int32 counter, incremented by
every step); other entries are carried through for ``prepare`` and ``after``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from convmixer_jax.model.convmixer import ChannelBatchNorm

PyTree = Any
#: ``(logits (B, K), labels (B,) int) -> (mean loss, number of correct predictions)``.
Loss = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


# --------------------------------------------------------------------------- losses


def one_hot_cross_entropy(num_classes: int, label_smoothing: float = 0.0) -> Loss:
    """Softmax cross-entropy against one-hot targets (smoothed by ``label_smoothing`` in
    [0, 1)), the batch mean; the metric is the number of rows whose arg-max is the label.

    logits: (B, num_classes) float; labels: (B,) int in 0..num_classes-1.
    """

    def loss(logits, labels):
        onehot = jax.nn.one_hot(labels, num_classes)
        if label_smoothing:
            onehot = optax.smooth_labels(onehot, label_smoothing)
        value = optax.softmax_cross_entropy(logits, onehot).mean()
        return value, jnp.sum(jnp.argmax(logits, -1) == labels)

    return loss


def integer_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Softmax cross-entropy of integer labels (``log-sum-exp(logits) - logits[label]``), the
    batch mean, and the number of correct arg-max predictions.

    The same loss as :func:`one_hot_cross_entropy` without smoothing, rounded differently
    (optax's integer-label form); the image prior was trained and measured with this one.
    logits: (B, K) float; labels: (B,) int in 0..K-1.
    """
    value = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return value, jnp.sum(jnp.argmax(logits, -1) == labels)


# --------------------------------------------------------------------------- masks


def top_level_mask(names) -> Callable[[PyTree], PyTree]:
    """The mask function of a Flax variable dict: True on every leaf under one of the
    top-level modules ``names`` (for example ``{'stem'}``), False elsewhere."""
    names = frozenset(names)

    def mask(tree):
        return {k: jax.tree.map(lambda _, on=k in names: on, v) for k, v in tree.items()}

    return mask


def _resolve(mask, params):
    return mask(params) if callable(mask) else mask


def freeze(tx: optax.GradientTransformation, trainable) -> optax.GradientTransformation:
    """``tx`` on the ``trainable`` leaves and ``optax.set_to_zero`` on the others, which hold
    no optimizer state. trainable: a bool pytree over the parameters, a function of the
    parameters returning one, or None (``tx`` itself: everything is trained)."""
    if trainable is None:
        return tx

    def labels(params):
        return jax.tree.map(lambda t: "train" if t else "frozen", _resolve(trainable, params))

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


# --------------------------------------------------------------------------- BatchNorm


def _batchnorm_interceptor(train_names: frozenset):
    """Run a ChannelBatchNorm in train mode iff its top-level module is in ``train_names``."""

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, ChannelBatchNorm) and context.method_name == "__call__":
            train = bool(module.path) and module.path[0] in train_names
            if "train" in kwargs:
                kwargs = dict(kwargs, train=train)
            else:
                args = (args[0], train) + tuple(args[2:])
        return next_fun(*args, **kwargs)

    return intercept


def _check_batch_norm(batch_norm) -> None:
    if batch_norm in ("train", "eval", None) or isinstance(batch_norm, frozenset):
        return
    raise ValueError(
        f"batch_norm must be 'train', 'eval', a frozenset of module names or None, "
        f"got {batch_norm!r}"
    )


def make_loss(model: nn.Module, loss: Loss, batch_norm="train"):
    """``loss_fn(params, batch_stats, x, labels) -> (loss, (new batch_stats, metric))``: the
    model applied in the BatchNorm mode ``batch_norm`` (module docstring), then ``loss``.

    x: the model's input batch; batch_stats: the running statistics (None when
    ``batch_norm`` is None). The new statistics are the updated ones for the BatchNorms in
    train mode and the given ones, unchanged, for the rest.
    """
    _check_batch_norm(batch_norm)

    def loss_fn(params, batch_stats, x, labels):
        if batch_norm is None:
            logits = model.apply({"params": params}, x)
            new_stats = batch_stats
        else:
            variables = {"params": params, "batch_stats": batch_stats}
            if batch_norm == "train":
                logits, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
                new_stats = upd["batch_stats"]
            elif batch_norm == "eval" or not batch_norm:
                logits = model.apply(variables, x, train=False)
                new_stats = batch_stats
            else:
                with nn.intercept_methods(_batchnorm_interceptor(batch_norm)):
                    logits, upd = model.apply(variables, x, train=False, mutable=["batch_stats"])
                new_stats = upd["batch_stats"]
        value, metric = loss(logits, labels)
        return value, (new_stats, metric)

    return loss_fn


# --------------------------------------------------------------------------- the step


@dataclasses.dataclass(frozen=True, eq=False)
class TrainStep:
    """A jit-compiled training step and the optimizer whose state it carries.

    ``step(state, *batch) -> (state, loss, metric)``, or with a learning-rate argument
    ``step(state, *batch, lr)``. ``optimizer`` is ``tx`` frozen by the trainable mask:
    the state's ``'opt_state'`` is ``optimizer.init(params)`` (``init_opt_state``).
    """

    step: Callable
    optimizer: optax.GradientTransformation

    def __call__(self, state, *args):
        return self.step(state, *args)

    def init_opt_state(self, params: PyTree) -> PyTree:
        return self.optimizer.init(params)


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    loss: Loss,
    *,
    trainable=None,
    batch_norm="train",
    prepare: Callable | None = None,
    after: Callable | None = None,
    learning_rate_argument: bool = False,
    jit_kwargs: dict | None = None,
) -> TrainStep:
    """Build the jit-compiled training step.

    Args:
      model: the Flax module; ``model.apply(variables, x, train=...)`` gives (B, K) logits
        (without ``train`` when ``batch_norm`` is None).
      tx: the optimizer. Without ``learning_rate_argument`` it includes the learning rate
        (its updates are added to the parameters); with it, it gives unscaled directions and
        the step adds ``-lr * update``, ``lr`` a float32 scalar given to every call (so one
        compiled step serves every schedule).
      loss: ``(logits, labels) -> (mean loss, metric)``, e.g. :func:`one_hot_cross_entropy`.
      trainable: the mask of trained parameters (module docstring; None: all).
      batch_norm: the BatchNorm mode (module docstring).
      prepare: ``(state, *batch) -> (x, labels)``, the model's input and the labels from the
        step's batch arguments (default: the batch is ``(x, labels)``).
      after: ``(old state, new state) -> new state``, run last (default: none).
      jit_kwargs: arguments of ``jax.jit`` (default: the state donated,
        ``donate_argnums=(0,)``).
    Returns:
      the :class:`TrainStep`.
    """
    optimizer = freeze(tx, trainable)
    loss_fn = make_loss(model, loss, batch_norm)
    has_stats = batch_norm is not None

    def differentiable(params, batch_stats, x, labels):
        if trainable is not None:
            mask = _resolve(trainable, params)
            params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, mask)
        return loss_fn(params, batch_stats, x, labels)

    def step(state, *args):
        if learning_rate_argument:
            *args, lr = args
        x, labels = prepare(state, *args) if prepare is not None else args
        (value, (batch_stats, metric)), grads = jax.value_and_grad(differentiable, has_aux=True)(
            state["params"], state.get("batch_stats"), x, labels
        )
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        if learning_rate_argument:
            updates = jax.tree.map(lambda u: -lr * u, updates)
        new = dict(state, params=optax.apply_updates(state["params"], updates), opt_state=opt_state)
        if has_stats:
            new["batch_stats"] = batch_stats
        if "step" in state:
            new["step"] = state["step"] + 1
        if after is not None:
            new = after(state, new)
        return new, value, metric

    return TrainStep(jax.jit(step, **(jit_kwargs or {"donate_argnums": (0,)})), optimizer)


__all__ = [
    "Loss",
    "TrainStep",
    "freeze",
    "integer_cross_entropy",
    "make_loss",
    "make_train_step",
    "one_hot_cross_entropy",
    "top_level_mask",
]
