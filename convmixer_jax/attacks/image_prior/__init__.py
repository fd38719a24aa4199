"""A learned prior on natural images: which colour variant was applied to an image.

A ciphertext-only key recovery of the block-wise cipher finds the key's pixel
layout up to global ambiguities that colour statistics of one small image cannot
resolve: the order of the colour channels and the sign of the whole image. This
subpackage learns them as a self-supervised pretext task (as RotNet learns rotations):
a small CNN, trained on public natural images, says which of the variants was
applied to an image.

- :mod:`~convmixer_jax.attacks.image_prior.variants`: the colour variants ``(negate,
  order)``, applying, inverting and composing them;
- :mod:`~convmixer_jax.attacks.image_prior.network`: the classifier's architecture
  (:class:`PriorConfig`), the trained prior as a value (:class:`ImagePrior`) and its
  scores (:func:`~.network.variant_log_probs`, :func:`~.network.group_log_probs`);
- :mod:`~convmixer_jax.attacks.image_prior.training`: :func:`~.training.train_image_prior`;
- :mod:`~convmixer_jax.attacks.image_prior.storage`: :func:`~.storage.save_image_prior` /
  :func:`~.storage.load_image_prior`;
- :mod:`~convmixer_jax.attacks.image_prior.cache`: :func:`~.cache.cached_image_prior` trains once
  per set of public images.

JPEG-decoded sources carry a channel-order cue of their own, which this prior does
not learn (re-encoding every variant image as JPEG barely changes its accuracy): only
the right channel order puts the luma back on the coder's quantization lattice.
:mod:`~convmixer_jax.attacks.jpeg_trace` scores that, and the attack adds the two.

How well the prior tells the variants apart is measured by
``python benchmarks/image_prior_accuracy.py`` (the commands and results are in
``benchmarks/README.md`` and ``docs/security.md``; the shipped prior's numbers are in
``convmixer_jax/attacks/priors/cifar10-rgb-accuracy.json``).
"""

from convmixer_jax.attacks.image_prior.cache import cached_image_prior, prior_cache_key
from convmixer_jax.attacks.image_prior.network import (
    HEADS,
    ImagePrior,
    PriorConfig,
    as_unit_float,
    group_log_probs,
    resize_images,
    variant_log_probs,
)
from convmixer_jax.attacks.image_prior.storage import (
    CONFIG_FILE,
    PARAMS_FILE,
    PRIOR_FORMAT,
    PRIOR_VERSION,
    ImagePriorError,
    load_image_prior,
    save_image_prior,
)
from convmixer_jax.attacks.image_prior.training import train_image_prior
from convmixer_jax.attacks.image_prior.variants import (
    COLOUR_VARIANTS,
    Variant,
    apply_variant,
    colour_variants,
    compose_variants,
    invert_variant,
    variant_index,
)

__all__ = [
    "COLOUR_VARIANTS",
    "Variant",
    "colour_variants",
    "apply_variant",
    "invert_variant",
    "compose_variants",
    "variant_index",
    "HEADS",
    "PriorConfig",
    "ImagePrior",
    "as_unit_float",
    "resize_images",
    "variant_log_probs",
    "group_log_probs",
    "train_image_prior",
    "PRIOR_FORMAT",
    "PRIOR_VERSION",
    "CONFIG_FILE",
    "PARAMS_FILE",
    "ImagePriorError",
    "save_image_prior",
    "load_image_prior",
    "cached_image_prior",
    "prior_cache_key",
]
