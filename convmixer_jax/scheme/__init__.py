"""The scheme itself: the block contract, secret keys, the block-wise image transform
(with optional block scrambling), the patch-embedding transform.

Imports nothing else from the package: everything here follows from
``docs/method.md`` alone. :mod:`~convmixer_jax.scheme.blocks` is the one place that cuts
images into blocks and puts them back.
"""

from convmixer_jax.scheme.blocks import (  # noqa: F401
    BlockSizeError,
    from_blocks,
    grid_shape,
    permute_blocks,
    to_blocks,
)
from convmixer_jax.scheme.images import ImageError, check_images, decrypt_images, encrypt_images  # noqa: F401
from convmixer_jax.scheme.keys import (  # noqa: F401
    InvalidKeyError,
    Key,
    block_len,
    check_grid,
    check_key_grid,
    fingerprint,
    generate_key,
    key_space,
    key_space_log2,
    load_key,
    random_keys,
)
from convmixer_jax.scheme.params import (  # noqa: F401
    KeyModelMismatch,
    decrypt_params,
    encrypt_params,
    rekey_params,
)
