"""Training: recipes, on-device augmentation, a jit-compiled data-parallel step,
Orbax checkpoints every epoch and exact resume.

Determinism: the epoch's example order comes from ``numpy.random.default_rng([seed, epoch])``
and each step's augmentation key from ``fold_in(PRNGKey(seed), step)``, so a run
resumed from any epoch checkpoint retraces the uninterrupted run exactly.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from convmixer_jax.evaluate import accuracy
from convmixer_jax.model import ConvMixer, ConvMixerConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training recipe.

    optimizer: 'adam' | 'adamw'; schedule: 'constant' | 'onecycle' (peak ``lr``);
    augment: tuple of 'crop' (reflect pad 4, random crop), 'flip' (horizontal),
    'cutout' (one ``cutout``-pixel square zeroed to the mean); label_smoothing in [0, 1).
    """

    epochs: int = 200
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_fraction: float = 0.3
    augment: tuple[str, ...] = ()
    cutout: int = 8
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    seed: int = 0

    def __post_init__(self):
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if self.schedule not in ("constant", "onecycle"):
            raise ValueError(f"schedule must be 'constant' or 'onecycle', got {self.schedule!r}")
        object.__setattr__(self, "augment", tuple(self.augment))
        bad = set(self.augment) - {"crop", "flip", "cutout"}
        if bad:
            raise ValueError(f"unknown augmentations {sorted(bad)}; use crop, flip, cutout")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["augment"] = list(self.augment)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return cls(**d)


RECIPES = {
    # Iijima & Kiya (2022), section 4: Adam, lr 1e-3, batch 128, 200 epochs.
    "paper": TrainConfig(epochs=200, batch_size=128, optimizer="adam", lr=1e-3),
    # A shorter schedule for CPUs: AdamW one-cycle with on-device crop, flip and
    # cutout and label smoothing.
    "fast": TrainConfig(epochs=40, batch_size=256, optimizer="adamw", lr=0.01, weight_decay=0.05,
                        schedule="onecycle", augment=("crop", "flip", "cutout"), cutout=8,
                        label_smoothing=0.1, grad_clip=1.0),
}


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        lr = optax.cosine_onecycle_schedule(total, cfg.lr, pct_start=cfg.warmup_fraction,
                                            div_factor=25.0, final_div_factor=1e3)
    else:
        lr = cfg.lr
    if cfg.optimizer == "adamw":
        opt = optax.adamw(lr, weight_decay=cfg.weight_decay)
    else:
        opt = optax.adam(lr)
    if cfg.grad_clip:
        opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
    return opt


def augment_batch(rng: jax.Array, images: jax.Array, cfg: TrainConfig) -> jax.Array:
    """Random crop / flip / cutout on device.

    images: (N, H, W, C) uint8 -> (N, H, W, C) float32 in [0, 1].
    """
    x = images.astype(jnp.float32) / 255.0
    n, h, w, _ = x.shape
    k_crop, k_flip, k_cut = jax.random.split(rng, 3)
    if "crop" in cfg.augment:
        pad = 4
        xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
        offs = jax.random.randint(k_crop, (n, 2), 0, 2 * pad + 1)
        x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1])))(xp, offs)
    if "flip" in cfg.augment:
        do = jax.random.bernoulli(k_flip, 0.5, (n,))
        x = jnp.where(do[:, None, None, None], x[:, :, ::-1, :], x)
    if "cutout" in cfg.augment and cfg.cutout > 0:
        centers = jax.random.randint(k_cut, (n, 2), 0, jnp.array([h, w]))
        rows = jnp.arange(h)[None, :, None]
        cols = jnp.arange(w)[None, None, :]
        half = cfg.cutout // 2
        cy, cx = centers[:, 0, None, None], centers[:, 1, None, None]
        mask = (jnp.abs(rows - cy) < half + (cfg.cutout % 2)) & (jnp.abs(cols - cx) < half + (cfg.cutout % 2))
        x = jnp.where(mask[..., None], 0.5, x)
    return x


def init_variables(config: ConvMixerConfig, seed: int) -> dict:
    """Freshly initialized ``{'params', 'batch_stats'}`` for ``config``."""
    model = ConvMixer(config)
    dummy = jnp.zeros((1, config.image_size, config.image_size, config.channels), jnp.float32)
    variables = model.init(jax.random.PRNGKey(seed), dummy, train=False)
    return jax.tree.map(np.asarray, dict(variables))


def _make_step(config: ConvMixerConfig, cfg: TrainConfig, tx, data_sharding, repl_sharding):
    model = ConvMixer(config)

    def loss_fn(params, batch_stats, x, labels):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                      mutable=["batch_stats"])
        onehot = jax.nn.one_hot(labels, config.num_classes)
        if cfg.label_smoothing:
            onehot = optax.smooth_labels(onehot, cfg.label_smoothing)
        loss = optax.softmax_cross_entropy(logits, onehot).mean()
        correct = jnp.sum(jnp.argmax(logits, -1) == labels)
        return loss, (updates["batch_stats"], correct)

    def step(state, images, labels):
        rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), state["step"])
        x = augment_batch(rng, images, cfg)
        (loss, (batch_stats, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["batch_stats"], x, labels)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = dict(state, params=params, batch_stats=batch_stats, opt_state=opt_state,
                   step=state["step"] + 1)
        return new, loss, correct

    return jax.jit(step, donate_argnums=(0,),
                   in_shardings=(repl_sharding, data_sharding, data_sharding),
                   out_shardings=(repl_sharding, repl_sharding, repl_sharding))


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The example order of ``epoch``: a permutation of 0..n-1 fixed by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def _checkpoint_manager(workdir: Path):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


def train(config: ConvMixerConfig, cfg: TrainConfig, train_data, test_data, workdir, *,
          resume: bool = False, progress: bool = True, init_variables_: dict | None = None,
          init_from: dict | None = None, max_epochs_this_run: int | None = None,
          log=print) -> tuple[dict, dict]:
    """Train ``config`` with recipe ``cfg``; checkpoint and log into ``workdir``.

    train_data / test_data: (images (N, H, W, C) uint8, labels (N,) int).
    test_data may be None (no per-epoch evaluation).
    Returns the final variables ``{'params', 'batch_stats'}`` and the log dict
    (also written to ``workdir/train_log.json``).
    ``max_epochs_this_run`` stops early (a later ``resume`` continues).
    ``init_variables_`` starts from given weights instead of a fresh initialization
    (a warm start: the recipe's optimizer and schedule begin anew); ``init_from``
    describes where they came from (JSON-able; kept in the log as ``init_from``
    and checked on ``resume``).
    """
    import orbax.checkpoint as ocp

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    images, labels = train_data
    n = len(images)
    devices = jax.devices()
    if cfg.batch_size % len(devices):
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by the {len(devices)} devices")
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{n} training images are fewer than one batch of {cfg.batch_size}")
    mesh = Mesh(np.asarray(devices), ("data",))
    data_sharding = NamedSharding(mesh, P("data"))
    repl = NamedSharding(mesh, P())
    tx = make_optimizer(cfg, steps_per_epoch)
    step_fn = _make_step(config, cfg, tx, data_sharding, repl)

    variables = init_variables_ if init_variables_ is not None else init_variables(config, cfg.seed)
    state = {"params": variables["params"], "batch_stats": variables["batch_stats"],
             "opt_state": tx.init(variables["params"]), "step": jnp.zeros((), jnp.int32)}
    log_path = workdir / "train_log.json"
    history = {"model": config.to_dict(), "recipe": cfg.to_dict(), "epochs": [],
               "devices": [str(d) for d in devices]}
    if init_from is not None:
        history["init_from"] = init_from
    mngr = _checkpoint_manager(workdir)
    start_epoch = 0
    if resume and mngr.latest_step() is not None:
        latest = mngr.latest_step()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        state = mngr.restore(latest, args=ocp.args.StandardRestore(abstract))
        start_epoch = latest
        if log_path.exists():
            saved = json.loads(log_path.read_text())
            for what, now in (("model", config.to_dict()), ("recipe", cfg.to_dict()),
                              ("init_from", init_from)):
                if json.loads(json.dumps(now)) != saved.get(what):
                    raise ValueError(f"--resume with a different {what} than the run in {workdir} "
                                     f"(saved {saved.get(what)}, now {now}); use the same options "
                                     "or another --workdir")
            history = dict(saved, devices=history["devices"])
            history["epochs"] = [e for e in history["epochs"] if e["epoch"] <= latest]
        log(f"resumed from epoch {latest} checkpoint in {workdir}")
    elif mngr.latest_step() is not None and not resume:
        raise FileExistsError(f"{workdir} already holds checkpoints; pass --resume to continue "
                              "or choose another directory")
    state = jax.device_put(state, repl)

    stop_epoch = cfg.epochs if max_epochs_this_run is None else min(cfg.epochs, start_epoch + max_epochs_this_run)
    for epoch in range(start_epoch, stop_epoch):
        order = epoch_order(cfg.seed, epoch, n)
        t0 = time.perf_counter()
        loss_sum, correct_sum, seen = 0.0, 0, 0
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step")
        pending = []
        for s in range(steps_per_epoch):
            idx = np.sort(order[s * cfg.batch_size:(s + 1) * cfg.batch_size])
            xb = jax.device_put(images[idx], data_sharding)
            yb = jax.device_put(np.asarray(labels[idx], np.int32), data_sharding)
            state, loss, correct = step_fn(state, xb, yb)
            pending.append((loss, correct))
            if len(pending) >= 10 or s == steps_per_epoch - 1:
                for l_, c_ in pending:
                    loss_sum += float(l_) * cfg.batch_size
                    correct_sum += int(c_)
                    seen += cfg.batch_size
                pending = []
                if bar is not None:
                    dt = time.perf_counter() - t0
                    bar.n = s + 1
                    bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct_sum / seen:.3f}",
                                    img_s=f"{seen / dt:.0f}")
                    bar.refresh()
        if bar is not None:
            bar.close()
        train_seconds = time.perf_counter() - t0
        entry = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct_sum / seen,
                 "train_seconds": train_seconds, "images_per_second": seen / train_seconds}
        if test_data is not None:
            variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
            entry["test_accuracy"] = accuracy(config, variables, test_data[0], test_data[1])
        history["epochs"].append(entry)
        mngr.save(epoch + 1, args=ocp.args.StandardSave(state))
        mngr.wait_until_finished()
        _write_json_atomic(log_path, history)
        log(json.dumps(entry))
    mngr.close()
    variables = jax.tree.map(np.asarray, {"params": state["params"], "batch_stats": state["batch_stats"]})
    return variables, history


def load_checkpoint(workdir) -> tuple[ConvMixerConfig, dict, dict]:
    """The model of the newest epoch checkpoint in a training ``workdir``.

    Returns (config, variables ``{'params', 'batch_stats'}`` as numpy, info)
    where info holds the epoch, the recipe and that epoch's log entry.
    """
    import orbax.checkpoint as ocp

    workdir = Path(workdir)
    log_path = workdir / "train_log.json"
    if not log_path.exists():
        raise FileNotFoundError(f"{workdir} is not a training directory: no train_log.json")
    history = json.loads(log_path.read_text())
    config = ConvMixerConfig.from_dict(history["model"])
    cfg = TrainConfig.from_dict(history["recipe"])
    mngr = _checkpoint_manager(workdir)
    latest = mngr.latest_step()
    if latest is None:
        raise FileNotFoundError(f"{workdir} holds no checkpoint")
    tx = make_optimizer(cfg, 1)  # the state's structure does not depend on the schedule length
    abstract_vars = jax.eval_shape(lambda: init_variables_abstract(config))
    state = {"params": abstract_vars["params"], "batch_stats": abstract_vars["batch_stats"],
             "opt_state": jax.eval_shape(tx.init, abstract_vars["params"]),
             "step": jax.ShapeDtypeStruct((), jnp.int32)}
    restored = mngr.restore(latest, args=ocp.args.StandardRestore(state))
    mngr.close()
    variables = jax.tree.map(np.asarray, {"params": restored["params"], "batch_stats": restored["batch_stats"]})
    entry = next((e for e in history["epochs"] if e["epoch"] == latest), None)
    this_run = sum(e["train_seconds"] for e in history["epochs"] if e["epoch"] <= latest)
    return config, variables, {"epoch": latest, "epochs_planned": cfg.epochs, "recipe": cfg.to_dict(),
                               "log": entry, "train_seconds": this_run,
                               "init_from": history.get("init_from")}


def warm_start_totals(init_from: dict | None, epochs: int, train_seconds: float, *, planned: int) -> dict:
    """Provenance of a model trained in stages: total epochs and seconds.

    init_from: a run's ``init_from`` (None for a run from scratch), holding the
    starting model's ``epochs`` and ``train_seconds`` (and its ``stage_epochs``
    if it was itself warm-started); epochs / train_seconds /
    planned: this run's done and planned epochs and its seconds. Returns
    ``{'epochs', 'epochs_planned', 'train_seconds'}`` counting every stage,
    plus ``'stage_epochs'`` / ``'init_from'`` for a warm start.
    """
    prior_epochs = int((init_from or {}).get("epochs") or 0)
    prior_seconds = float((init_from or {}).get("train_seconds") or 0.0)
    totals = {"epochs": prior_epochs + epochs, "epochs_planned": prior_epochs + planned,
              "train_seconds": prior_seconds + train_seconds}
    if not init_from:
        return totals
    prior_stages = [int(e) for e in init_from.get("stage_epochs") or [prior_epochs]]
    return {**totals, "stage_epochs": [*prior_stages, epochs], "init_from": init_from}


def lineage_train_seconds(metas: list[dict]) -> float:
    """Training seconds of several models' ``config.json`` metadata, each stage counted once.

    A model that another one was warm-started from is already in that one's
    ``train_seconds`` (see :func:`warm_start_totals`); it is recognized by what the
    other's ``init_from`` recorded about it (epochs, train_seconds, test_accuracy,
    train_config), not by its path, which changes when models are copied.
    """
    keys = ("epochs", "train_seconds", "test_accuracy", "train_config")
    starts = [m["init_from"] for m in metas if m.get("init_from")]
    return sum(float(m.get("train_seconds") or 0.0) for m in metas
               if not any(all(s.get(k) == m.get(k) for k in keys) for s in starts))


def init_variables_abstract(config: ConvMixerConfig):
    """``model.init`` for use under ``jax.eval_shape`` (shapes only, no compute)."""
    model = ConvMixer(config)
    dummy = jnp.zeros((1, config.image_size, config.image_size, config.channels), jnp.float32)
    return model.init(jax.random.PRNGKey(0), dummy, train=False)


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def total_train_seconds(history: dict) -> float:
    return float(sum(e["train_seconds"] for e in history["epochs"]))


__all__ = ["TrainConfig", "RECIPES", "train", "init_variables", "augment_batch", "make_optimizer",
           "epoch_order", "total_train_seconds", "warm_start_totals"]
