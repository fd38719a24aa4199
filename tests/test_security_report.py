"""security-report: every section measured, outputs written atomically, no key written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from convmixer_jax import cli
from convmixer_jax.attacks.known_plaintext_report import known_plaintext_rate
from convmixer_jax.attacks.model_recovery_report import model_recovery
from convmixer_jax.attacks.protocol import AttackContext
from convmixer_jax.attacks.report import (
    ATTACKS,
    ReportInputs,
    SecurityReportConfig,
    report_streams,
    run_security_report,
)
from convmixer_jax.files.model_dir import save_model
from convmixer_jax.model.convmixer import ConvMixerConfig
from convmixer_jax.scheme.keys import fingerprint, generate_key
from convmixer_jax.training.loop import init_variables

CFG = ConvMixerConfig(
    dim=8, depth=1, kernel_size=3, patch_size=2, num_classes=3, image_size=8, channels=3
)


def _data(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.integers(0, 256, (n, 8, 8, 3)).astype(np.uint8)
    x[..., 0] = np.where(y[:, None, None] == 0, 250, x[..., 0] // 2)  # a learnable colour cue
    return x, y


def test_known_plaintext_rate_on_random_images_is_exact():
    x = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 3)).astype(np.uint8)
    rows = known_plaintext_rate(x, 2, pairs=(1, 2), trials=5, seed=3)
    assert [r["pairs"] for r in rows] == [1, 2]
    for r in rows:
        assert (
            r["exact_key_rate"] == 1.0
            and r["mean_undetermined"] == 0
            and r["inconsistent_trials"] == 0
        )


def test_known_plaintext_rate_counts_gray_images_as_failures():
    x, _ = _data(6, 1)
    x[..., 1] = x[..., 0]
    x[..., 2] = x[..., 0]
    rows = known_plaintext_rate(x, 2, pairs=(1,), trials=4, seed=0)
    assert rows[0]["exact_key_rate"] == 0.0 and rows[0]["all_gray_trials"] == 4
    assert rows[0]["mean_undetermined"] > 0


def test_model_recovery_with_original_weights_is_exact():
    variables = init_variables(CFG, 0)
    x, y = _data(30, 2)
    res = model_recovery(CFG, variables, x, y, num_keys=2, seed=5)
    orig = res["attacks"]["original_weights"]
    assert orig["exact_keys"] == 2 and orig["mean_fraction_both"] == 1.0
    assert orig["mean_accuracy_with_recovered_key"] == pytest.approx(res["baseline_plain"])
    assert set(res["attacks"]) == {"original_weights", "encrypted_model_only"}
    for row in res["attacks"]["encrypted_model_only"]["keys"]:
        assert 0.0 <= row["fraction_both"] <= 1.0 and row["valid_key"]
        assert 0.0 <= row["accuracy_with_recovered_key"] <= 1.0
    res = model_recovery(
        CFG,
        variables,
        x,
        y,
        reference_variables=init_variables(CFG, 1),
        public_images=x[:16],
        num_keys=1,
        seed=5,
    )
    assert set(res["attacks"]) == {
        "original_weights",
        "independent_reference",
        "independent_reference_public_images",
        "encrypted_model_only",
        "encrypted_model_public_images",
    }


def test_report_writes_everything_and_never_the_key(tmp_path):
    variables = init_variables(CFG, 0)
    train = _data(60, 3)
    test = _data(40, 4)
    out = tmp_path / "report"
    inputs = ReportInputs(CFG, variables, train, test)
    config = SecurityReportConfig.from_options(
        pairs=(1,),
        trials=3,
        recovery_keys=1,
        eval_images=40,
        finetune_sizes=(10, 20),
        finetune_modes=("stem", "scratch"),
        finetune_steps=3,
        finetune_keys=2,
        ciphertext_images=(1, 3),
        ciphertext_keys=2,
        recovery_images=(1, 4),
        countermeasure_keys=1,
        reference_epochs=0,
        key_seed=11,
    )
    rep = run_security_report(inputs, config, out, progress=False, log=lambda m: None)
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        ".convmixer-jax-output",
        "ciphertext_only.png",
        "finetune.png",
        "known_plaintext.png",
        "model_recovery.png",
        "security.json",
        "summary.md",
    ]
    data = json.loads((out / "security.json").read_text())
    assert data["known_plaintext"][0]["trials"] == 3
    assert set(data["finetune"]["accuracy"]) == {"stem", "scratch"}
    assert set(data["finetune"]["accuracy"]["stem"]) == {"10", "20"}
    # the stem is fine-tuned under a second key as well; the spread is over both keys' runs.
    # Each attack draws its keys from its own stream of the report's seed.
    _, streams = report_streams(11, ATTACKS)

    def seeded_context(name):
        return AttackContext(CFG, variables, train, test, test, streams[name], seeded=True)

    ft_keys = seeded_context("finetune").keys(2)
    ft = data["finetune"]
    assert [k["key_fingerprint"] for k in ft["stem_keys"]] == [fingerprint(k) for k in ft_keys]
    assert ft["stem_keys"][0]["accuracy"] == ft["accuracy"]["stem"]
    for n in ("10", "20"):
        vals = [k["accuracy"][n] for k in ft["stem_keys"]]
        assert ft["stem_across_keys"][n] == {
            "mean": pytest.approx(np.mean(vals)),
            "min": min(vals),
            "max": max(vals),
            "values": vals,
        }
    assert "stem, 2 keys: mean (min-max)" in (out / "summary.md").read_text()
    # the seeded keys of the run: fingerprints are written, the keys themselves are not
    text = (out / "security.json").read_text()
    for key in (ft_keys[0], seeded_context("model_recovery").keys(1)[0]):
        assert fingerprint(key) in text
        assert json.dumps(np.asarray(key.perm).tolist()) not in text
    assert "Known-plaintext" in (out / "summary.md").read_text()
    assert rep["model_recovery"]["attacks"]["original_weights"]["exact_keys"] == 1
    # noise images: the ciphertext-only attack never claims a key on them
    co = rep["ciphertext_only"]
    assert [(r["images"], r["with_model"], r["keys"]) for r in co["rows"]] == [
        (1, False, 2),
        (3, False, 2),
        (1, True, 2),
    ]
    assert all(r["claimed"] == 0 for r in co["rows"][:2])
    assert [r["images"] for r in co["image_recovery"]] == [1, 4]
    assert "Ciphertext-only" in (out / "summary.md").read_text()
    # the countermeasure: same function, relative keys from the stem, only counts written
    cm = data["countermeasure"]
    grid = CFG.image_size // CFG.patch_size
    assert cm["positions"] == grid * grid and len(cm["rows"]) == 1
    row = cm["rows"][0]
    assert row["identical_predictions"] == row["images"] == 40
    assert row["relative_keys_exact"] == grid * grid
    assert set(row["attacks"]) == {
        "raw_1",
        "raw_3",
        "aligned_1",
        "aligned_2",
        "aligned_5",
        "aligned_model_1",
    }
    assert not row["attacks"]["raw_1"]["claimed"] and not row["attacks"]["raw_3"]["claimed"]
    from convmixer_jax.scheme.position_keys import generate_position_keys

    cm_seed = seeded_context("countermeasure").key_seed()
    pos = generate_position_keys(CFG.patch_size, CFG.channels, (grid, grid), seed=cm_seed + 100)
    assert json.dumps(np.asarray(pos.perm[0]).tolist()) not in text
    assert "a key per block position" in (out / "summary.md").read_text()
    # an existing output is refused without force and left untouched
    with pytest.raises(Exception, match="exists"):
        run_security_report(
            inputs,
            SecurityReportConfig.from_options(
                pairs=(1,),
                trials=1,
                recovery_keys=1,
                finetune_sizes=(10,),
                finetune_modes=("stem",),
                finetune_steps=1,
                reference_epochs=0,
                key_seed=1,
            ),
            out,
            progress=False,
            log=lambda m: None,
        )
    assert (out / "security.json").read_text() == text


def test_cli_security_report_refuses_encrypted_model(tmp_path, capsys):
    variables = init_variables(CFG, 0)
    from convmixer_jax.files.model_dir import encrypt_model_dir

    save_model(tmp_path / "plain", CFG, variables)
    encrypt_model_dir(tmp_path / "plain", tmp_path / "enc", generate_key(2, 3, seed=[1]))
    rc = cli.main(
        [
            "security-report",
            str(tmp_path / "enc"),
            "--data-dir",
            str(tmp_path / "nodata"),
            "--out",
            str(tmp_path / "rep"),
        ]
    )
    assert rc == 1
    assert "encrypted model" in capsys.readouterr().err
    assert not (tmp_path / "rep").exists()


def test_cli_security_report_refuses_out_holding_its_model(tmp_path, capsys):
    save_model(tmp_path / "results" / "plain", CFG, init_variables(CFG, 0))
    before = sorted(p.name for p in (tmp_path / "results" / "plain").rglob("*"))
    rc = cli.main(
        [
            "security-report",
            str(tmp_path / "results" / "plain"),
            "--data-dir",
            str(tmp_path / "nodata"),
            "--force",
            "--out",
            str(tmp_path / "results"),
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "contains MODEL_DIR" in err and "choose another output name" in err
    assert sorted(p.name for p in (tmp_path / "results" / "plain").rglob("*")) == before
