"""convmixer-jax: block-wise encryption of ConvMixer models (Iijima & Kiya, 2022) in JAX/Flax."""
from convmixer_jax._xla_flags import apply_cpu_flags as _apply_cpu_flags

_apply_cpu_flags()

__version__ = "0.1.0"
