"""Key recovery from an encrypted model with the original weights as reference."""
import numpy as np
from hypothesis import given, settings, strategies as st

from convmixer_jax.keys import generate_key
from convmixer_jax.model_encryption import encrypt_kernel
from convmixer_jax.model_key_recovery import recover_key_with_reference


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 4), c=st.sampled_from([2, 4]), d=st.integers(4, 40), seed=st.integers(0, 10**6))
def test_original_weights_give_the_exact_key(m, c, d, seed):
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(m, m, c, d)).astype(np.float32)
    key = generate_key(m, c, seed=seed)
    enc, _ = encrypt_kernel(kernel, np.zeros(d, np.float32), key)
    rec = recover_key_with_reference(np.asarray(enc), kernel)
    assert rec.key is not None
    np.testing.assert_array_equal(rec.key.perm, key.perm)
    np.testing.assert_array_equal(rec.key.flip, key.flip)
    assert rec.fraction_correct(key) == 1.0
    np.testing.assert_allclose(rec.similarity, 1.0, atol=1e-5)


def test_unrelated_reference_recovers_little():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(4, 4, 3, 64))
    key = generate_key(4, 3, seed=1)
    enc, _ = encrypt_kernel(kernel, np.zeros(64), key)
    rec = recover_key_with_reference(np.asarray(enc), rng.normal(size=(4, 4, 3, 64)))
    assert rec.fraction_correct(key) < 0.2
    assert rec.similarity.max() < 0.9
