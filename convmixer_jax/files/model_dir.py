"""Model directories: a model's config, weights and encryption record on disk.

A model directory holds one model, a ConvMixer or a ViT, plain or encrypted::

    MODEL_DIR/config.json   {"format": "convmixer-jax-model", "version": 1,
                             "model": ConvMixerConfig.to_dict() | ViTConfig.to_dict(),
                             "encryption": null | {"key_fingerprint": "<sha256 hex>",
                                                   "block_size": M, "channels": C,
                                                   ["grid": [gh, gw]]},
                             ...provenance fields (seed, recipe, classes, ...),
                             "variables_sha256": {"<file under variables/>": "<sha256 hex>"},
                             "model_sha256": "<sha256 hex>"}
    MODEL_DIR/variables/    {'params', 'batch_stats'} (ConvMixer) or {'params'} (ViT)
                            as an Orbax checkpoint

A ViT's ``model`` object carries ``"family": "vit"``; without it, the model is a
ConvMixer. The encryption record has ``grid`` only when the key scrambles block positions
(a ViT only: the grid of the key's ``block_perm``, which is the model's grid of patches).

The key itself is never written into a model directory; an encrypted model
records only the key's fingerprint, so that decryption with another key is
refused. Every write goes to a temporary sibling first and is renamed into
place only once complete, so a crash never leaves a half-written model or
file under the requested name.

A model directory is sealed: ``model_sha256`` is the SHA-256 of every other field
of config.json (:func:`~convmixer_jax.files.model_dir.model_digest`), the digests
of the files under ``variables/`` included, so an edit of the architecture, the
normalization, the class names, the encryption record, the provenance or the
weights is refused by every reader, and so is a model without a seal. Only the
fields of :data:`~convmixer_jax.files.model_dir.UNSEALED_FIELDS` may change
freely. A model edited on purpose is sealed again by
:func:`~convmixer_jax.files.model_dir.seal_model_dir` (``convmixer-jax seal-model``).

JAX, Flax and Orbax are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from convmixer_jax.files.atomic import (
    check_output_path,
    deferred_interrupts,
    release_temporary,
    remove_stale_temporaries,
    swap_into_place,
    temporary_name,
)
from convmixer_jax.model.config import ConvMixerConfig, ModelConfig, ViTConfig, config_from_dict
from convmixer_jax.scheme.keys import Key, fingerprint

MODEL_FORMAT = "convmixer-jax-model"
MODEL_VERSION = 1
CONFIG_FILE = "config.json"
VARIABLES_DIR = "variables"
SEAL_FIELD = "model_sha256"
#: Fields of config.json outside the seal: free text a person may add or change (no
#: command reads it). Every other field is sealed.
UNSEALED_FIELDS = ("notes",)
_RESERVED = ("format", "version", "model", "encryption", "variables_sha256", SEAL_FIELD)
_HEX64 = re.compile(r"[0-9a-f]{64}")

PyTree = Any


class ModelDirError(ValueError):
    """A model directory is missing, malformed, inconsistent, or in the wrong state
    (plain where an encrypted one is needed, or the reverse)."""


# --------------------------------------------------------------------------- encryption record


def encryption_record(key: Key) -> dict:
    """What a model directory records about its key: fingerprint, block size, channels,
    and, for a key with block scrambling, its grid ``[gh, gw]``."""
    record = {
        "key_fingerprint": fingerprint(key),
        "block_size": int(key.block_size),
        "channels": int(key.channels),
    }
    if key.scrambles:
        record["grid"] = [int(g) for g in key.grid]
    return record


_RECORD_FIELDS = ("key_fingerprint", "block_size", "channels", "grid")


def _check_record_grid(grid, config: ModelConfig, where: str) -> list[int]:
    from convmixer_jax.scheme.params import CONVMIXER_SCRAMBLING

    if (
        not isinstance(grid, list)
        or len(grid) != 2
        or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)
    ):
        raise ModelDirError(
            f"{where}: 'encryption.grid' must be [gh, gw], two positive integers, got {grid!r}"
        )
    if config.family != "vit":
        raise ModelDirError(
            f"{where}: the recorded key scrambles blocks, but {CONVMIXER_SCRAMBLING}"
        )
    own = [config.grid_size, config.grid_size]
    if grid != own:
        raise ModelDirError(
            f"{where}: the recorded key scrambles a {grid[0]} x {grid[1]} grid of blocks but "
            f"the model has a {own[0]} x {own[1]} grid of patches"
        )
    return list(grid)


def _check_encryption_record(enc, config: ModelConfig, where: str) -> dict | None:
    if enc is None:
        return None
    if isinstance(enc, Key):
        enc = encryption_record(enc)
    if not isinstance(enc, dict):
        raise ModelDirError(
            f"{where}: 'encryption' must be null or an object, got {type(enc).__name__}"
        )
    fp = enc.get("key_fingerprint")
    if not isinstance(fp, str) or not _HEX64.fullmatch(fp):
        raise ModelDirError(f"{where}: 'encryption.key_fingerprint' must be a SHA-256 hex digest")
    for name in ("block_size", "channels"):
        v = enc.get(name)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ModelDirError(f"{where}: 'encryption.{name}' must be an integer, got {v!r}")
    if enc["block_size"] != config.patch_size or enc["channels"] != config.channels:
        raise ModelDirError(
            f"{where}: the recorded key (block size {enc['block_size']}, "
            f"{enc['channels']} channels) does not fit the model (patch size "
            f"{config.patch_size}, {config.channels} channels)"
        )
    unknown = set(enc) - set(_RECORD_FIELDS)
    if unknown:
        raise ModelDirError(
            f"{where}: unknown 'encryption' fields {sorted(unknown)} "
            "(a model directory never stores the key itself)"
        )
    record = {"key_fingerprint": fp, "block_size": enc["block_size"], "channels": enc["channels"]}
    if "grid" in enc:  # absent, not null, for a key without block scrambling
        record["grid"] = _check_record_grid(enc["grid"], config, where)
    return record


# --------------------------------------------------------------------------- variables


def abstract_variables(config: ModelConfig) -> PyTree:
    """The saved variables of ``config`` (``{'params', 'batch_stats'}`` of a ConvMixer,
    ``{'params'}`` of a ViT) as ``jax.ShapeDtypeStruct`` leaves (no compute)."""
    import jax

    from convmixer_jax.model.build import init_variables_abstract, model_variables

    return model_variables(config, jax.eval_shape(lambda: init_variables_abstract(config)))


def _leaves_by_path(tree) -> dict[str, Any]:
    import jax

    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


def check_variables(
    config: ModelConfig, variables: PyTree, *, where: str = "variables"
) -> None:
    """Raise :class:`ModelDirError` unless ``variables`` (arrays or array metadata)
    have exactly the tree, shapes and dtypes that ``config`` defines."""
    from convmixer_jax.model.build import collections

    wanted = collections(config)
    if not isinstance(variables, dict) or set(variables) != set(wanted):
        got = sorted(variables) if isinstance(variables, dict) else type(variables).__name__
        raise ModelDirError(
            f"{where} must be {{{', '.join(repr(w) for w in wanted)}}}, got {got}"
        )
    expected = _leaves_by_path(abstract_variables(config))
    actual = _leaves_by_path(variables)
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    if missing or extra:
        parts = ([f"missing {missing[:3]}"] if missing else []) + (
            [f"unexpected {extra[:3]}"] if extra else []
        )
        raise ModelDirError(f"{where} do not match the model in config.json ({'; '.join(parts)})")
    for name, exp in expected.items():
        got = actual[name]
        shape, dtype = tuple(getattr(got, "shape", ())), getattr(got, "dtype", None)
        if shape != tuple(exp.shape):
            raise ModelDirError(
                f"{where}: {name} has shape {shape} but config.json implies "
                f"{tuple(exp.shape)}; the variables belong to another model"
            )
        if dtype is not None and np.dtype(dtype) != np.dtype(exp.dtype):
            raise ModelDirError(
                f"{where}: {name} has dtype {np.dtype(dtype)}, expected {np.dtype(exp.dtype)}"
            )


def _drop_closed_loop_noise(previous):
    """An unraisable-exception hook that drops ``RuntimeError('Event loop is closed')``.

    When Orbax fails to read a damaged checkpoint it closes its asyncio loop
    while TensorStore reads are still in flight; their completion callbacks then
    report this error from TensorStore's threads, after the failure has already
    been turned into a :class:`ModelDirError`. Everything else goes to ``previous``.
    """

    def hook(unraisable):
        exc = unraisable.exc_value
        if (
            isinstance(exc, RuntimeError)
            and str(exc) == "Event loop is closed"
            and unraisable.object is None
        ):
            return
        previous(unraisable)

    hook._convmixer_jax_filter = True
    return hook


@contextlib.contextmanager
def _quiet_orbax():
    """Silence Orbax's warnings about damaged checkpoints (reported as ModelDirError instead)."""
    import sys

    if not getattr(sys.unraisablehook, "_convmixer_jax_filter", False):
        sys.unraisablehook = _drop_closed_loop_noise(sys.unraisablehook)
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


def _checkpointer():
    """An Orbax checkpointer of this process alone: a model directory is one process's file
    (in a multi-process run process 0 writes it and every process reads it by itself)."""
    import jax
    import orbax.checkpoint as ocp

    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me,
            active_processes={me},
            barrier_sync_key_prefix=f"model-dir-process-{me}",
        )
    )


def _save_variables(directory: Path, variables: PyTree) -> None:
    # a failed save (a full disk) is raised here as one error; Orbax's threads would also
    # log it with tracebacks
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.CRITICAL)
    ckptr = _checkpointer()
    try:
        ckptr.save(directory.absolute(), variables)
        ckptr.wait_until_finished()
    finally:
        ckptr.close()
        absl_logger.setLevel(level)


def _restore_variables(directory: Path, config: ModelConfig) -> PyTree:
    import jax

    where = f"{directory}"

    def corrupt(detail: str) -> ModelDirError:
        return ModelDirError(
            f"the variables in {where} are unreadable or corrupt ({detail}); "
            "re-create or re-copy the model directory"
        )

    with _quiet_orbax():
        ckptr = _checkpointer()
        try:
            try:
                md = ckptr.metadata(directory.absolute())
            except Exception as e:  # orbax raises several types for damaged checkpoints
                raise corrupt(type(e).__name__) from None
            stored = getattr(getattr(md, "item_metadata", None), "tree", None)
            if stored is None:
                raise corrupt("no readable checkpoint metadata")
            # Orbax restores the stored shapes whatever the target says: compare first.
            check_variables(
                config, dict(stored) if isinstance(stored, dict) else stored, where=where
            )
            try:
                restored = ckptr.restore(directory.absolute(), abstract_variables(config))
            except Exception as e:
                raise corrupt(type(e).__name__) from None
        finally:
            ckptr.close()
    restored = jax.tree.map(np.asarray, restored)
    check_variables(config, restored, where=where)
    return restored


# --------------------------------------------------------------------------- model directories


def save_model(
    path: str | os.PathLike,
    config: ModelConfig,
    variables: PyTree,
    *,
    encryption: Key | dict | None = None,
    extra: dict | None = None,
    force: bool = False,
) -> Path:
    """Write a model directory atomically; return its path.

    variables: ``{'params', 'batch_stats'}`` (ConvMixer) or ``{'params'}`` (ViT) matching
    ``config`` (checked); other collections are dropped.
    encryption: None for a plain model, or the key it is encrypted with (only its
    :func:`~convmixer_jax.files.model_dir.encryption_record` is stored) or such a record.
    extra: JSON-serializable provenance fields for config.json (not the reserved
    ``format``, ``version``, ``model``, ``encryption``, ``variables_sha256``,
    ``model_sha256``).
    The directory is sealed (``model_sha256``, see the module's description).
    An existing ``path`` is refused unless ``force``, and then replaced only once
    the new directory is complete.
    """
    import jax

    path = Path(path)
    check_output_path(path, force, kind="model_dir")
    if not isinstance(config, (ConvMixerConfig, ViTConfig)):
        raise TypeError(
            f"config must be a ConvMixerConfig or a ViTConfig, got {type(config).__name__}"
        )
    enc = _check_encryption_record(encryption, config, "encryption")
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"extra fields {clash} are reserved in config.json")
    doc = {
        "format": MODEL_FORMAT,
        "version": MODEL_VERSION,
        "model": config.to_dict(),
        "encryption": enc,
        **extra,
    }
    try:
        json.dumps(doc, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.json fields must be JSON-serializable: {e}") from None
    from convmixer_jax.model.build import model_variables

    variables = jax.tree.map(
        np.asarray, model_variables(config, variables)
    )
    check_variables(config, variables)
    check_finite(variables, where="the variables to save")

    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = None
    try:
        with deferred_interrupts():  # a held signal is delivered inside this try
            tmp = temporary_name(path)
            tmp.mkdir()
        _save_variables(tmp / VARIABLES_DIR, variables)
        doc["variables_sha256"] = variables_digests(tmp / VARIABLES_DIR)
        doc[SEAL_FIELD] = model_digest(doc)
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
        swap_into_place(tmp, path, force)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if tmp is not None:
            release_temporary(tmp)  # the temporary is in place or removed: drop its lock file
    return path


def _read_config(path: Path) -> tuple[ModelConfig, dict, dict]:
    """Read and check config.json's form, not its seal: ``(config, meta, raw)``, where
    ``raw`` is the JSON object as read and ``meta`` the same with the encryption record
    checked."""
    if not path.exists():
        raise ModelDirError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise ModelDirError(f"{path} is not a model directory (it is a file)")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise ModelDirError(
            f"{path} has no {CONFIG_FILE}: not a convmixer-jax model directory "
            "(make one with init-model or train)"
        )
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ModelDirError(f"cannot read {cfg_path}: {e}") from None
    except json.JSONDecodeError as e:
        raise ModelDirError(
            f"{cfg_path} is not valid JSON ({e.msg} at line {e.lineno}); "
            "the model directory is damaged"
        ) from None
    if not isinstance(raw, dict):
        raise ModelDirError(f"{cfg_path} must hold a JSON object")
    if raw.get("format") != MODEL_FORMAT:
        raise ModelDirError(
            f"{cfg_path}: 'format' is {raw.get('format')!r}, expected {MODEL_FORMAT!r}; "
            "not a convmixer-jax model directory"
        )
    if raw.get("version") != MODEL_VERSION:
        raise ModelDirError(
            f"{cfg_path}: unsupported model version {raw.get('version')!r}; "
            f"this release reads version {MODEL_VERSION}"
        )
    if not isinstance(raw.get("model"), dict):
        raise ModelDirError(f"{cfg_path} has no 'model' object describing the architecture")
    try:
        config = config_from_dict(raw["model"])
    except (TypeError, ValueError) as e:
        raise ModelDirError(f"{cfg_path}: invalid model description: {e}") from None
    if "encryption" not in raw:
        raise ModelDirError(f"{cfg_path} has no 'encryption' field (null for a plain model)")
    meta = dict(raw)
    meta["encryption"] = _check_encryption_record(raw["encryption"], config, str(cfg_path))
    return config, meta, raw


def model_digest(meta: dict) -> str:
    """The seal of a model directory: the SHA-256 (hex) of config.json's object ``meta``
    without ``model_sha256`` and the :data:`~convmixer_jax.files.model_dir.UNSEALED_FIELDS`,
    as canonical JSON (keys sorted, no spaces, ASCII). Since ``variables_sha256`` is one
    of the sealed fields, the seal covers the weights too."""
    sealed = {k: v for k, v in meta.items() if k != SEAL_FIELD and k not in UNSEALED_FIELDS}
    try:
        text = json.dumps(
            sealed, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        )
    except (TypeError, ValueError) as e:
        raise ModelDirError(f"config.json holds a value that is not plain JSON ({e})") from None
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _reseal_hint(path: Path) -> str:
    return (
        f"if you changed it on purpose and trust it, seal it again with "
        f"'convmixer-jax seal-model {path} --out NEW_MODEL_DIR'"
    )


def check_seal(path: str | os.PathLike, meta: dict) -> None:
    """Raise :class:`ModelDirError` unless ``meta`` (config.json of the model directory
    ``path``, as read) carries its seal: well-formed ``variables_sha256`` and
    ``model_sha256`` fields, the latter equal to
    :func:`~convmixer_jax.files.model_dir.model_digest`. The files under ``variables/``
    are checked against ``variables_sha256`` by
    :func:`~convmixer_jax.files.model_dir.verify_variables`."""
    path = Path(path)
    cfg_path = path / CONFIG_FILE
    seal, recorded = meta.get(SEAL_FIELD), meta.get("variables_sha256")
    if not isinstance(seal, str) or not isinstance(recorded, dict) or not recorded:
        missing = SEAL_FIELD if not isinstance(seal, str) else "variables_sha256"
        raise ModelDirError(
            f"{cfg_path} has no valid '{missing}': the model directory is not sealed, so "
            "edits of its config or weights could not be detected; re-create or re-copy "
            f"it, or, {_reseal_hint(path)}"
        )
    if not _HEX64.fullmatch(seal) or not all(
        isinstance(k, str) and isinstance(v, str) and _HEX64.fullmatch(v)
        for k, v in recorded.items()
    ):
        raise ModelDirError(
            f"{cfg_path}: '{SEAL_FIELD}' must be a SHA-256 hex digest and 'variables_sha256' "
            f"map file names to SHA-256 digests; re-create or re-copy the model, or, "
            f"{_reseal_hint(path)}"
        )
    try:
        actual = model_digest(meta)
    except ModelDirError as e:
        raise ModelDirError(f"{cfg_path}: {e}; {_reseal_hint(path)}") from None
    if actual != seal:
        raise ModelDirError(
            f"{cfg_path} was edited after the model was saved (its content does not match "
            f"'{SEAL_FIELD}'); re-create or re-copy the model, or, {_reseal_hint(path)}"
        )


def load_model_meta(path: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """Read and check ``config.json`` only (fast), its seal included: ``(config, meta)``.

    ``meta`` is the whole config.json object, with ``meta['encryption']``
    None (plain model) or ``{'key_fingerprint', 'block_size', 'channels'}``, with
    ``'grid'`` too when the key scrambles blocks.
    """
    path = Path(path)
    config, meta, raw = _read_config(path)
    check_seal(path, raw)
    return config, meta


def variables_digests(var_dir: Path) -> dict[str, str]:
    """SHA-256 of every file under a model's ``variables/``, by path relative to it."""
    out = {}
    for f in sorted(Path(var_dir).rglob("*")):
        if f.is_file():
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            out[f.relative_to(var_dir).as_posix()] = h.hexdigest()
    return out


def verify_variables(path: Path, meta: dict) -> None:
    """Raise :class:`ModelDirError` naming the first file under ``path/variables`` that is
    missing, differs from the SHA-256 recorded in config.json at save, or was not saved
    with the model. The record itself is checked by
    :func:`~convmixer_jax.files.model_dir.check_seal`."""
    recorded = meta.get("variables_sha256")
    if not isinstance(recorded, dict) or not recorded:
        raise ModelDirError(
            f"{path / CONFIG_FILE} has no valid 'variables_sha256'; {_reseal_hint(path)}"
        )
    actual = variables_digests(path / VARIABLES_DIR)
    for name, digest in sorted(recorded.items()):
        if name not in actual:
            raise ModelDirError(
                f"{path}: the file variables/{name} is missing; the model directory is damaged "
                "or corrupt (re-create or re-copy it)"
            )
        if actual[name] != digest:
            raise ModelDirError(
                f"{path}: the file variables/{name} differs from what was "
                "saved (SHA-256 mismatch); the model directory is "
                f"damaged, corrupt or was edited (re-create or re-copy it, or, "
                f"{_reseal_hint(path)})"
            )
    extra = sorted(set(actual) - set(recorded))
    if extra:
        raise ModelDirError(
            f"{path}: the file variables/{extra[0]} was not saved with the model; the model "
            f"directory was edited (re-create or re-copy it, or, {_reseal_hint(path)})"
        )


def check_finite(variables: PyTree, *, where: str = "variables") -> None:
    """Raise :class:`ModelDirError` naming the first array with NaN or infinite values."""
    for name, leaf in _leaves_by_path(variables).items():
        arr = np.asarray(leaf)
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise ModelDirError(
                f"{where}: {name} holds NaN or infinite values; the model is unusable "
                "(re-create or re-train it)"
            )


def load_model(path: str | os.PathLike) -> tuple[ModelConfig, PyTree, dict]:
    """Read a model directory: ``(config, variables, meta)``.

    variables: ``{'params', 'batch_stats'}`` (ConvMixer) or ``{'params'}`` (ViT) of NumPy
    arrays, checked against ``config``; meta: see
    :func:`~convmixer_jax.files.model_dir.load_model_meta`.
    Raises :class:`ModelDirError` naming what is wrong.
    """
    path = Path(path)
    config, meta = load_model_meta(path)
    var_dir = path / VARIABLES_DIR
    if not var_dir.is_dir():
        raise ModelDirError(
            f"{path} has no {VARIABLES_DIR}/ directory: the model's weights are missing"
        )
    verify_variables(path, meta)
    variables = _restore_variables(var_dir, config)
    check_finite(variables, where=str(path))
    return config, variables, meta


def is_encrypted(meta: dict) -> bool:
    """Whether a model's ``meta`` (from :func:`load_model`) records an encryption key."""
    return meta.get("encryption") is not None


def model_classes(meta: dict) -> list[str] | None:
    """The class names a model directory records (its ``classes`` field, written by
    ``train``), or None when it records none."""
    names = meta.get("classes")
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        return names
    return None


def check_data_classes(
    config: ModelConfig, meta: dict, classes, *, where: str = "the data"
) -> None:
    """Raise :class:`ModelDirError` unless a data set's class names ``classes``
    (a sequence of str, or None when unknown) match the model: the same count as
    ``config.num_classes``, and the same names in the same order when the model
    records its own (:func:`model_classes`)."""
    if classes is None:
        return
    classes = [str(c) for c in classes]
    if len(classes) != config.num_classes:
        raise ModelDirError(
            f"{where} has {len(classes)} classes but the model has {config.num_classes}; "
            "scores against it would be meaningless; use the data set the model was trained on"
        )
    own = model_classes(meta)
    if own is not None and own != classes:
        diff = next(i for i, (a, b) in enumerate(zip(own, classes, strict=False)) if a != b)
        raise ModelDirError(
            f"{where} names its classes differently from the model: class {diff} is "
            f"{classes[diff]!r} in the data but {own[diff]!r} in the model; use the data "
            "set the model was trained on (same class folders)"
        )


def _extra(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k not in _RESERVED}


def _require_plain(path: Path, meta: dict) -> None:
    if is_encrypted(meta):
        raise ModelDirError(
            f"{path} is already encrypted (key fingerprint "
            f"{meta['encryption']['key_fingerprint']}); use rekey-model to move it "
            "to another key"
        )


def _require_encrypted_with(path: Path, meta: dict, key: Key) -> None:
    from convmixer_jax.scheme.params import KeyModelMismatch

    if not is_encrypted(meta):
        raise ModelDirError(
            f"{path} is a plain model, not encrypted; there is nothing to decrypt "
            "(use encrypt-model to encrypt it)"
        )
    grid = meta["encryption"].get("grid")
    if (grid is not None) != key.scrambles:
        had, has = ("with", "without") if grid is not None else ("without", "with")
        raise KeyModelMismatch(
            f"{path} was encrypted with a key {had} block scrambling, but the key given is "
            f"one {has}; pass the key used to encrypt this model"
        )
    recorded, given = meta["encryption"]["key_fingerprint"], fingerprint(key)
    if given != recorded:
        raise KeyModelMismatch(
            f"{path} was encrypted with the key of fingerprint {recorded}, "
            f"but the key given has fingerprint {given}; pass the key used "
            "to encrypt this model"
        )


def check_key_fits_model(config: ModelConfig, key: Key) -> None:
    """Raise ``KeyModelMismatch`` unless ``key`` fits the model: its block size and channels
    match the model's patch size and channels, and a key with block scrambling belongs to a
    ViT whose grid of patches is the key's grid (a ConvMixer cannot absorb block scrambling)."""
    from convmixer_jax.scheme.params import (
        CONVMIXER_SCRAMBLING,
        KeyModelMismatch,
        check_key_fits,
        check_key_patch_grid,
    )

    check_key_fits((config.patch_size, config.patch_size, config.channels, config.dim), key)
    if key.scrambles:
        if config.family != "vit":
            raise KeyModelMismatch(CONVMIXER_SCRAMBLING)
        check_key_patch_grid((config.grid_size, config.grid_size), key)


def _norm(config: ModelConfig) -> dict:
    return {"mean": config.mean, "std": config.std}


def encrypt_model_dir(
    src: str | os.PathLike, dst: str | os.PathLike, key: Key, *, force: bool = False
) -> Path:
    """Encrypt the plain model in ``src`` with ``key`` into a new directory ``dst``.

    Refuses an already-encrypted model and a key that does not fit the model
    (:func:`~convmixer_jax.files.model_dir.check_key_fits_model`: block size, channels,
    block scrambling), before anything is written. Provenance fields are kept.
    """
    from convmixer_jax.scheme.params import encrypt_params

    src = Path(src)
    check_output_path(dst, force, kind="model_dir", inputs=[src])
    config, meta = load_model_meta(src)
    _require_plain(src, meta)
    check_key_fits_model(config, key)
    config, variables, meta = load_model(src)
    encrypted = encrypt_params(variables, key, **_norm(config))
    return save_model(dst, config, encrypted, encryption=key, extra=_extra(meta), force=force)


def decrypt_model_dir(
    src: str | os.PathLike, dst: str | os.PathLike, key: Key, *, force: bool = False
) -> Path:
    """Decrypt the model in ``src`` into a plain model directory ``dst``.

    Refuses a plain model and a key whose fingerprint differs from the recorded one,
    before anything is written.
    """
    from convmixer_jax.scheme.params import decrypt_params

    src = Path(src)
    check_output_path(dst, force, kind="model_dir", inputs=[src])
    config, meta = load_model_meta(src)
    _require_encrypted_with(src, meta, key)
    check_key_fits_model(config, key)
    config, variables, meta = load_model(src)
    plain = decrypt_params(variables, key, **_norm(config))
    return save_model(dst, config, plain, encryption=None, extra=_extra(meta), force=force)


def rekey_model_dir(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    old_key: Key,
    new_key: Key,
    *,
    force: bool = False,
) -> Path:
    """Move the model in ``src``, encrypted with ``old_key``, to ``new_key`` (into ``dst``)."""
    from convmixer_jax.scheme.params import rekey_params

    src = Path(src)
    check_output_path(dst, force, kind="model_dir", inputs=[src])
    config, meta = load_model_meta(src)
    if not is_encrypted(meta):
        raise ModelDirError(
            f"{src} is a plain model, not encrypted; use encrypt-model instead of rekey-model"
        )
    _require_encrypted_with(src, meta, old_key)
    check_key_fits_model(config, old_key)
    check_key_fits_model(config, new_key)
    config, variables, meta = load_model(src)
    moved = rekey_params(variables, old_key, new_key, **_norm(config))
    return save_model(dst, config, moved, encryption=new_key, extra=_extra(meta), force=force)


def seal_state(path: str | os.PathLike) -> str | None:
    """None when the model directory ``path`` is sealed and intact (config.json and the
    files under ``variables/``), otherwise why not (one line)."""
    path = Path(path)
    try:
        _, meta, raw = _read_config(path)
        check_seal(path, raw)
        verify_variables(path, meta)
    except ModelDirError as e:
        return str(e)
    return None


def seal_model_dir(
    src: str | os.PathLike, dst: str | os.PathLike, *, force: bool = False
) -> tuple[Path, str | None]:
    """Seal the model in ``src`` as it is now (config.json and weights, edited or not)
    into a new directory ``dst``; return ``(dst, why)``, where ``why`` says why ``src``
    was not sealed and intact (None when it was).

    This is how a model changed on purpose (a field of config.json edited, weights
    replaced) becomes loadable again: config.json must still describe a valid model
    whose weights fit it, and they must be finite. ``src`` is left as it is; the key
    of an encrypted model is not needed and not checked.
    """
    src = Path(src)
    check_output_path(dst, force, kind="model_dir", inputs=[src])
    config, meta, _ = _read_config(src)
    var_dir = src / VARIABLES_DIR
    if not var_dir.is_dir():
        raise ModelDirError(
            f"{src} has no {VARIABLES_DIR}/ directory: the model's weights are missing"
        )
    why = seal_state(src)
    variables = _restore_variables(var_dir, config)
    check_finite(variables, where=str(src))
    saved = save_model(
        dst, config, variables, encryption=meta["encryption"], extra=_extra(meta), force=force
    )
    return saved, why


__all__ = [
    "MODEL_FORMAT",
    "MODEL_VERSION",
    "ModelDirError",
    "save_model",
    "load_model",
    "load_model_meta",
    "is_encrypted",
    "encryption_record",
    "check_key_fits_model",
    "abstract_variables",
    "check_variables",
    "encrypt_model_dir",
    "decrypt_model_dir",
    "rekey_model_dir",
    "seal_model_dir",
    "seal_state",
    "check_seal",
    "model_digest",
    "SEAL_FIELD",
    "UNSEALED_FIELDS",
    "variables_digests",
    "verify_variables",
    "check_finite",
]
