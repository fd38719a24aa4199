"""Training the classifier: on-device augmentation, its jit-compiled data-parallel step
(built by :mod:`convmixer_jax.training.step`), an EMA of the weights, Orbax checkpoints
at every epoch's end and every few minutes inside an epoch, and exact resume. The recipes
are in :mod:`convmixer_jax.training.recipes`; the training folder, its lock and its
checkpoint folders in :mod:`convmixer_jax.training.workdir`.

Determinism: the epoch's example order comes from ``numpy.random.default_rng([seed, epoch])``
and each step's augmentation key from ``fold_in(PRNGKey(seed), step)``, so a run
resumed from any checkpoint, at an epoch's end or inside one, retraces the
uninterrupted run exactly.

Several processes (:mod:`convmixer_jax.parallel`): the batch is split over every
device of every process and each process feeds only its own rows of it; the state
is replicated. Every process must hold the same training data. The trained weights
equal a one-process run's up to the order of the cross-device sums. Process 0
writes the log; every process takes part in Orbax's checkpoint saves (the
``workdir`` must be one shared folder), and a checkpoint restores on any number
of processes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from convmixer_jax.data.pipeline import train_batches
from convmixer_jax.data.sources import take_rows
from convmixer_jax.files.atomic import deferred_interrupts, write_json_atomic
from convmixer_jax.model import build as _build
from convmixer_jax.model.config import ConvMixerConfig, config_from_dict
from convmixer_jax.model.inference import accuracy
from convmixer_jax.parallel.global_arrays import (
    by_rows,
    from_process_rows,
    global_mesh,
    process_rows,
    replicate,
    replicated,
    to_host,
)
from convmixer_jax.parallel.runtime import from_process_zero, is_writer, process_count
from convmixer_jax.training.randaugment import rand_augment
from convmixer_jax.training.recipes import AUGMENTATIONS, RECIPES, TrainConfig
from convmixer_jax.training.step import make_train_step, one_hot_cross_entropy
from convmixer_jax.training.workdir import (
    EPOCH_CHECKPOINTS,
    MID_EPOCH_CHECKPOINTS,
    CheckpointError,
    check_digest,
    check_workdir,
    locked_workdir,
    record_digest,
    saved_steps,
)

#: The entry of ``train_log.json`` that holds each checkpoint's digest, by its path in the workdir.
DIGESTS = "checkpoint_sha256"


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


def init_variables(config, seed: int) -> dict:
    """Freshly initialized variables (``{'params', 'batch_stats'}`` of a ConvMixer,
    ``{'params'}`` of a ViT) for ``config``."""
    return _build.init_variables(config, seed)


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
            _build.model_variables(config, new),
        )
        return new

    return make_train_step(
        _build.build_model(config),
        tx,
        one_hot_cross_entropy(config.num_classes, cfg.label_smoothing),
        batch_norm="train" if _build.has_batch_norm(config) else None,
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


@functools.lru_cache(maxsize=4)
def _epoch_order_cached(seed: int, epoch: int, n: int) -> np.ndarray:
    order = epoch_order(seed, epoch, n)
    order.flags.writeable = False
    return order


@dataclass(frozen=True)
class StepRows:
    """The training rows of each step for one process: ``rows(step)`` (stop - start,) are
    rows ``start:stop`` of the step's batch, the batch being positions ``s*B .. (s+1)*B - 1``
    of :func:`epoch_order` (``epoch, s = divmod(step, steps_per_epoch)``), sorted. A
    function of the step alone, so that any step's batch can be read again."""

    seed: int
    n: int
    batch_size: int
    steps_per_epoch: int
    start: int
    stop: int

    def __call__(self, step: int) -> np.ndarray:
        epoch, s = divmod(int(step), self.steps_per_epoch)
        order = _epoch_order_cached(self.seed, epoch, self.n)
        batch = np.sort(order[s * self.batch_size : (s + 1) * self.batch_size])
        return batch[self.start : self.stop]


@contextlib.contextmanager
def _quiet_orbax():
    """Hold back Orbax's log lines (it logs a damaged file before raising, or instead)."""
    import logging

    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        absl.setLevel(level)


def _checkpoint_manager(
    folder: Path,
    *,
    keep: int | None = None,
    writing: bool = True,
    items: tuple[str, ...] | None = None,
):
    """An Orbax manager of the checkpoints in ``folder``. Writing: synchronous saves (a signal
    never meets a half-finished background write), the newest ``keep`` kept, the folder
    created, and the temporary folders of interrupted saves removed first, here and now
    (the workdir's lock makes sure they are no other run's; Orbax's own sweep would run in
    a thread of its own). Reading: nothing created or removed. ``items``: the names of the
    items of each checkpoint (None: Orbax tells from the checkpoints there; a folder of
    checkpoints of the state alone then takes no other kind)."""
    import orbax.checkpoint as ocp

    if writing and is_writer():
        for tmp in folder.glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)
    with _quiet_orbax():  # it reads the checkpoints' metadata
        return ocp.CheckpointManager(
            folder.absolute(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=writing,
                cleanup_tmp_directories=False,
                enable_async_checkpointing=False,
            ),
            item_names=items,
        )


def _cause(e: BaseException) -> str:
    """The first line of an exception's message, short (Orbax's run to many lines)."""
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    text = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _restore(mngr, step: int, args, folder: Path, advice: str):
    """``mngr.restore(step, args)``; a checkpoint that cannot be read back (Orbax raises bare
    ``Exception``s for damaged files, after logging them) is a one-line
    :class:`CheckpointError`, and Orbax's own log lines stay quiet."""
    try:
        with _quiet_orbax():
            return mngr.restore(step, args=args)
    except Exception as e:  # noqa: BLE001 - whatever Orbax raised, the checkpoint is unusable
        raise CheckpointError(
            f"cannot read the checkpoint {folder / str(step)} ({_cause(e)}): it is damaged "
            f"or was written by another program; {advice}"
        ) from None


def _fallback_advice(workdir: Path, broken: Path, older: int | None, action: str) -> str:
    """What to do about the unreadable checkpoint ``broken``: use the one before it
    (``older``, an epoch) if there is one; ``action`` is 'resume from' or 'export'."""
    if older is not None:
        return (
            f"move {broken} out of {workdir} to {action} the checkpoint before it (epoch {older})"
        )
    then = (
        "train afresh with another --workdir"
        if action == "resume from"
        else "there is nothing to export; train again"
    )
    return f"{workdir} holds no older checkpoint: {then}"


def _read_log(log_path: Path) -> dict:
    try:
        return json.loads(log_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"cannot read {log_path} ({_cause(e)}): the training folder is damaged; train "
            "afresh with another --workdir"
        ) from None


def _fields_that_differ(saved, now) -> str:
    saved = json.loads(json.dumps(saved))
    now = json.loads(json.dumps(now))
    if not isinstance(saved, dict) or not isinstance(now, dict):
        return f"{saved} in the checkpoint, {now} now"
    return ", ".join(
        f"{k} {saved.get(k)} in the checkpoint, {now.get(k)} now"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
    )


def _check_same_run(saved: dict, config, cfg: TrainConfig, init_from, n: int, workdir) -> None:
    """Raise ValueError unless the run saved in ``workdir`` (its ``train_log.json``) is the one
    being resumed: the same architecture, recipe, warm start and number of training images."""
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
            hint = (
                "give the options of the run that wrote it"
                if what != "init_from"
                else "give the --init-from of the run that wrote it"
            )
            raise ValueError(
                f"--resume with a different {what} than the run in {workdir} "
                f"({_fields_that_differ(saved.get(what), now)}); {hint}, "
                "or choose another --workdir"
            )
    if saved.get("train_images") not in (None, n):
        raise ValueError(
            f"--resume with {n} training images, but the run in {workdir} trained on "
            f"{saved['train_images']}; give the same data and --limit-train, or choose "
            "another --workdir"
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
    checkpoint_seconds: float | None = 300.0,
    checkpoint_every_steps: int | None = None,
    workers: int = 0,
) -> tuple[dict, dict]:
    """Train ``config`` with recipe ``cfg``; checkpoint and log into ``workdir``.

    train_data / test_data: (images (N, H, W, C) uint8, labels (N,) int); the images an
    array or a row reader of :mod:`convmixer_jax.data.sources` (read batch by batch, each
    process reading only its own rows of each batch, through
    :func:`convmixer_jax.data.pipeline.train_batches`). test_data may be None (no
    per-epoch evaluation).
    Returns the final variables ``{'params', 'batch_stats'}`` and the log dict
    (also written to ``workdir/train_log.json``).
    ``max_epochs_this_run`` stops early (a later ``resume`` continues).
    ``init_variables_`` starts from given weights instead of a fresh initialization
    (a warm start: the recipe's optimizer and schedule begin anew); ``init_from``
    describes where they came from (JSON-able; kept in the log as ``init_from``
    and checked on ``resume``). In a multi-process run every process calls this with
    the same arguments; only process 0 logs, shows progress and writes the log file.

    Checkpoints (:mod:`convmixer_jax.training.workdir`): one at the end of every epoch,
    and inside an epoch once ``checkpoint_seconds`` have passed since the last one
    (checked every 10 steps) and every ``checkpoint_every_steps`` steps; ``resume``
    continues from the newest at its exact step, retracing the uninterrupted run: each
    checkpoint holds the data iterator's position (its Grain state, item ``data``) beside
    the training state (checkpoints written before the position was saved resume from
    their step, which fixes the same position).
    The run holds ``workdir``'s lock throughout; another run on it is refused
    (:class:`~convmixer_jax.training.workdir.WorkdirError`), as are ``resume`` without a
    checkpoint and a fresh run over checkpoints. Interrupted (``KeyboardInterrupt``, which
    SIGTERM's handler may subclass), the exception is re-raised with a one-line ``message``
    attribute saying where training stopped and what was saved, and a ``saved_checkpoint``
    attribute: that checkpoint's folder, or None. ``workers`` > 0 reads the training
    batches in that many processes (worth it for image trees decoded per batch).
    """
    workdir = Path(workdir)
    images, labels = train_data
    labels = np.asarray(labels)
    val_data = None
    if cfg.holdout:
        from convmixer_jax.data.loader import stratified_holdout

        keep, held = stratified_holdout(labels, cfg.holdout, cfg.holdout_seed)
        val_data = (take_rows(images, held), labels[held])
        images, labels = take_rows(images, keep), labels[keep]
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
    if checkpoint_every_steps is not None and checkpoint_every_steps < 1:
        raise ValueError(f"checkpoint_every_steps must be positive, got {checkpoint_every_steps}")
    with locked_workdir(workdir):  # before anything else touches it
        check_workdir(workdir, resume)
        return _train_locked(
            config,
            cfg,
            (images, labels),
            val_data,
            test_data,
            workdir,
            resume=resume,
            progress=progress,
            init_variables_=init_variables_,
            init_from=init_from,
            max_epochs_this_run=max_epochs_this_run,
            log=log,
            checkpoint_seconds=checkpoint_seconds,
            checkpoint_every_steps=checkpoint_every_steps,
            workers=workers,
        )


def _train_locked(
    config,
    cfg,
    train_data,
    val_data,
    test_data,
    workdir: Path,
    *,
    resume,
    progress,
    init_variables_,
    init_from,
    max_epochs_this_run,
    log,
    checkpoint_seconds,
    checkpoint_every_steps,
    workers,
):
    """:func:`train` once the data are checked and ``workdir`` is held."""
    import orbax.checkpoint as ocp

    writer = is_writer()
    if not writer:
        progress, log = False, (lambda message: None)
    images, labels = train_data
    n = len(images)
    devices = jax.devices()
    steps_per_epoch = n // cfg.batch_size
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
    epochs_dir, mid_dir = workdir / EPOCH_CHECKPOINTS, workdir / MID_EPOCH_CHECKPOINTS
    if resume and log_path.exists():  # before Orbax reads a checkpoint of another shape
        saved = _read_log(log_path)
        _check_same_run(saved, config, cfg, init_from, n, workdir)
        history = dict(saved, devices=history["devices"])
    epoch_mngr = _checkpoint_manager(epochs_dir, keep=2, items=("state", DATA_ITEM))
    mid_mngr = _checkpoint_manager(mid_dir, keep=1, items=("state", "sums", DATA_ITEM))
    managers = (epoch_mngr, mid_mngr)
    sums = None  # the running sums of a checkpoint taken inside an epoch
    data_state = None  # the data iterator's position saved with the checkpoint resumed from
    try:
        if resume:
            state, sums, data_state, start = _resume(
                epoch_mngr, mid_mngr, state, repl, history, workdir, steps_per_epoch, log
            )
            history["epochs"] = [
                e for e in history["epochs"] if e["epoch"] <= start // steps_per_epoch
            ]
        else:
            state, start = replicate(state, mesh), 0
    except BaseException as e:
        _close_managers(managers, [epochs_dir, mid_dir] if writer else [])
        if isinstance(e, KeyboardInterrupt):
            e.message = (
                f"stopped while reading the newest checkpoint in {workdir}, which is "
                "unchanged; continue with --resume"
            )
            e.saved_checkpoint = workdir
        raise
    saved_step = start if resume else None  # the newest checkpoint on disk, as a step
    history["steps_per_epoch"] = steps_per_epoch

    start_epoch, start_in_epoch = divmod(start, steps_per_epoch)
    stop_epoch = (
        cfg.epochs
        if max_epochs_this_run is None
        else min(cfg.epochs, start_epoch + max_epochs_this_run)
    )
    total_steps = stop_epoch * steps_per_epoch
    # each process reads only its own rows of every batch, in the order fixed by the seed
    lo, hi = process_rows(mesh, cfg.batch_size)
    step_rows = StepRows(cfg.seed, n, cfg.batch_size, steps_per_epoch, lo, hi)
    # the iterator starts at the step its saved state was taken from (Grain's state counts
    # from there; with worker processes it is theirs), or at the step resumed from
    first_step = start if data_state is None else int(data_state["start_step"])
    feed = train_batches(
        images,
        labels,
        step_rows,
        hi - lo,
        steps=max(total_steps, start),
        start_step=first_step,
        workers=workers,
    )
    if data_state is not None:
        feed.set_state(data_state["grain"])

    def data_position(step: int) -> dict:
        """What a checkpoint of ``step`` saves of the data iterator."""
        return {"next_index": step, "start_step": first_step, "grain": feed.get_state()}
    bar = None
    if progress and start < total_steps:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total_steps,
            initial=start,
            desc=f"training {cfg.epochs} epochs",
            unit="step",
            dynamic_ncols=True,
        )

    def emit(message: str) -> None:
        if bar is None:
            log(message)
        else:  # the bar steps aside for the line and is drawn again below it
            with bar.external_write_mode():
                log(message)

    def checkpoint_due(step: int, flushed: bool, last_save: float) -> bool:
        if checkpoint_every_steps and step % checkpoint_every_steps == 0:
            return True
        if not flushed or checkpoint_seconds is None:
            return False
        due = time.monotonic() - last_save >= checkpoint_seconds
        if process_count() > 1:  # every process takes part in a save: process 0's clock decides
            due = bool(from_process_zero(np.asarray(due)))
        return due

    step = start
    last_save = time.monotonic()
    try:
        for epoch in range(start_epoch, stop_epoch):
            first = start_in_epoch if epoch == start_epoch else 0
            if sums is not None and epoch == start_epoch:
                loss_sum, correct_sum = float(sums["loss_sum"]), int(sums["correct_sum"])
                seen, before = int(sums["seen"]), float(sums["seconds"])
            else:
                loss_sum, correct_sum, seen, before = 0.0, 0, 0, 0.0
            t0 = time.perf_counter() - before
            if bar is not None:
                bar.set_postfix_str(f"epoch {epoch + 1}/{cfg.epochs}")
            pending = []
            for s in range(first, steps_per_epoch):
                xb, yb = next(feed)  # this process's rows of the batch
                xb = from_process_rows(xb, mesh, cfg.batch_size)
                yb = from_process_rows(yb, mesh, cfg.batch_size)
                state, loss, correct = step_fn(state, xb, yb)
                step += 1
                pending.append((loss, correct))
                last = s == steps_per_epoch - 1
                flushed = len(pending) >= 10 or last
                save_now = not last and checkpoint_due(step, flushed, last_save)
                if flushed or save_now:
                    for l_, c_ in pending:
                        loss_sum += float(l_) * cfg.batch_size
                        correct_sum += int(c_)
                        seen += cfg.batch_size
                    pending = []
                    if bar is not None:
                        dt = time.perf_counter() - t0
                        bar.set_postfix_str(
                            f"epoch {epoch + 1}/{cfg.epochs}, loss={loss_sum / seen:.3f}, "
                            f"acc={correct_sum / seen:.3f}, img/s={seen / dt:.0f}",
                            refresh=False,
                        )
                        bar.update(step - bar.n)
                if save_now:
                    sums_now = {
                        "loss_sum": loss_sum,
                        "correct_sum": correct_sum,
                        "seen": seen,
                        "seconds": time.perf_counter() - t0,
                    }
                    with deferred_interrupts():  # no half-written checkpoint
                        mid_mngr.save(
                            step,
                            args=ocp.args.Composite(
                                state=ocp.args.StandardSave(state),
                                sums=ocp.args.JsonSave(sums_now),
                                data=ocp.args.JsonSave(data_position(step)),
                            ),
                        )
                        mid_mngr.wait_until_finished()
                        if writer:  # what ran, for a resume's checks, and what was saved
                            record_digest(
                                history.setdefault(DIGESTS, {}), workdir, mid_dir / str(step)
                            )
                            write_json_atomic(log_path, history)
                        saved_step, last_save = step, time.monotonic()
            train_seconds = time.perf_counter() - t0
            entry = {
                "epoch": epoch + 1,
                "train_loss": loss_sum / seen,
                "train_accuracy": correct_sum / seen,
                "train_seconds": train_seconds,
                "images_per_second": seen / train_seconds,
            }
            variables = _build.model_variables(config, state)
            for name, data in (("val", val_data), ("test", test_data)):
                if data is not None:
                    entry[f"{name}_accuracy"] = accuracy(config, variables, data[0], data[1])
                    if "ema" in state:
                        entry[f"{name}_accuracy_ema"] = accuracy(
                            config, state["ema"], data[0], data[1]
                        )
            history["epochs"].append(entry)
            with deferred_interrupts():  # a signal waits for the save: no half-written checkpoint
                epoch_mngr.save(  # every process
                    epoch + 1,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardSave(state),
                        data=ocp.args.JsonSave(data_position(step)),
                    ),
                )
                epoch_mngr.wait_until_finished()
                for old in mid_mngr.all_steps():  # the epoch's own checkpoint supersedes them
                    mid_mngr.delete(old)
                if writer:
                    record_digest(
                        history.setdefault(DIGESTS, {}), workdir, epochs_dir / str(epoch + 1)
                    )
                    write_json_atomic(log_path, history)
                saved_step, last_save = step, time.monotonic()
            emit(json.dumps(entry))
    except BaseException as e:
        # Interrupted (Ctrl-C, SIGTERM) or failed: close the bar first, so that what is
        # reported next starts on a line of its own, then the managers.
        if bar is not None:
            bar.close()
        feed.close()
        _close_managers(managers, [epochs_dir, mid_dir] if writer else [])
        if isinstance(e, KeyboardInterrupt):
            _describe_interrupt(
                e, step, total_steps, steps_per_epoch, cfg.epochs, saved_step, workdir
            )
        raise
    if bar is not None:
        bar.close()
    feed.close()
    for mngr in managers:
        mngr.close()
    weights = choose_weights(history)
    history["weights"] = weights
    chosen = state["ema"] if weights == "ema" else state
    variables = to_host(_build.model_variables(config, chosen))
    return variables, history


def _resume(epoch_mngr, mid_mngr, state, repl, history, workdir: Path, per_epoch: int, log):
    """Restore the newest checkpoint of ``workdir`` (inside an epoch or at its end) onto the
    structure of ``state``: ``(state, running sums or None, the data iterator's state or
    None, optimizer steps done)``. ``history``: the run's log, holding the checkpoints'
    digests. A checkpoint without the data iterator's state (written before it was saved)
    gives None: the step fixes the data position."""
    import orbax.checkpoint as ocp

    epochs_dir, mid_dir = workdir / EPOCH_CHECKPOINTS, workdir / MID_EPOCH_CHECKPOINTS
    abstract = jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=repl), state
    )
    epochs, mids = saved_steps(epochs_dir), saved_steps(mid_dir)
    last_epoch = epochs[-1] if epochs else None
    digests = history.get(DIGESTS, {})
    if mids and mids[-1] > (last_epoch or 0) * per_epoch:
        start = mids[-1]
        advice = _fallback_advice(workdir, mid_dir / str(start), last_epoch, "resume from")
        check_digest(digests, workdir, mid_dir / str(start), advice)
        items = dict(state=ocp.args.StandardRestore(abstract), sums=ocp.args.JsonRestore())
        if _has_item(mid_dir, start, DATA_ITEM):
            items[DATA_ITEM] = ocp.args.JsonRestore()
        restored = _restore(mid_mngr, start, ocp.args.Composite(**items), mid_dir, advice)
        restored = {name: restored[name] for name in items}
        log(
            f"resumed from epoch {start // per_epoch + 1} step {start % per_epoch}/{per_epoch} "
            f"checkpoint in {workdir}"
        )
        data = _data_state(restored, start, mid_dir / str(start))
        return restored["state"], dict(restored["sums"]), data, start
    older = epochs[-2] if len(epochs) > 1 else None
    advice = _fallback_advice(workdir, epochs_dir / str(last_epoch), older, "resume from")
    check_digest(digests, workdir, epochs_dir / str(last_epoch), advice)
    restored = _restore_epoch(epoch_mngr, last_epoch, abstract, epochs_dir, advice, data=True)
    log(f"resumed from epoch {last_epoch} checkpoint in {workdir}")
    start = last_epoch * per_epoch
    data = _data_state(restored, start, epochs_dir / str(last_epoch))
    return restored["state"], None, data, start


#: The item of a checkpoint that holds the data iterator's state.
DATA_ITEM = "data"
#: The one item of an epoch checkpoint written before the data position was saved.
_STATE_ONLY_ITEM = "default"


def _has_item(folder: Path, step: int, item: str) -> bool:
    return (folder / str(step) / item).is_dir()


def _restore_epoch(mngr, step: int, abstract, folder: Path, advice: str, *, data: bool) -> dict:
    """The epoch checkpoint ``step`` of ``folder``: ``{'state'}`` and, when it holds one and
    ``data`` asks for it, the data iterator's state (``'data'``). Reads both layouts: the
    training state beside the data position, and the state alone of older checkpoints."""
    import orbax.checkpoint as ocp

    if _has_item(folder, step, _STATE_ONLY_ITEM) and not _has_item(folder, step, "state"):
        reader = _checkpoint_manager(folder, writing=False)  # one of the state alone
        try:
            state = _restore(reader, step, ocp.args.StandardRestore(abstract), folder, advice)
        finally:
            reader.close()
        return {"state": state}
    items = {"state": ocp.args.StandardRestore(abstract)}
    if data and _has_item(folder, step, DATA_ITEM):
        items[DATA_ITEM] = ocp.args.JsonRestore()
    restored = _restore(mngr, step, ocp.args.Composite(**items), folder, advice)
    return {name: restored[name] for name in items}


def _data_state(restored: dict, step: int, folder: Path) -> dict | None:
    """The data iterator's position saved with a restored checkpoint of ``step``
    (``{'next_index': step, 'start_step': the step its iterator started at, 'grain': the
    iterator's Grain state}``), checked to point at that step's batch; None for a
    checkpoint without one."""
    if restored.get(DATA_ITEM) is None:
        return None
    data = dict(restored[DATA_ITEM])
    if data.get("next_index") != step or not {"start_step", "grain"} <= set(data):
        raise CheckpointError(
            f"the checkpoint {folder} puts the data at batch {data.get('next_index')} but its "
            f"training state at step {step}; it was not written by this program: resume from "
            "an older checkpoint or start a new --workdir"
        )
    return data


def _close_managers(managers, folders) -> None:
    """Close Orbax managers after an interruption or a failure, and drop the temporary
    folders of saves that did not finish in ``folders``, so the workdir holds complete
    checkpoints only. Orbax's helper threads then log the shutdown as errors with
    tracebacks; the interruption is reported once by the caller instead."""
    import logging

    logging.getLogger("absl").setLevel(logging.CRITICAL)
    for mngr in managers:
        try:
            mngr.close()  # waits for its helper threads (the start-up sweep among them)
        except Exception:  # noqa: BLE001 - a half-finished save may fail to close; its folder goes below
            pass
    _drop_unfinished_saves(folders)


def _describe_interrupt(
    e: BaseException, step: int, total: int, per_epoch: int, epochs: int, saved, workdir: Path
) -> None:
    """Attach to the interrupt ``e`` one line (``e.message``) saying where training stopped
    and what is saved, and that checkpoint's folder (``e.saved_checkpoint``, or None)."""
    done, into = divmod(step, per_epoch)
    epoch = f"{done} of {epochs} epochs done" if not into else f"in epoch {done + 1} of {epochs}"
    where = f"training stopped at step {step} of {total} ({epoch})"
    if saved is None:
        e.message = f"{where}, before its first checkpoint; nothing was saved"
        e.saved_checkpoint = None
        return
    if saved % per_epoch == 0:
        folder = workdir / EPOCH_CHECKPOINTS / str(saved // per_epoch)
    else:
        folder = workdir / MID_EPOCH_CHECKPOINTS / str(saved)
    e.message = (
        f"{where}; saved: the checkpoint of step {saved} in {folder}; continue with --resume"
    )
    e.saved_checkpoint = folder


def _drop_unfinished_saves(folders, settle_seconds: float = 2.0) -> None:
    """Remove Orbax's temporary folders of interrupted saves; Orbax's helper threads may still
    create one just after the interruption, so look again until none has appeared for a while."""
    deadline, quiet = time.monotonic() + settle_seconds, 0
    while time.monotonic() < deadline and quiet < 5:
        found = [tmp for folder in folders for tmp in folder.glob("*.orbax-checkpoint-tmp*")]
        for tmp in found:
            shutil.rmtree(tmp, ignore_errors=True)
        quiet = 0 if found else quiet + 1
        time.sleep(0.05)


def initial_state(cfg: TrainConfig, tx, variables: dict) -> dict:
    """The training state of ``variables`` (``{'params', 'batch_stats'}``, or ``{'params'}``
    for a model without BatchNorm): those, the optimizer state ``tx.init(params)``, the step
    counter 0 and, when ``cfg`` keeps an EMA, its start (a copy of the variables)."""
    model_vars = {k: variables[k] for k in ("params", "batch_stats") if k in variables}
    state = {
        **model_vars,
        "opt_state": tx.init(variables["params"]),
        "step": jnp.zeros((), jnp.int32),
    }
    if cfg.ema_decay:
        state["ema"] = jax.tree.map(jnp.array, model_vars)
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
    workdir = Path(workdir)
    log_path = workdir / "train_log.json"
    if not log_path.exists():
        raise FileNotFoundError(f"{workdir} is not a training directory: no train_log.json")
    history = _read_log(log_path)
    config = config_from_dict(history["model"])
    cfg = TrainConfig.from_dict(history["recipe"])
    epochs_dir = workdir / EPOCH_CHECKPOINTS
    epochs = saved_steps(epochs_dir)
    if not epochs:
        inside = saved_steps(workdir / MID_EPOCH_CHECKPOINTS)
        raise FileNotFoundError(
            f"{workdir} holds no checkpoint of a finished epoch"
            + (
                " (only one taken inside the first epoch); train on to the end of an epoch "
                "(train --resume), then export"
                if inside
                else ""
            )
        )
    latest = epochs[-1]
    tx = make_optimizer(cfg, 1)  # the state's structure does not depend on the schedule length
    abstract_vars = jax.eval_shape(lambda: init_variables_abstract(config))
    state = jax.eval_shape(lambda v: initial_state(cfg, tx, v), abstract_vars)
    repl = replicated(global_mesh("data"))  # onto this run's devices, however many saved it
    state = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=repl), state)
    older = epochs[-2] if len(epochs) > 1 else None
    advice = _fallback_advice(workdir, epochs_dir / str(latest), older, "export")
    check_digest(history.get(DIGESTS, {}), workdir, epochs_dir / str(latest), advice)
    mngr = _checkpoint_manager(epochs_dir, writing=False)  # a run may be writing there
    try:
        restored = _restore_epoch(mngr, latest, state, epochs_dir, advice, data=False)["state"]
    finally:
        mngr.close()
    entry = next((e for e in history["epochs"] if e["epoch"] == latest), None)
    weights = choose_weights({**history, "epochs": [entry] if entry else []})
    chosen = restored["ema"] if weights == "ema" else restored
    variables = to_host(_build.model_variables(config, chosen))
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


def init_variables_abstract(config):
    """``model.init`` for use under ``jax.eval_shape`` (shapes only, no compute)."""
    return _build.init_variables_abstract(config)


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
