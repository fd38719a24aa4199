"""Training the classifier: on-device augmentation, its jit-compiled data-parallel step
(built by :mod:`convmixer_jax.training.step`), an EMA of the weights, Orbax checkpoints
every epoch and exact resume. The recipes are in :mod:`convmixer_jax.training.recipes`.

Determinism: the epoch's example order comes from ``numpy.random.default_rng([seed, epoch])``
and each step's augmentation key from ``fold_in(PRNGKey(seed), step)``, so a run
resumed from any epoch checkpoint retraces the uninterrupted run exactly.

Several processes (:mod:`convmixer_jax.parallel`): the batch is split over every
device of every process and each process feeds only its own rows of it; the state
is replicated. Every process must hold the same training data. The trained weights
equal a one-process run's up to the order of the cross-device sums. Process 0
writes the log; every process takes part in Orbax's checkpoint saves (the
``workdir`` must be one shared folder), and a checkpoint restores on any number
of processes.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from convmixer_jax.files.atomic import deferred_interrupts, write_json_atomic
from convmixer_jax.model.convmixer import ConvMixer, ConvMixerConfig
from convmixer_jax.model.inference import accuracy
from convmixer_jax.parallel.global_arrays import (
    by_rows,
    global_mesh,
    replicate,
    replicated,
    shard_rows,
    to_host,
)
from convmixer_jax.parallel.runtime import is_writer
from convmixer_jax.training.randaugment import rand_augment
from convmixer_jax.training.recipes import AUGMENTATIONS, RECIPES, TrainConfig
from convmixer_jax.training.step import make_train_step, one_hot_cross_entropy


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        lr = optax.cosine_onecycle_schedule(
            total, cfg.lr, pct_start=cfg.warmup_fraction, div_factor=25.0, final_div_factor=1e3
        )
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
        x = jax.vmap(
            lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1]))
        )(xp, offs)
    if "flip" in cfg.augment:
        do = jax.random.bernoulli(k_flip, 0.5, (n,))
        x = jnp.where(do[:, None, None, None], x[:, :, ::-1, :], x)
    if "randaugment" in cfg.augment:
        x = rand_augment(jax.random.fold_in(rng, 7), x, cfg.ra_ops, cfg.ra_magnitude)
    if "cutout" in cfg.augment and cfg.cutout > 0:
        centers = jax.random.randint(k_cut, (n, 2), 0, jnp.array([h, w]))
        rows = jnp.arange(h)[None, :, None]
        cols = jnp.arange(w)[None, None, :]
        half = cfg.cutout // 2
        cy, cx = centers[:, 0, None, None], centers[:, 1, None, None]
        mask = (jnp.abs(rows - cy) < half + (cfg.cutout % 2)) & (
            jnp.abs(cols - cx) < half + (cfg.cutout % 2)
        )
        x = jnp.where(mask[..., None], 0.5, x)
    return x


def init_variables(config: ConvMixerConfig, seed: int) -> dict:
    """Freshly initialized ``{'params', 'batch_stats'}`` for ``config``."""
    model = ConvMixer(config)
    dummy = jnp.zeros((1, config.image_size, config.image_size, config.channels), jnp.float32)
    variables = model.init(jax.random.PRNGKey(seed), dummy, train=False)
    return jax.tree.map(np.asarray, dict(variables))


def make_step(config: ConvMixerConfig, cfg: TrainConfig, tx, data_sharding, repl_sharding):
    """The classifier's jit-compiled training step for recipe ``cfg``.

    ``step(state, images, labels) -> (state, mean loss, number correct)``: images (B, H, W, C)
    uint8 sharded by ``data_sharding`` (augmented on device with the key
    ``fold_in(PRNGKey(cfg.seed), state['step'])``), labels (B,) int32; the state
    (:func:`initial_state`, replicated by ``repl_sharding``) is donated. Every parameter is
    trained and every BatchNorm runs in train mode (:mod:`convmixer_jax.training.step`);
    with an ``'ema'`` entry the state's EMA is updated after the step.
    """

    def prepare(state, images, labels):
        rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), state["step"])
        return augment_batch(rng, images, cfg), labels

    def update_ema(state, new):
        if "ema" not in state:
            return new
        t = state["step"].astype(jnp.float32)
        decay = jnp.minimum(cfg.ema_decay, (1.0 + t) / (10.0 + t))
        new["ema"] = jax.tree.map(
            lambda e, v: decay * e + (1.0 - decay) * v,
            state["ema"],
            {"params": new["params"], "batch_stats": new["batch_stats"]},
        )
        return new

    return make_train_step(
        ConvMixer(config),
        tx,
        one_hot_cross_entropy(config.num_classes, cfg.label_smoothing),
        batch_norm="train",
        prepare=prepare,
        after=update_ema,
        jit_kwargs=dict(
            donate_argnums=(0,),
            in_shardings=(repl_sharding, data_sharding, data_sharding),
            out_shardings=(repl_sharding, repl_sharding, repl_sharding),
        ),
    )


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The example order of ``epoch``: a permutation of 0..n-1 fixed by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def _checkpoint_manager(workdir: Path):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(),
        # Synchronous saves (a signal never meets a half-finished background write), and
        # the temporary folder of a save that was interrupted is removed at the next start.
        options=ocp.CheckpointManagerOptions(
            max_to_keep=2,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=False,
        ),
    )


def train(
    config: ConvMixerConfig,
    cfg: TrainConfig,
    train_data,
    test_data,
    workdir,
    *,
    resume: bool = False,
    progress: bool = True,
    init_variables_: dict | None = None,
    init_from: dict | None = None,
    max_epochs_this_run: int | None = None,
    log=print,
) -> tuple[dict, dict]:
    """Train ``config`` with recipe ``cfg``; checkpoint and log into ``workdir``.

    train_data / test_data: (images (N, H, W, C) uint8, labels (N,) int).
    test_data may be None (no per-epoch evaluation).
    Returns the final variables ``{'params', 'batch_stats'}`` and the log dict
    (also written to ``workdir/train_log.json``).
    ``max_epochs_this_run`` stops early (a later ``resume`` continues).
    ``init_variables_`` starts from given weights instead of a fresh initialization
    (a warm start: the recipe's optimizer and schedule begin anew); ``init_from``
    describes where they came from (JSON-able; kept in the log as ``init_from``
    and checked on ``resume``). In a multi-process run every process calls this with
    the same arguments; only process 0 logs, shows progress and writes the log file.
    """
    import orbax.checkpoint as ocp

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    writer = is_writer()
    if not writer:
        progress, log = False, (lambda message: None)
    images, labels = train_data
    val_data = None
    if cfg.holdout:
        from convmixer_jax.data.loader import stratified_holdout

        keep, held = stratified_holdout(labels, cfg.holdout, cfg.holdout_seed)
        val_data = (images[held], labels[held])
        images, labels = images[keep], labels[keep]
    labels = np.asarray(labels, np.int32)
    n = len(images)
    devices = jax.devices()
    if cfg.batch_size % len(devices):
        raise ValueError(
            f"batch size {cfg.batch_size} is not divisible by the {len(devices)} devices "
            f"of this run; choose a multiple of {len(devices)}"
        )
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{n} training images are fewer than one batch of {cfg.batch_size}")
    mesh = global_mesh("data")
    data_sharding, repl = by_rows(mesh), replicated(mesh)
    tx = make_optimizer(cfg, steps_per_epoch)
    step_fn = make_step(config, cfg, tx, data_sharding, repl)

    variables = init_variables_ if init_variables_ is not None else init_variables(config, cfg.seed)
    state = initial_state(cfg, tx, variables)
    log_path = workdir / "train_log.json"
    history = {
        "model": config.to_dict(),
        "recipe": cfg.to_dict(),
        "epochs": [],
        "devices": [str(d) for d in devices],
        "train_images": n,
    }
    if val_data is not None:
        history["holdout"] = {
            "images": int(len(val_data[0])),
            "seed": cfg.holdout_seed,
            "per_class": {
                int(c): int(k)
                for c, k in zip(*np.unique(val_data[1], return_counts=True), strict=True)
            },
        }
    if init_from is not None:
        history["init_from"] = init_from
    mngr = _checkpoint_manager(workdir)
    start_epoch = 0
    if resume and mngr.latest_step() is not None:
        latest = mngr.latest_step()
        abstract = jax.tree.map(
            lambda v: jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=repl), state
        )
        state = mngr.restore(latest, args=ocp.args.StandardRestore(abstract))
        start_epoch = latest
        if log_path.exists():
            saved = json.loads(log_path.read_text())
            # models and recipes saved before a field existed have its default
            if saved.get("recipe") is not None:
                saved["recipe"] = TrainConfig.from_dict(saved["recipe"]).to_dict()
            if saved.get("model") is not None:
                saved["model"] = type(config).from_dict(saved["model"]).to_dict()
            for what, now in (
                ("model", config.to_dict()),
                ("recipe", cfg.to_dict()),
                ("init_from", init_from),
            ):
                if json.loads(json.dumps(now)) != json.loads(json.dumps(saved.get(what))):
                    raise ValueError(
                        f"--resume with a different {what} than the run in {workdir} "
                        f"(saved {saved.get(what)}, now {now}); use the same options "
                        "or another --workdir"
                    )
            history = dict(saved, devices=history["devices"])
            history["epochs"] = [e for e in history["epochs"] if e["epoch"] <= latest]
        log(f"resumed from epoch {latest} checkpoint in {workdir}")
    elif mngr.latest_step() is not None and not resume:
        raise FileExistsError(
            f"{workdir} already holds checkpoints; pass --resume to continue "
            "or choose another directory"
        )
    else:
        state = replicate(state, mesh)

    stop_epoch = (
        cfg.epochs
        if max_epochs_this_run is None
        else min(cfg.epochs, start_epoch + max_epochs_this_run)
    )
    try:
        for epoch in range(start_epoch, stop_epoch):
            order = epoch_order(cfg.seed, epoch, n)
            t0 = time.perf_counter()
            loss_sum, correct_sum, seen = 0.0, 0, 0
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(
                    total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step"
                )
            pending = []
            for s in range(steps_per_epoch):
                idx = np.sort(order[s * cfg.batch_size : (s + 1) * cfg.batch_size])
                # each process reads only its own rows of the batch
                xb, yb = shard_rows(images, mesh, idx), shard_rows(labels, mesh, idx)
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
                        bar.set_postfix(
                            loss=f"{loss_sum / seen:.3f}",
                            acc=f"{correct_sum / seen:.3f}",
                            img_s=f"{seen / dt:.0f}",
                        )
                        bar.refresh()
            if bar is not None:
                bar.close()
            train_seconds = time.perf_counter() - t0
            entry = {
                "epoch": epoch + 1,
                "train_loss": loss_sum / seen,
                "train_accuracy": correct_sum / seen,
                "train_seconds": train_seconds,
                "images_per_second": seen / train_seconds,
            }
            variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
            for name, data in (("val", val_data), ("test", test_data)):
                if data is not None:
                    entry[f"{name}_accuracy"] = accuracy(config, variables, data[0], data[1])
                    if "ema" in state:
                        entry[f"{name}_accuracy_ema"] = accuracy(
                            config, state["ema"], data[0], data[1]
                        )
            history["epochs"].append(entry)
            with deferred_interrupts():  # a signal waits for the save: no half-written checkpoint
                mngr.save(epoch + 1, args=ocp.args.StandardSave(state))  # every process takes part
                mngr.wait_until_finished()
                if writer:
                    write_json_atomic(log_path, history)
            log(json.dumps(entry))
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM): close the manager and drop the temporary folder of
        # a save that did not finish, so the workdir holds complete checkpoints only. Orbax's
        # helper threads then log the shutdown as errors with tracebacks; the interruption is
        # reported once by the caller instead.
        import logging

        logging.getLogger("absl").setLevel(logging.CRITICAL)
        try:
            mngr.close()
        except Exception:  # noqa: BLE001 - a half-finished save may fail to close; its folder goes below
            pass
        if writer:
            _drop_unfinished_saves(workdir / "checkpoints")
        raise
    mngr.close()
    weights = choose_weights(history)
    history["weights"] = weights
    chosen = state["ema"] if weights == "ema" else state
    variables = to_host({"params": chosen["params"], "batch_stats": chosen["batch_stats"]})
    return variables, history


def _drop_unfinished_saves(ckpt_dir: Path, settle_seconds: float = 2.0) -> None:
    """Remove Orbax's temporary folders of interrupted saves; Orbax's helper threads may still
    create one just after the interruption, so look again until none has appeared for a while."""
    deadline, quiet = time.monotonic() + settle_seconds, 0
    while time.monotonic() < deadline and quiet < 5:
        found = list(ckpt_dir.glob("*.orbax-checkpoint-tmp*"))
        for tmp in found:
            shutil.rmtree(tmp, ignore_errors=True)
        quiet = 0 if found else quiet + 1
        time.sleep(0.05)


def initial_state(cfg: TrainConfig, tx, variables: dict) -> dict:
    """The training state of ``variables`` ``{'params', 'batch_stats'}``: those, the optimizer
    state ``tx.init(params)``, the step counter 0 and, when ``cfg`` keeps an EMA, its start
    (a copy of the variables)."""
    state = {
        "params": variables["params"],
        "batch_stats": variables["batch_stats"],
        "opt_state": tx.init(variables["params"]),
        "step": jnp.zeros((), jnp.int32),
    }
    if cfg.ema_decay:
        state["ema"] = jax.tree.map(
            jnp.array, {"params": variables["params"], "batch_stats": variables["batch_stats"]}
        )
    return state


def choose_weights(history: dict) -> str:
    """'ema' or 'raw': which weights of a run are its model.

    The EMA weights when the recipe keeps an EMA, unless the newest epoch's
    validation accuracy (never the test accuracy) is higher for the raw weights.
    """
    if not (history.get("recipe") or {}).get("ema_decay"):
        return "raw"
    last = history["epochs"][-1] if history.get("epochs") else {}
    if "val_accuracy" in last and last["val_accuracy"] > last.get("val_accuracy_ema", -1.0):
        return "raw"
    return "ema"


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
    state = jax.eval_shape(lambda v: initial_state(cfg, tx, v), abstract_vars)
    repl = replicated(global_mesh("data"))  # onto this run's devices, however many saved it
    state = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=repl), state)
    restored = mngr.restore(latest, args=ocp.args.StandardRestore(state))
    mngr.close()
    entry = next((e for e in history["epochs"] if e["epoch"] == latest), None)
    weights = choose_weights({**history, "epochs": [entry] if entry else []})
    chosen = restored["ema"] if weights == "ema" else restored
    variables = to_host({"params": chosen["params"], "batch_stats": chosen["batch_stats"]})
    this_run = sum(e["train_seconds"] for e in history["epochs"] if e["epoch"] <= latest)
    return (
        config,
        variables,
        {
            "epoch": latest,
            "epochs_planned": cfg.epochs,
            "recipe": cfg.to_dict(),
            "log": entry,
            "train_seconds": this_run,
            "weights": weights,
            "holdout": history.get("holdout"),
            "train_images": history.get("train_images"),
            "init_from": history.get("init_from"),
        },
    )


def init_variables_abstract(config: ConvMixerConfig):
    """``model.init`` for use under ``jax.eval_shape`` (shapes only, no compute)."""
    model = ConvMixer(config)
    dummy = jnp.zeros((1, config.image_size, config.image_size, config.channels), jnp.float32)
    return model.init(jax.random.PRNGKey(0), dummy, train=False)


def total_train_seconds(history: dict) -> float:
    return float(sum(e["train_seconds"] for e in history["epochs"]))


__all__ = [
    "TrainConfig",
    "RECIPES",
    "AUGMENTATIONS",
    "choose_weights",
    "train",
    "init_variables",
    "augment_batch",
    "make_optimizer",
    "make_step",
    "initial_state",
    "load_checkpoint",
    "init_variables_abstract",
    "epoch_order",
    "total_train_seconds",
]
