"""The wrong-key sweep, reproduce, attack, security-report and scrambling-effect on a ViT
(keys with block scrambling), beside a ConvMixer where the command takes both."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from cli_helpers import ok, run

from convmixer_jax.attacks.wrong_keys import (
    draw_attack_keys,
    secret_key,
    wrong_key_accuracies,
    wrong_key_accuracies_loop,
)
from convmixer_jax.model.config import ViTConfig
from convmixer_jax.scheme.keys import stack_keys
from convmixer_jax.scheme.params import encrypt_params

# ViT-8/1, 2 heads, patch 2 on 8 x 8 RGB: a 4 x 4 grid of 16 blocks; a class token (so the
# position embedding has a class row before the patch rows) and the head on the mean of the
# patch tokens, so that the predictions depend on the image.
VIT = ViTConfig(
    dim=8,
    depth=1,
    num_heads=2,
    mlp_ratio=2.0,
    patch_size=2,
    num_classes=3,
    image_size=8,
    channels=3,
    global_pool="avg",
)
GRID = (4, 4)


def _random_vit_variables(seed: int) -> dict:
    """Variables of ``VIT`` with kernels of unit gain and a strong position embedding (a
    fresh timm-style initialization predicts one class for every image)."""
    from convmixer_jax.model.build import init_variables_abstract

    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = path[-1].key
        if name == "kernel":
            v = rng.normal(0, 1, s.shape) / np.sqrt(np.prod(s.shape[:-1]))
        elif name in ("pos_embed", "cls_token"):
            v = rng.normal(0, 0.5, s.shape)
        elif name == "scale":
            v = np.ones(s.shape)
        else:
            v = rng.normal(0, 0.1, s.shape)
        return v.astype(np.float32)

    shapes = jax.eval_shape(lambda: init_variables_abstract(VIT))
    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def vit(tmp_path_factory, png_tree):
    """A plain ViT directory, its variables and an image-folder data set: 18 random 8 x 8
    test images (``x``, labels ``y``) in 3 classes. Every test runs its models on those 18
    images and its sweeps on 3 keys at a time, so that they share compiled programs."""
    from convmixer_jax.data import load_split
    from convmixer_jax.files.model_dir import save_model

    root = tmp_path_factory.mktemp("vit")
    variables = _random_vit_variables(2)
    save_model(root / "vit", VIT, variables, extra={"created_by": "init-model"})
    png_tree(root / "data")
    x, y, _ = load_split("test", data_dir=str(root / "data"))
    return SimpleNamespace(
        config=VIT, variables=variables, model_dir=root / "vit", data_dir=root / "data", x=x, y=y
    )


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVMIXER_JAX_CACHE", str(tmp_path / "cache"))


def _predictions(variables, images) -> np.ndarray:
    from convmixer_jax.model.inference import predict_logits

    return np.argmax(predict_logits(VIT, variables, images), 1)


# --------------------------------------------------------------------------- the sweep


def test_sweep_on_a_vit_images_weights_and_a_loop_agree(vit):
    from convmixer_jax.scheme.keys import Key

    images = vit.x
    labels = _predictions(vit.variables, images)
    assert len(set(labels.tolist())) > 1  # else every comparison below is vacuous
    secret = secret_key(VIT, seed=7)
    assert secret.grid == GRID and secret.scrambles
    enc = encrypt_params(vit.variables, secret)
    wrong = draw_attack_keys(5, 5, 2, 3, GRID)
    assert np.asarray(wrong.block_perm).shape == (5, 16)
    for i in range(5):
        assert sorted(np.asarray(wrong.block_perm[i]).tolist()) == list(range(16))
    # the right key, the right pixel key with the blocks in another order, 4 wrong keys
    moved = Key(secret.perm, secret.flip, 2, 3, np.asarray(wrong.block_perm)[0], GRID)
    keys = stack_keys([secret, moved] + [wrong[i] for i in range(1, 5)])
    a, b = (
        wrong_key_accuracies(VIT, enc, images, labels, keys, strategy=s, key_chunk=3)
        for s in ("images", "weights")
    )
    c = wrong_key_accuracies_loop(VIT, enc, images, labels, keys)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, c)
    assert a[0] == 1.0  # the right key gives the plain model's predictions
    assert a[1:].max() < 1.0 and len(set(a[1:].tolist())) > 1


def test_weights_strategy_refuses_scrambling_keys_on_a_convmixer(tiny_config):
    from convmixer_jax.scheme.keys import Key

    perm, flip = np.arange(12)[None], np.tile([0, 1], 6)[None]
    keys = Key(perm, flip, 2, 3, np.arange(16)[None], GRID)
    with pytest.raises(ValueError, match="cannot take block scrambling into its weights"):
        wrong_key_accuracies(
            tiny_config, {}, np.zeros((2, 8, 8, 3), np.uint8), [0, 1], keys, strategy="weights"
        )


# --------------------------------------------------------------------------- reproduce


def _log2_factorial(n: int) -> float:
    return math.lgamma(n + 1) / math.log(2)


def test_reproduce_on_a_vit_scrambles_blocks_unless_told_not_to(vit, tmp_path, capsys):
    rep = tmp_path / "rep"
    common = ["reproduce", "--checkpoint", vit.model_dir, "--data-dir", vit.data_dir, "--quiet"]
    ok(capsys, *common, "--num-keys", 3, "--key-seed", 1, "--out", rep)
    res = json.loads((rep / "results.json").read_text())
    assert res["test_images"] == 18 and res["identical_predictions"] == 18
    assert res["encrypted_encrypted"] == res["baseline_plain"]
    assert res["identical_predictions_tta"] == 18  # mirrored before encryption: exact too
    assert res["block_scrambling"] is True and res["grid"] == [4, 4]
    pixel_log2 = _log2_factorial(12) + math.log2(math.comb(12, 6))
    assert res["key_space_log2"] == pytest.approx(_log2_factorial(16) + pixel_log2, abs=1e-9)
    assert int(res["key_space"]) == math.factorial(16) * math.factorial(12) * 924
    assert len(res["wrong_keys"]) == 3 and res["wrong_keys_seed"] == 1
    table = (rep / "table1.md").read_text()
    assert "(gh*gw)! * pb! * C(pb, pb/2)" in table and "4 x 4 block positions" in table
    assert "90.46" not in table and "The model is a ViT" in table  # not the paper's numbers
    text = (rep / "results.json").read_text()
    assert "perm" not in text and res["key_fingerprint"] in text
    # the paper's pixel-only key: no block scrambling, the paper's key space (the library's
    # run, which writes nothing without an output folder)
    from convmixer_jax.experiment.paper import run_experiment

    res = run_experiment(
        VIT,
        vit.variables,
        (vit.x, vit.y),
        None,
        num_keys=0,
        block_scrambling=False,
        progress=False,
        log=lambda m: None,
    )
    assert res["block_scrambling"] is False and res["grid"] is None
    assert res["identical_predictions"] == 18 and res["identical_predictions_tta"] == 18
    assert res["key_space_log2"] == pytest.approx(pixel_log2, abs=1e-9)
    assert "--no-block-scrambling" in run(capsys, "reproduce", "--help")[1]


# --------------------------------------------------------------------------- attack


def test_attack_on_an_encrypted_vit_draws_scrambling_keys(vit, tmp_path, capsys):
    from convmixer_jax.files.model_dir import save_model

    secret = secret_key(VIT, seed=3)
    enc = encrypt_params(vit.variables, secret)
    save_model(tmp_path / "enc", VIT, enc, encryption=secret)
    outs = {}
    for s in ("weights", "images"):
        out = tmp_path / f"{s}.json"
        ok(
            capsys,
            "attack",
            tmp_path / "enc",
            "--data-dir",
            vit.data_dir,
            "--num-keys",
            3,
            "--key-seed",
            4,
            "--strategy",
            s,
            "--quiet",
            "--out",
            out,
        )
        outs[s] = json.loads(out.read_text())
    assert outs["weights"]["accuracies"] == outs["images"]["accuracies"]
    res = outs["weights"]
    assert res["block_scrambling"] is True and res["grid"] == [4, 4]
    assert res["model_encrypted_by"] == "given" and "perm" not in json.dumps(res)
    # the keys were draw_attack_keys(4, 3, ..., grid): the same accuracies key by key
    keys = draw_attack_keys(4, 3, 2, 3, GRID)
    assert res["accuracies"] == wrong_key_accuracies_loop(VIT, enc, vit.x, vit.y, keys).tolist()
    # a plain ViT is encrypted first, with a key that scrambles blocks unless told not to
    for extra, scrambles in (((), True), (("--no-block-scrambling",), False)):
        out = tmp_path / f"plain-{scrambles}.json"
        ok(
            capsys,
            "attack",
            vit.model_dir,
            "--data-dir",
            vit.data_dir,
            "--num-keys",
            3,
            "--key-seed",
            4,
            *extra,
            "--quiet",
            "--out",
            out,
        )
        res = json.loads(out.read_text())
        assert res["block_scrambling"] is scrambles and res["model_encrypted_by"].startswith(
            "attack"
        )


# --------------------------------------------------------------------------- security-report


def test_security_report_on_a_vit_runs_its_sections_and_skips_the_others(
    vit, tiny_config, tmp_path, capsys, monkeypatch
):
    from convmixer_jax.attacks import report
    from convmixer_jax.attacks.protocol import AttackContext
    from convmixer_jax.scheme.keys import fingerprint

    # the two sections on keys with block scrambling read off the encrypted ViT and its
    # queries, and the sections that apply to ConvMixers only; the other sections that apply
    # to a ViT have tests of their own
    vit_sections = {"vit_model_recovery", "vit_ciphertext_only"}
    attacks = tuple(a for a in report.ATTACKS if a.name in vit_sections or "vit" not in a.families)
    monkeypatch.setattr(report, "ATTACKS", attacks)
    out = tmp_path / "sec"
    # no --reference-epochs 0: no section that applies to a ViT reads the reference, so the
    # report trains none
    ok(
        capsys,
        "security-report",
        vit.model_dir,
        "--data-dir",
        vit.data_dir,
        "--key-seed",
        0,
        "--vit-model-keys",
        2,
        "--vit-ciphertext-keys",
        2,
        "--ciphertext-images",
        1,
        "--vit-kernel-images",
        1,
        "--public-images",
        8,
        "--quiet",
        "--out",
        out,
    )
    data = json.loads((out / "security.json").read_text())
    summary = (out / "summary.md").read_text()
    for attack in attacks:
        if attack.name not in vit_sections:
            assert data[attack.name]["skipped"].startswith("applies to ConvMixer models only: ")
    skipped = len(attacks) - 2
    assert summary.count("Skipped: applies to ConvMixer models only: ") == skipped
    # the encrypted-ViT section: 2 keys of the report's seed, counts in range; the model's
    # position embedding is random and the images are noise, so nothing may be claimed
    mr = data["vit_model_recovery"]
    assert mr["keys"] == 2 and mr["queries"] == 1 and len(mr["trials"]) == 2
    assert mr["public_images"] == 8
    for name in (
        "exact_pixel_key",
        "exact_block_key",
        "exact",
        "exact_up_to_mirror",
        "position_candidates_hold_key",
        "position_claimed",
    ):
        assert isinstance(mr[name], int) and 0 <= mr[name] <= 2, name
    assert mr["claimed"] == mr["claimed_up_to_mirror"] == mr["claimed_wrong"] == 0
    assert 0.0 <= mr["pixel_positions_right"] <= 1.0 and 0.0 <= mr["blocks_placed_right"] <= 1.0
    _, streams = report.report_streams(0, attacks)
    context = AttackContext(VIT, None, (), (), (), streams["vit_model_recovery"], seeded=True)
    keys = context.keys(2, 0, grid=GRID)
    assert [t["key_fingerprint"] for t in mr["trials"]] == [fingerprint(k) for k in keys]
    assert all(t["reason"] for t in mr["trials"])
    # the ciphertext-only section: N = 1, then N = 1 with the model's kernel
    co = data["vit_ciphertext_only"]
    assert co["public_images"] == 18  # the template's: every training image
    rows = [(r["images"], r["with_kernel"], r["keys"]) for r in co["rows"]]
    assert rows == [(1, False, 2), (1, True, 2)]
    for r in co["rows"]:
        for name in (
            "exact_pixel_key",
            "exact_block_key",
            "exact",
            "exact_up_to_mirror",
            "jigsaw_claimed",
        ):
            assert isinstance(r[name], int) and 0 <= r[name] <= 2, name
        assert r["claimed"] == r["claimed_up_to_mirror"] == r["claimed_wrong"] == 0
        assert 0.0 <= r["blocks_placed_right"] <= 1.0 and np.isfinite(r["psnr"])
    text = (out / "security.json").read_text()
    assert '"perm"' not in text and '"block_perm"' not in text
    assert "## Key recovery from the encrypted ViT (block scrambling)" in summary
    assert "## Ciphertext-only key recovery with block scrambling (ViT)" in summary
    assert f"| 2 | {mr['pixel_positions_right']:.3f} | " in summary
    assert report.applicable_attacks(VIT, attacks) == [
        report.vit_model_report.ATTACK,
        report.vit_ciphertext_report.ATTACK,
    ]
    assert set(report.applicable_attacks(tiny_config, attacks)).isdisjoint(
        report.applicable_attacks(VIT, attacks)
    )
    # a report whose sections none apply to the model is refused in one line, nothing written
    convmixer_only = [a for a in attacks if a.name not in vit_sections]
    x = np.zeros((6, 8, 8, 3), np.uint8)
    inputs = report.ReportInputs(VIT, vit.variables, (x, np.zeros(6, int)), (x, np.zeros(6, int)))
    config = report.SecurityReportConfig.from_options(convmixer_only, public_images=0)
    with pytest.raises(ValueError, match="no section of the security report applies to a ViT"):
        report.run_security_report(inputs, config, tmp_path / "lib", log=lambda m: None)
    assert not (tmp_path / "lib").exists()


# --------------------------------------------------------------------------- scrambling-effect


def _table_numbers(md: str) -> dict[str, list[float]]:
    """The numbers of each row of scrambling.md's table, by model."""
    import re

    rows = {}
    for line in md.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            numbers = re.findall(r"\d+\.\d+", " ".join(cells[3:]))
            rows[cells[0].strip("`")] = [float(v) for v in numbers]
    return rows


def test_scrambling_effect_on_a_convmixer_and_a_vit(vit, tiny_config, tmp_path, capsys):
    from model_helpers import random_variables  # no init to compile

    from convmixer_jax.files.model_dir import save_model

    plain = random_variables(tiny_config, 1)
    convmixer = save_model(tmp_path / "convmixer", tiny_config, plain)
    out = tmp_path / "scr"
    stdout = ok(
        capsys,
        "scrambling-effect",
        convmixer,
        vit.model_dir,
        "--data-dir",
        vit.data_dir,
        "--num-keys",
        3,
        "--key-seed",
        2,
        "--quiet",
        "--out",
        out,
    )
    res = json.loads((out / "scrambling.json").read_text())
    md = (out / "scrambling.md").read_text()
    assert stdout == md
    rows = {r["family"]: r for r in res["models"]}
    assert set(rows) == {"convmixer", "vit"} and res["key_seed"] == 2
    for r in rows.values():
        assert r["right_key"] == r["plain"] and r["test_images"] == 18 and r["grid"] == [4, 4]
        for name in ("right_pixel_key_wrong_blocks", "wrong_keys", "wrong_keys_scrambled"):
            acc = r[name]["accuracies"]
            assert len(acc) == 3 and r[name]["median"] == float(np.median(acc))
            assert (r[name]["min"], r[name]["max"]) == (min(acc), max(acc))
    assert rows["vit"]["model_key"] == "pixel key and block key"
    assert rows["convmixer"]["model_key"] == "pixel key"
    assert rows["convmixer"]["strategies"]["right_pixel_key_wrong_blocks"] == "images"
    # (b) on a ConvMixer is the plain model on plain images with their blocks scrambled
    from convmixer_jax.model.inference import accuracy
    from convmixer_jax.scheme.blocks import from_blocks, permute_blocks, to_blocks

    seed_b = int(np.random.SeedSequence(rows["convmixer"]["sweep_seed"]).generate_state(3)[0])
    block_perms = np.asarray(draw_attack_keys(seed_b, 3, 2, 3, GRID).block_perm)
    scrambled = [from_blocks(permute_blocks(to_blocks(vit.x, 2), bp), 2, 3) for bp in block_perms]
    want = [accuracy(tiny_config, plain, x, vit.y) for x in scrambled]
    assert rows["convmixer"]["right_pixel_key_wrong_blocks"]["accuracies"] == want
    assert "perm" not in json.dumps(res)
    # the table holds the JSON's numbers, to 4 decimals
    table = _table_numbers(md)
    for r in res["models"]:
        want = [r["plain"], r["right_key"]]
        for name in ("right_pixel_key_wrong_blocks", "wrong_keys", "wrong_keys_scrambled"):
            want += [r[name]["median"], r[name]["min"], r[name]["max"]]
        assert table[r["model"]] == [round(v, 4) for v in want]
    # an encrypted model is refused, in one line, before any data is read
    secret = secret_key(VIT, seed=3)
    save_model(tmp_path / "enc", VIT, encrypt_params(vit.variables, secret), encryption=secret)
    rc, _, err = run(
        capsys,
        "scrambling-effect",
        vit.model_dir,
        tmp_path / "enc",
        "--data-dir",
        tmp_path / "no-data",
        "--out",
        tmp_path / "scr2",
    )
    assert rc == 1 and err.count("\n") == 1 and "is an encrypted model" in err
    assert not (tmp_path / "scr2").exists()
