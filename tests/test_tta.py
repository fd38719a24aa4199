"""Mirror test-time augmentation composes with the scheme: the encrypted model on the encrypted
views gives the plain model's TTA logits on the plain views."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from convmixer_jax.experiment.paper import evaluate_tta, mirror_tta_logits
from convmixer_jax.model.convmixer import ConvMixer
from convmixer_jax.scheme.keys import generate_key
from convmixer_jax.scheme.params import encrypt_params
from convmixer_jax.training.loop import init_variables


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_tta_through_the_encryption(make_tiny_config, seed):
    config = make_tiny_config(dim=16, num_classes=4)
    rng = np.random.default_rng(seed)
    variables = init_variables(config, seed % 1000)
    images = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 6)
    key = generate_key(2, 3, seed=seed)
    enc_vars = encrypt_params(variables, key)
    model = ConvMixer(config)
    x = images.astype(np.float32) / 255
    want = (
        np.asarray(model.apply(variables, x)) + np.asarray(model.apply(variables, x[:, :, ::-1]))
    ) / 2
    plain = mirror_tta_logits(config, variables, images, batch_size=4)
    enc = mirror_tta_logits(config, enc_vars, images, encrypt_with=key, batch_size=4)
    np.testing.assert_allclose(plain, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(enc, want, rtol=1e-4, atol=1e-4)
    # mirroring the encrypted image instead is not the same thing (the mirror must come first)
    from convmixer_jax.model.inference import predict_logits
    from convmixer_jax.scheme.images import encrypt_images

    e = np.asarray(encrypt_images(images, key))
    wrong = (
        predict_logits(config, enc_vars, e) + predict_logits(config, enc_vars, e[:, :, ::-1])
    ) / 2
    assert not np.allclose(wrong, want, atol=1e-3)
    res = evaluate_tta(config, variables, enc_vars, key, images, labels, batch_size=4)
    assert res["identical_predictions_tta"] == 6
    assert res["baseline_plain_tta"] == float(np.mean(np.argmax(want, 1) == labels))
