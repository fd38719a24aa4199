"""Secret keys of the block-wise encryption: a pixel permutation and a flip vector.

A :class:`Key` for block size M and C channels holds, with pb = M*M*C,

- ``perm``: a permutation of 0..pb-1 (pixel shuffling ``y[k] = x[perm[k]]``);
- ``flip``: a 0/1 vector with exactly floor(pb/2) ones (bit flipping ``z[k] = 1 - y[k]``);
  pb/2 for the usual even pb, (pb - 1)/2 for an odd one (patch 7 on RGB: pb = 147, 73 ones).

``Key`` is a JAX pytree (``perm`` and ``flip`` are leaves, ``block_size`` and
``channels`` static), so a batch of keys is a ``Key`` whose leaves carry a
leading axis and ``jax.vmap`` maps over it.

Keys come from the operating system's CSPRNG (:func:`generate_key`) unless a
seed is given; :func:`random_keys` draws a batch from a ``jax.random`` key for
attacks and sweeps. Saved keys are JSON::

    {"format": "convmixer-jax-key", "version": 1, "block_size": 4, "channels": 3,
     "perm": [...], "flip": [...]}

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
        if self.batch_shape:
            return (
                f"Key(batch={self.batch_shape}, block_size={self.block_size}, "
                f"channels={self.channels})"
            )
        try:
            fp = fingerprint(self)[:16]
        except Exception:
            fp = "?"
        return f"Key(block_size={self.block_size}, channels={self.channels}, fingerprint={fp}...)"

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
    return Key(perm.astype(np.int32), flip.astype(np.uint8), int(key.block_size), int(key.channels))


def make_key(perm, flip, block_size: int, channels: int) -> Key:
    """Build and validate a key from explicit arrays."""
    return validate_key(Key(np.asarray(perm), np.asarray(flip), block_size, channels))


def generate_key(block_size: int, channels: int, seed: int | None = None) -> Key:
    """A fresh key. Without ``seed`` it comes from the OS CSPRNG (``secrets``);
    with a seed it is reproducible (for experiments only)."""
    pb = block_len(block_size, channels)
    if seed is None:
        rng = secrets.SystemRandom()
        perm = list(range(pb))
        rng.shuffle(perm)
        flip = [1] * flip_ones(pb) + [0] * (pb - flip_ones(pb))
        rng.shuffle(flip)
        return make_key(perm, flip, block_size, channels)
    g = np.random.default_rng(seed)
    perm = g.permutation(pb)
    flip = g.permutation(
        np.concatenate([np.ones(flip_ones(pb), np.uint8), np.zeros(pb - flip_ones(pb), np.uint8)])
    )
    return make_key(perm, flip, block_size, channels)


def random_keys(rng: jax.Array, n: int, block_size: int, channels: int) -> Key:
    """A batch of ``n`` independent random keys drawn with ``jax.random``.

    Works under ``jit`` (``n``, ``block_size``, ``channels`` static) and ``vmap``.
    Returns a Key with perm (n, pb) int32 and flip (n, pb) uint8.
    """
    pb = block_len(block_size, channels)
    half = jnp.concatenate(
        [jnp.ones(flip_ones(pb), jnp.uint8), jnp.zeros(pb - flip_ones(pb), jnp.uint8)]
    )

    def one(k):
        kp, kf = jax.random.split(k)
        return (jax.random.permutation(kp, pb).astype(jnp.int32), jax.random.permutation(kf, half))

    perm, flip = jax.vmap(one)(jax.random.split(rng, n))
    return Key(perm, flip, block_size, channels)


def inverse_permutation(perm):
    """inv with inv[perm[k]] = k; works on numpy and (batched, traced) JAX arrays."""
    perm = jnp.asarray(perm)
    return jnp.argsort(perm, axis=-1).astype(jnp.int32)


def stack_keys(keys: list[Key]) -> Key:
    """Stack single keys of one (block size, channels) into a batch."""
    if not keys:
        raise InvalidKeyError("no keys to stack")
    m, c = keys[0].block_size, keys[0].channels
    if any((k.block_size, k.channels) != (m, c) for k in keys):
        raise InvalidKeyError("keys to stack must share block size and channels")
    return Key(
        np.stack([np.asarray(k.perm) for k in keys]),
        np.stack([np.asarray(k.flip) for k in keys]),
        m,
        c,
    )


def key_to_json(key: Key) -> dict:
    """The JSON object of a single key (the project's file format)."""
    key = validate_key(key)
    return {
        "format": KEY_FORMAT,
        "version": KEY_VERSION,
        "block_size": key.block_size,
        "channels": key.channels,
        "perm": [int(v) for v in key.perm],
        "flip": [int(v) for v in key.flip],
    }


def _canonical(key: Key) -> bytes:
    d = key_to_json(key)
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def fingerprint(key: Key) -> str:
    """SHA-256 hex digest of the key's canonical JSON: names a key, reveals nothing of it."""
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
    key = make_key(np.asarray(obj["perm"], np.int64), np.asarray(obj["flip"], np.int64), m, c)
    if "fingerprint" in obj and obj["fingerprint"] != fingerprint(key):
        raise InvalidKeyError(
            "the key's recorded fingerprint does not match its contents: the file was altered"
        )
    return key


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


def key_space(block_size: int, channels: int) -> int:
    """Exact number of keys: pb! * C(pb, floor(pb/2))."""
    pb = block_len(block_size, channels)
    return math.factorial(pb) * math.comb(pb, flip_ones(pb))


def key_space_text(block_size: int, channels: int) -> str:
    """:func:`key_space` in decimal, however many digits it has (Python limits int-to-str
    conversion to 4,300 digits by default against hostile input; this integer is our own)."""
    n = key_space(block_size, channels)
    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        return str(n)
    finally:
        sys.set_int_max_str_digits(old)


def key_space_log2(block_size: int, channels: int) -> float:
    """log2 of :func:`key_space` (about 247.8 for pb = 48), from log-gamma: no huge integer
    is formed."""
    pb = block_len(block_size, channels)
    h = flip_ones(pb)
    ln = 2 * math.lgamma(pb + 1) - math.lgamma(h + 1) - math.lgamma(pb - h + 1)
    return ln / math.log(2)
