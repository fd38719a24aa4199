"""The per-client-key countermeasure on an encrypted ViT
(convmixer_jax/attacks/vit_countermeasure_report.py): every client's rekeyed model keeps the
plain model's predictions, the leak across clients is measured on the keys the recovery
gives, the cost is counted, and the section runs with the report's keys."""

from __future__ import annotations

import json
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from convmixer_jax.attacks import vit_countermeasure_report as vc
from convmixer_jax.attacks.block_key import blocks_placed_right, pixel_positions_right
from convmixer_jax.attacks.protocol import AttackContext, merged_options
from convmixer_jax.model.build import init_variables_abstract
from convmixer_jax.model.config import PRESETS, ViTConfig
from convmixer_jax.model.inference import predict_logits
from convmixer_jax.scheme.images import encrypt_images_reference
from convmixer_jax.scheme.keys import fingerprint, generate_key, key_to_json
from convmixer_jax.scheme.params import encrypt_params

VIT = ViTConfig(
    dim=16,
    depth=1,
    num_heads=2,
    mlp_ratio=2.0,
    patch_size=4,
    num_classes=3,
    image_size=16,
    class_token=False,
    global_pool="avg",
)
GRID = (4, 4)
N = 24


@pytest.fixture(scope="module")
def setting(tinted_images):
    """A ViT whose leaves are standard-normal times 0.3 (no initializer compiled) but for a
    zero head bias, so that it predicts two classes on the images; N tinted 16 x 16 images
    with random labels; 3 clients' keys."""
    rng = np.random.default_rng(1)
    variables = jax.tree.map(
        lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32),
        jax.eval_shape(lambda: init_variables_abstract(VIT)),
    )
    variables["params"]["head"]["bias"] = np.zeros(3, np.float32)
    x = tinted_images(N, size=16, seed=3)
    y = np.random.default_rng(2).integers(0, 3, N)
    keys = [generate_key(4, 3, seed=[21, i], grid=GRID) for i in range(3)]
    return SimpleNamespace(variables=variables, x=x, y=y, keys=keys)


def predictions(variables, images):
    return np.argmax(predict_logits(VIT, variables, images), 1)


def planted(keys, shift):
    """A recovery that gives, for the i-th client, the key of client (i + shift) mod C."""
    calls = []

    def recover(config, encrypted_variables, *, queries, public_images, seed):
        i = len(calls)
        calls.append(queries.shape)
        return SimpleNamespace(
            best_guess=keys[(i + shift) % len(keys)], determined=True, up_to_mirror=True
        )

    return recover, calls


def test_each_client_keeps_the_plain_predictions_and_the_leak_is_measured(setting):
    s = setting
    recover, calls = planted(s.keys, 0)  # the provider recovers each client's own key
    r = vc.per_client_keys(VIT, s.variables, (s.x, s.y), s.x, s.keys, recover=recover)
    r = json.loads(json.dumps(r))
    plain = predictions(s.variables, s.x)
    assert r["plain_accuracy"] == float(np.mean(plain == s.y))
    assert len(set(plain.tolist())) > 1  # the check below would be empty otherwise
    for c in r["per_client"]:
        assert c["identical_predictions"] == N and c["accuracy"] == r["plain_accuracy"]
        assert c["recovered_exact"] and c["recovered_key_identical_predictions"] == N
    assert r["own_accuracy_equals_plain"] and r["identical_predictions"] == 3 * N
    assert r["recovered_exact"] == 3 and r["recovery_claimed"] == 3
    assert calls == [(1, 16, 16, 3)] * 3  # one query per client
    assert [c["key_fingerprint"] for c in r["per_client"]] == [fingerprint(k) for k in s.keys]
    # the leak: B's model on B's images encrypted with A's key, and what the keys share
    models = vc.client_models(VIT, s.variables, s.keys)
    for m, key in zip(models, s.keys, strict=True):  # rekeying is exact on the paper's norm
        direct = jax.tree.leaves(encrypt_params(s.variables, key))
        assert all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(m), direct, strict=True))
    assert [(p["from_client"], p["to_client"]) for p in r["pairs"]] == [
        (a, b) for a in range(3) for b in range(3) if a != b
    ]
    for p in r["pairs"]:
        a, b = s.keys[p["from_client"]], s.keys[p["to_client"]]
        cross = predictions(models[p["to_client"]], encrypt_images_reference(s.x, a))
        assert p["accuracy"] == float(np.mean(cross == s.y))
        assert p["identical_predictions"] == int(np.sum(cross == plain))
        assert p["pixel_positions_shared"] == pixel_positions_right(a, b)
        assert p["blocks_shared"] == blocks_placed_right(a.block_perm, b.block_perm)
    assert r["pixel_positions_shared_mean"] < 0.5 and r["cross_identical_predictions"] < 6 * N
    # the cost: 3 copies; only the patch and position embeddings differ between them
    nbytes = sum(np.asarray(v).nbytes for v in jax.tree.leaves(s.variables))
    assert (r["model_copies"], r["model_bytes"], r["copies_bytes"]) == (3, nbytes, 3 * nbytes)
    assert r["keyed_bytes"] == 4 * (4 * 4 * 3 * 16 + 16 + 16 * 16)
    for m in models[1:]:
        differ = {
            jax.tree_util.keystr(path)
            for (path, u), (_, v) in zip(
                jax.tree_util.tree_flatten_with_path(models[0])[0],
                jax.tree_util.tree_flatten_with_path(m)[0],
                strict=True,
            )
            if not np.array_equal(u, v)
        }
        assert differ <= {
            "['params']['patch_embed']['kernel']",
            "['params']['patch_embed']['bias']",
            "['params']['pos_embed']",
        }
    text = "\n".join(vc.summary_lines(r))
    assert f"identical predictions {3 * N}/{3 * N}" in text
    assert "A negative result" in text and "3 of 3 clients' keys exactly" in text
    assert r["recovered_key_accuracy_mean"] == r["plain_accuracy"]


def test_a_key_that_opens_another_client_is_seen_as_a_leak(setting):
    s = setting
    recover, _ = planted(s.keys, 1)  # A's "recovered" key is B's key, B = A + 1
    r = vc.per_client_keys(VIT, s.variables, (s.x, s.y), s.x, s.keys, recover=recover)
    for p in r["pairs"]:
        shared = p["to_client"] == (p["from_client"] + 1) % 3
        assert (p["identical_predictions"] == N) == shared
        assert p["accuracy"] == r["plain_accuracy"] or not shared
        assert (p["pixel_positions_shared"] == 1.0 and p["blocks_shared"] == 1.0) == shared
    assert r["recovered_exact"] == 0
    assert all(c["recovered_key_identical_predictions"] < N for c in r["per_client"])


def test_the_section_runs_with_the_report_keys_and_writes_no_key(setting):
    s = setting
    context = AttackContext(
        model_config=VIT,
        variables=s.variables,
        train_data=(s.x, s.y),
        test_data=(s.x, s.y),
        eval_data=(s.x[:12], s.y[:12]),
        stream=np.random.SeedSequence(5),
        seeded=True,
    )
    r = vc.run(context, vc.ViTCountermeasureConfig(vit_countermeasure_clients=2))
    keys = [generate_key(4, 3, seed=[context.key_seed(0), i], grid=GRID) for i in (0, 1)]
    assert [c["key_fingerprint"] for c in r["per_client"]] == [fingerprint(k) for k in keys]
    assert r["clients"] == 2 and len(r["pairs"]) == 2 and r["grid"] == list(GRID)
    assert r["identical_predictions"] == 2 * 12 and r["own_accuracy_equals_plain"]
    text = json.dumps(r)
    for key in keys:
        assert json.dumps(key_to_json(key)["perm"]) not in text
        assert json.dumps(key_to_json(key)["block_perm"]) not in text


def test_the_section_applies_to_vits_and_checks_its_option():
    from convmixer_jax.attacks.report import ATTACKS

    assert vc.ATTACK.skip_reason(VIT) is None
    assert "ViT models only" in vc.ATTACK.skip_reason(PRESETS["paper"])
    assert not vc.ATTACK.enabled(vc.ViTCountermeasureConfig(vit_countermeasure_clients=0))
    with pytest.raises(ValueError, match="at least 2 clients"):
        vc.ViTCountermeasureConfig(vit_countermeasure_clients=1)
    names = [
        s.name for s in merged_options([a.config_type for a in ATTACKS] + [vc.ATTACK.config_type])
    ]
    assert names.count("vit_countermeasure_clients") == 1
    with pytest.raises(ValueError, match="at least 2 clients"):
        vc.per_client_keys(VIT, None, (None, None), None, [generate_key(4, 3, grid=GRID)])
