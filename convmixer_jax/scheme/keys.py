"""Secret keys of the block-wise encryption: a pixel permutation, a flip vector and,
optionally, a permutation of the block positions.

A :class:`Key` for block size M and C channels holds, with pb = M*M*C,

- ``perm``: a permutation of 0..pb-1 (pixel shuffling ``y[k] = x[perm[k]]``);
- ``flip``: a 0/1 vector with exactly floor(pb/2) ones (bit flipping ``z[k] = 1 - y[k]``);
  pb/2 for the usual even pb, (pb - 1)/2 for an odd one (patch 7 on RGB: pb = 147, 73 ones);
- optionally ``block_perm`` with its ``grid`` (gh, gw): block scrambling, a permutation of
  the gh*gw block positions in raster order (``b = r*gw + s``): the encrypted image's block
  b is the plain block ``block_perm[b]``. Such a key is bound to images of gh*M x gw*M
  pixels; a key without it is exactly the ConvMixer paper's key.

``Key`` is a JAX pytree (``perm``, ``flip`` and ``block_perm`` are leaves, ``block_size``,
``channels`` and ``grid`` static), so a batch of keys is a ``Key`` whose leaves carry a
leading axis and ``jax.vmap`` maps over it.

Keys come from the operating system's CSPRNG (:func:`generate_key`) unless a
seed is given; :func:`random_keys` draws a batch from a ``jax.random`` key for
attacks and sweeps. Saved keys are JSON::

    {"format": "convmixer-jax-key", "version": 1, "block_size": 4, "channels": 3,
     "perm": [...], "flip": [...]}

with ``"block_perm": [...]`` and ``"grid": [gh, gw]`` added for a key that scrambles blocks,
and :func:`fingerprint` (SHA-256 of the canonical form) names a key without
revealing it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import secrets
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

KEY_FORMAT = "convmixer-jax-key"
KEY_VERSION = 1
MAX_KEY_FILE_BYTES = 1 << 20  # a key for M = 64, C = 4 (pb = 16,384) takes about 200 kB
MAX_BLOCK_SIZE = 64
MAX_CHANNELS = 64
MAX_GRID_BLOCKS = 1 << 16  # e.g. 1024 x 1024 images in 4 x 4 blocks; such a key file is ~450 kB


class InvalidKeyError(ValueError):
    """A key is malformed, tampered with, or does not fit the data or model."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Key:
    """A block-encryption key (or, with a leading axis on the leaves, a batch of keys).

    perm: (..., pb) int32, a permutation of 0..pb-1.
    flip: (..., pb) uint8 in {0, 1}, exactly floor(pb/2) ones.
    block_size, channels: static; pb = block_size**2 * channels.
    block_perm: None (no block scrambling: the ConvMixer paper's key), or (..., gh*gw) int32,
    a permutation of the block positions 0..gh*gw-1 in raster order: the encrypted
    image's block b is the plain block ``block_perm[b]``.
    grid: static; None, or (gh, gw), the block grid ``block_perm`` is bound to.
    """

    perm: np.ndarray | jax.Array
    flip: np.ndarray | jax.Array
    block_size: int = dataclasses.field(metadata=dict(static=True))
    channels: int = dataclasses.field(metadata=dict(static=True))
    block_perm: np.ndarray | jax.Array | None = None
    grid: tuple[int, int] | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def scrambles(self) -> bool:
        """Whether the key permutes block positions (carries ``block_perm``)."""
        return self.block_perm is not None

    @property
    def block_len(self) -> int:
        """pb = M*M*C, the length of a flattened block."""
        return self.block_size * self.block_size * self.channels

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(np.shape(self.perm)[:-1])

    def __getitem__(self, i) -> "Key":
        """Select keys from a batch: ``keys[3]``, ``keys[:10]``."""
        block_perm = None if self.block_perm is None else self.block_perm[i]
        return Key(
            self.perm[i], self.flip[i], self.block_size, self.channels, block_perm, self.grid
        )

    def __repr__(self) -> str:  # never print the secret itself
        grid = "" if self.grid is None else f", grid={self.grid[0]}x{self.grid[1]}"
        if self.batch_shape:
            return (
                f"Key(batch={self.batch_shape}, block_size={self.block_size}, "
                f"channels={self.channels}{grid})"
            )
        try:
            fp = fingerprint(self)[:16]
        except Exception:
            fp = "?"
        return (
            f"Key(block_size={self.block_size}, channels={self.channels}{grid}, "
            f"fingerprint={fp}...)"
        )

    __str__ = __repr__


def block_len(block_size: int, channels: int) -> int:
    """pb = M*M*C after checking both are positive integers within this release's limits.

    Odd pb is allowed (``flip`` then has floor(pb/2) ones). Only pb = 1 (block size 1
    on one channel) is refused: its one key is the identity, so nothing would be encrypted.
    """
    for name, v in (("block size", block_size), ("channels", channels)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise InvalidKeyError(f"{name} must be a positive integer, got {v!r}")
    if block_size > MAX_BLOCK_SIZE or channels > MAX_CHANNELS:
        raise InvalidKeyError(
            f"block size {block_size} with {channels} channels is beyond this release's "
            f"limits (block size <= {MAX_BLOCK_SIZE}, channels <= {MAX_CHANNELS})"
        )
    pb = int(block_size) ** 2 * int(channels)
    if pb < 2:
        raise InvalidKeyError(
            f"block size {block_size} with {channels} channel gives 1 value per block: its only "
            "key is the identity, which encrypts nothing; use a block size of 2 or more"
        )
    return pb


def flip_ones(pb: int) -> int:
    """How many ones a key's flip vector holds: floor(pb/2)."""
    return pb // 2


def check_grid(grid) -> tuple[int, int]:
    """``grid`` as (gh, gw), two positive Python ints with gh*gw within this release's limit;
    raise :class:`InvalidKeyError` otherwise."""
    try:
        gh, gw = grid
    except (TypeError, ValueError):
        raise InvalidKeyError(
            f"a block grid is two positive integers (gh, gw); got {grid!r}"
        ) from None
    for v in (gh, gw):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise InvalidKeyError(
                f"a block grid is two positive integers (gh, gw); got {list(grid)!r}"
            )
    gh, gw = int(gh), int(gw)
    if gh * gw > MAX_GRID_BLOCKS:
        raise InvalidKeyError(
            f"a {gh} x {gw} grid holds {gh * gw:,} blocks, beyond this release's limit of "
            f"{MAX_GRID_BLOCKS:,}; use larger blocks or smaller images"
        )
    return gh, gw


def check_key_grid(key: Key, height: int, width: int) -> None:
    """Raise :class:`InvalidKeyError` unless ``key``'s block scrambling fits images of
    ``height`` x ``width`` pixels (nothing to check for a key without block scrambling)."""
    if key.grid is None:
        return
    m = key.block_size
    gh, gw = key.grid
    h, w = int(height), int(width)
    if (h, w) == (gh * m, gw * m):
        return
    if h % m or w % m:
        theirs = f"not a whole number of {m} x {m} blocks"
        fix = f"crop or pad them to {gh * m} x {gw * m}"
    else:
        theirs = f"a {h // m} x {w // m} grid"
        size = f"--image-size {h}" if h == w else f"--grid {h // m} {w // m}"
        fix = f"make a key for this size with keygen --block-scrambling {size}"
    raise InvalidKeyError(
        f"the key's block scrambling is bound to a {gh} x {gw} grid of {m} x {m} blocks "
        f"({gh * m} x {gw * m} images), but these images are {h} x {w} ({theirs}); {fix}"
    )


def validate_key(key: Key) -> Key:
    """Check a single concrete key; return it with canonical dtypes or raise
    :class:`InvalidKeyError`."""
    pb = block_len(key.block_size, key.channels)
    perm = np.asarray(key.perm)
    flip = np.asarray(key.flip)
    if perm.shape != (pb,):
        raise InvalidKeyError(
            f"perm has shape {perm.shape}, expected ({pb},) for block size {key.block_size} "
            f"and {key.channels} channels"
        )
    if flip.shape != (pb,):
        raise InvalidKeyError(f"flip has shape {flip.shape}, expected ({pb},)")
    if not np.issubdtype(perm.dtype, np.integer) or not np.array_equal(
        np.sort(perm), np.arange(pb)
    ):
        raise InvalidKeyError(f"perm is not a permutation of 0..{pb - 1}")
    if (
        not (np.issubdtype(flip.dtype, np.integer) or flip.dtype == bool)
        or not np.isin(flip, (0, 1)).all()
    ):
        raise InvalidKeyError("flip must hold only 0 and 1")
    ones = int(np.sum(flip))
    if ones != flip_ones(pb):
        raise InvalidKeyError(
            f"flip has {ones} ones, expected exactly floor(pb/2) = {flip_ones(pb)}"
        )
    block_perm, grid = _validated_block_perm(key.block_perm, key.grid)
    return Key(
        perm.astype(np.int32),
        flip.astype(np.uint8),
        int(key.block_size),
        int(key.channels),
        block_perm,
        grid,
    )


def _validated_block_perm(block_perm, grid) -> tuple[np.ndarray | None, tuple[int, int] | None]:
    """(block_perm as int32, grid as (gh, gw)) of a single key, or (None, None)."""
    if block_perm is None and grid is None:
        return None, None
    if block_perm is None or grid is None:
        have, lack = ("block_perm", "grid") if grid is None else ("grid", "block_perm")
        raise InvalidKeyError(
            f"the key has {have} without {lack}; block scrambling needs both (or neither)"
        )
    gh, gw = check_grid(grid)
    n = gh * gw
    bp = np.asarray(block_perm)
    if bp.shape != (n,):
        raise InvalidKeyError(
            f"block_perm has shape {bp.shape}, expected ({n},) for a {gh} x {gw} grid"
        )
    if not np.issubdtype(bp.dtype, np.integer) or not np.array_equal(np.sort(bp), np.arange(n)):
        raise InvalidKeyError(f"block_perm is not a permutation of 0..{n - 1}")
    return bp.astype(np.int32), (gh, gw)


def make_key(perm, flip, block_size: int, channels: int, block_perm=None, grid=None) -> Key:
    """Build and validate a key from explicit arrays (``block_perm`` and ``grid``, both or
    neither, for block scrambling)."""
    return validate_key(
        Key(
            np.asarray(perm),
            np.asarray(flip),
            block_size,
            channels,
            None if block_perm is None else np.asarray(block_perm),
            None if grid is None else tuple(grid),
        )
    )


def generate_key(block_size: int, channels: int, seed: int | None = None, *, grid=None) -> Key:
    """A fresh key. Without ``seed`` it comes from the OS CSPRNG (``secrets``);
    with a seed it is reproducible (for experiments only).

    With ``grid`` (gh, gw) the key also scrambles the blocks of images of gh*M x gw*M
    pixels (``block_perm``, a permutation of 0..gh*gw-1, drawn the same way). A seeded
    key's ``perm`` and ``flip`` are the same with or without a grid.
    """
    pb = block_len(block_size, channels)
    n_blocks = None if grid is None else math.prod(check_grid(grid))
    if seed is None:
        rng = secrets.SystemRandom()
        perm = list(range(pb))
        rng.shuffle(perm)
        flip = [1] * flip_ones(pb) + [0] * (pb - flip_ones(pb))
        rng.shuffle(flip)
        block_perm = None
        if n_blocks is not None:
            block_perm = list(range(n_blocks))
            rng.shuffle(block_perm)
        return make_key(perm, flip, block_size, channels, block_perm, grid)
    g = np.random.default_rng(seed)
    perm = g.permutation(pb)
    flip = g.permutation(
        np.concatenate([np.ones(flip_ones(pb), np.uint8), np.zeros(pb - flip_ones(pb), np.uint8)])
    )
    block_perm = None if n_blocks is None else g.permutation(n_blocks)
    return make_key(perm, flip, block_size, channels, block_perm, grid)


def random_keys(rng: jax.Array, n: int, block_size: int, channels: int, *, grid=None) -> Key:
    """A batch of ``n`` independent random keys drawn with ``jax.random``.

    Works under ``jit`` (``n``, ``block_size``, ``channels``, ``grid`` static) and ``vmap``.
    Returns a Key with perm (n, pb) int32 and flip (n, pb) uint8; with ``grid`` (gh, gw),
    also block_perm (n, gh*gw) int32, keys that scramble the blocks of that grid.
    """
    pb = block_len(block_size, channels)
    half = jnp.concatenate(
        [jnp.ones(flip_ones(pb), jnp.uint8), jnp.zeros(pb - flip_ones(pb), jnp.uint8)]
    )
    if grid is None:

        def one(k):
            kp, kf = jax.random.split(k)
            return (
                jax.random.permutation(kp, pb).astype(jnp.int32),
                jax.random.permutation(kf, half),
            )

        perm, flip = jax.vmap(one)(jax.random.split(rng, n))
        return Key(perm, flip, block_size, channels)

    grid = check_grid(grid)
    n_blocks = grid[0] * grid[1]

    def one_scrambling(k):
        kp, kf, kb = jax.random.split(k, 3)
        return (
            jax.random.permutation(kp, pb).astype(jnp.int32),
            jax.random.permutation(kf, half),
            jax.random.permutation(kb, n_blocks).astype(jnp.int32),
        )

    perm, flip, block_perm = jax.vmap(one_scrambling)(jax.random.split(rng, n))
    return Key(perm, flip, block_size, channels, block_perm, grid)


def inverse_permutation(perm):
    """inv with inv[perm[k]] = k; works on numpy and (batched, traced) JAX arrays."""
    perm = jnp.asarray(perm)
    return jnp.argsort(perm, axis=-1).astype(jnp.int32)


def stack_keys(keys: list[Key]) -> Key:
    """Stack single keys of one (block size, channels, grid) into a batch."""
    if not keys:
        raise InvalidKeyError("no keys to stack")
    m, c = keys[0].block_size, keys[0].channels
    if any((k.block_size, k.channels) != (m, c) for k in keys):
        raise InvalidKeyError("keys to stack must share block size and channels")
    grid, scrambles = keys[0].grid, keys[0].scrambles
    if any(k.grid != grid or k.scrambles != scrambles for k in keys):
        raise InvalidKeyError(
            "keys to stack must all scramble blocks on the same grid, or all not scramble"
        )
    block_perm = np.stack([np.asarray(k.block_perm) for k in keys]) if scrambles else None
    return Key(
        np.stack([np.asarray(k.perm) for k in keys]),
        np.stack([np.asarray(k.flip) for k in keys]),
        m,
        c,
        block_perm,
        grid,
    )


def key_to_json(key: Key) -> dict:
    """The JSON object of a single key (the project's file format)."""
    key = validate_key(key)
    obj = {
        "format": KEY_FORMAT,
        "version": KEY_VERSION,
        "block_size": key.block_size,
        "channels": key.channels,
        "perm": [int(v) for v in key.perm],
        "flip": [int(v) for v in key.flip],
    }
    if key.scrambles:
        obj["block_perm"] = [int(v) for v in key.block_perm]
        obj["grid"] = list(key.grid)
    return obj


def _canonical(key: Key) -> bytes:
    d = key_to_json(key)
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def fingerprint(key: Key) -> str:
    """SHA-256 hex digest of the key's canonical JSON: names a key, reveals nothing of it.

    The canonical JSON is :func:`key_to_json` with sorted keys and no spaces; it holds
    ``block_perm`` and ``grid`` only for a key that scrambles blocks."""
    return hashlib.sha256(_canonical(key)).hexdigest()


def key_from_json(obj) -> Key:
    """Parse and validate a key object; raise :class:`InvalidKeyError` naming what is wrong."""
    if not isinstance(obj, dict):
        raise InvalidKeyError("a key file must hold a JSON object")
    if obj.get("format") != KEY_FORMAT:
        raise InvalidKeyError(
            f"not a convmixer-jax key: 'format' is {obj.get('format')!r}, expected {KEY_FORMAT!r}"
        )
    if obj.get("version") != KEY_VERSION:
        raise InvalidKeyError(
            f"unsupported key version {obj.get('version')!r}; "
            f"this release reads version {KEY_VERSION}"
        )
    for field in ("block_size", "channels", "perm", "flip"):
        if field not in obj:
            raise InvalidKeyError(f"key is missing the field {field!r}")
    m, c = obj["block_size"], obj["channels"]
    try:
        pb = block_len(m, c)
    except InvalidKeyError as e:
        raise InvalidKeyError(f"key file: {e}") from None
    for name in ("perm", "flip"):
        v = obj[name]
        if not isinstance(v, list) or not all(
            isinstance(e, int) and not isinstance(e, bool) for e in v
        ):
            raise InvalidKeyError(f"key field {name!r} must be a list of integers")
        if len(v) != pb:
            raise InvalidKeyError(
                f"key field {name!r} has shape ({len(v)},), expected ({pb},) (pb = {pb} for "
                f"block size {m} and {c} channels)"
            )
        if not all(0 <= e < pb for e in v):
            raise InvalidKeyError(f"key field {name!r} holds values outside 0..{pb - 1}")
    block_perm, grid = _block_fields(obj)
    key = make_key(
        np.asarray(obj["perm"], np.int64), np.asarray(obj["flip"], np.int64), m, c, block_perm, grid
    )
    if "fingerprint" in obj and obj["fingerprint"] != fingerprint(key):
        raise InvalidKeyError(
            "the key's recorded fingerprint does not match its contents: the file was altered"
        )
    return key


def _block_fields(obj: dict) -> tuple[np.ndarray | None, tuple[int, int] | None]:
    """The key object's ``block_perm`` and ``grid`` (both or neither), checked."""
    has_perm, has_grid = "block_perm" in obj, "grid" in obj
    if not has_perm and not has_grid:
        return None, None
    if has_perm != has_grid:
        have, lack = ("block_perm", "grid") if has_perm else ("grid", "block_perm")
        raise InvalidKeyError(
            f"key has the field {have!r} without {lack!r}; a key that scrambles blocks "
            "needs both (make it again with keygen --block-scrambling)"
        )
    g = obj["grid"]
    if not isinstance(g, list) or len(g) != 2:
        raise InvalidKeyError("key field 'grid' must be a list of two positive integers [gh, gw]")
    try:
        gh, gw = check_grid(g)
    except InvalidKeyError as e:
        raise InvalidKeyError(f"key field 'grid': {e}") from None
    n = gh * gw
    v = obj["block_perm"]
    if not isinstance(v, list) or not all(
        isinstance(e, int) and not isinstance(e, bool) for e in v
    ):
        raise InvalidKeyError("key field 'block_perm' must be a list of integers")
    if len(v) != n:
        raise InvalidKeyError(
            f"key field 'block_perm' has shape ({len(v)},), expected ({n},) for the "
            f"{gh} x {gw} grid"
        )
    if not all(0 <= e < n for e in v):
        raise InvalidKeyError(f"key field 'block_perm' holds values outside 0..{n - 1}")
    return np.asarray(v, np.int64), (gh, gw)


def load_key(path: str | Path) -> Key:
    """Read and validate a key JSON file."""
    path = Path(path)
    try:
        if path.is_dir():
            raise InvalidKeyError(f"key file {path} is a directory; pass the key's .json file")
        size = path.stat().st_size
        if size > MAX_KEY_FILE_BYTES:
            raise InvalidKeyError(
                f"key file {path} holds {size:,} bytes, more than any key "
                f"({MAX_KEY_FILE_BYTES:,} at most); it is not a key file"
            )
        with open(path, "rb") as f:
            text = f.read(MAX_KEY_FILE_BYTES + 1).decode()
    except FileNotFoundError:
        raise InvalidKeyError(f"key file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidKeyError(f"cannot read key file {path}: {e}") from None
    depth = _nesting_depth(text)
    if depth > 4:
        raise InvalidKeyError(
            f"key file {path} nests JSON {depth} levels deep; a key file is one flat object"
        )
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        msg = (
            f"{e.msg} at line {e.lineno}"
            if isinstance(e, json.JSONDecodeError)
            else type(e).__name__
        )
        raise InvalidKeyError(f"key file {path} is not valid JSON ({msg})") from None
    try:
        return key_from_json(obj)
    except InvalidKeyError as e:
        raise InvalidKeyError(f"key file {path}: {e}") from None


def _nesting_depth(text: str) -> int:
    """Deepest bracket nesting of JSON ``text`` (brackets inside strings ignored), without
    parsing it."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def key_file_text(key: Key) -> str:
    """The text of a key file (with its fingerprint, so edits are detected)."""
    d = key_to_json(key)
    d["fingerprint"] = fingerprint(key)
    return json.dumps(d) + "\n"


def key_space(block_size: int, channels: int, grid=None) -> int:
    """Exact number of keys: pb! * C(pb, floor(pb/2)), times (gh*gw)! with a block grid
    ``grid`` (gh, gw) (keys that scramble blocks)."""
    pb = block_len(block_size, channels)
    n = math.factorial(pb) * math.comb(pb, flip_ones(pb))
    if grid is not None:
        n *= math.factorial(math.prod(check_grid(grid)))
    return n


def key_space_text(block_size: int, channels: int, grid=None) -> str:
    """:func:`key_space` in decimal, however many digits it has (Python limits int-to-str
    conversion to 4,300 digits by default against hostile input; this integer is our own)."""
    n = key_space(block_size, channels, grid)
    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        return str(n)
    finally:
        sys.set_int_max_str_digits(old)


def key_space_log2(block_size: int, channels: int, grid=None) -> float:
    """log2 of :func:`key_space` (about 247.8 for pb = 48 without a grid), from log-gamma:
    no huge integer is formed."""
    pb = block_len(block_size, channels)
    h = flip_ones(pb)
    ln = 2 * math.lgamma(pb + 1) - math.lgamma(h + 1) - math.lgamma(pb - h + 1)
    if grid is not None:
        ln += math.lgamma(math.prod(check_grid(grid)) + 1)
    return ln / math.log(2)
