"""``convmixer-jax reproduce``: Table 1, Fig. 4 and Fig. 5 from a checkpoint or from a model
it trains itself, and the options it refuses before writing anything."""

import json
import shutil

import numpy as np
import pytest

from convmixer_jax import cli


def test_reproduce_from_a_checkpoint_and_what_it_refuses(
    tmp_path, monkeypatch, capsys, png_tree, tiny_model_dir
):
    monkeypatch.setenv("CONVMIXER_JAX_CACHE", str(tmp_path / "cache"))
    png_tree(tmp_path / "data")
    model = tiny_model_dir  # ConvMixer-8/1, kernel 3, patch 2, 3 classes, 8 x 8, seed 0
    rep = tmp_path / "rep"
    assert (
        cli.main(
            [
                "reproduce",
                "--checkpoint",
                str(model),
                "--data-dir",
                str(tmp_path / "data"),
                "--num-keys",
                "3",
                "--quiet",
                "--out",
                str(rep),
            ]
        )
        == 0
    )
    res = json.loads((rep / "results.json").read_text())
    for field in (
        "test_images",
        "baseline_plain",
        "encrypted_plain",
        "encrypted_encrypted",
        "identical_predictions",
        "wrong_keys",
        "key_space_log2",
        "epochs",
        "train_seconds",
        "device",
        "key_fingerprint",
    ):
        assert field in res, field
    assert res["test_images"] == 18 and res["identical_predictions"] == 18
    assert (
        res["identical_predictions_tta"] == 18
        and res["encrypted_encrypted_tta"] == res["baseline_plain_tta"]
    )
    assert "mirror TTA" in (rep / "table1.md").read_text()
    assert res["encrypted_encrypted"] == res["baseline_plain"]
    assert len(res["wrong_keys"]) == 3 and round(res["key_space_log2"], 2) == round(
        np.log2(float(np.prod(np.arange(1, 13, dtype=np.float64))) * 924), 2
    )
    assert {p.name for p in rep.iterdir()} >= {"results.json", "table1.md", "fig4.png", "fig5.png"}
    assert "perm" not in (rep / "results.json").read_text()
    # training options with --checkpoint would be ignored: refused, nothing written
    capsys.readouterr()
    assert (
        cli.main(
            [
                "reproduce",
                "--checkpoint",
                str(model),
                "--data-dir",
                str(tmp_path / "data"),
                "--epochs",
                "3",
                "--holdout",
                "2",
                "--quiet",
                "--out",
                str(tmp_path / "rep3"),
            ]
        )
        == 2
    )
    assert "--epochs, --holdout set how a model is trained" in capsys.readouterr().err
    assert not (tmp_path / "rep3").exists()
    # reproduce refuses an encrypted checkpoint
    key = tmp_path / "k.json"
    assert (
        cli.main(
            ["keygen", "--block-size", "2", "--channels", "3", "--seed", "1", "--out", str(key)]
        )
        == 0
    )
    assert cli.main(["encrypt-model", "--key", str(key), str(model), str(tmp_path / "enc")]) == 0
    capsys.readouterr()
    assert (
        cli.main(
            [
                "reproduce",
                "--checkpoint",
                str(tmp_path / "enc"),
                "--data-dir",
                str(tmp_path / "data"),
                "--num-keys",
                "1",
                "--quiet",
                "--out",
                str(tmp_path / "rep2"),
            ]
        )
        == 1
    )
    assert "encrypted" in capsys.readouterr().err
    assert not (tmp_path / "rep2").exists()
    # --out holding the checkpoint is refused even with --force (it would be deleted)
    nest = tmp_path / "nest"
    shutil.copytree(model, nest / "plain-model")
    before = sorted(str(p.relative_to(nest)) for p in nest.rglob("*"))
    assert (
        cli.main(
            [
                "reproduce",
                "--checkpoint",
                str(nest / "plain-model"),
                "--data-dir",
                str(tmp_path / "data"),
                "--num-keys",
                "1",
                "--quiet",
                "--force",
                "--out",
                str(nest),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "contains --checkpoint" in err and "choose another output name" in err
    assert sorted(str(p.relative_to(nest)) for p in nest.rglob("*")) == before


def test_reproduce_from_scratch_trains_the_default_recipe(
    tmp_path, monkeypatch, capsys, png_tree, make_tiny_config
):
    """With no --checkpoint, reproduce trains the paper's architecture with the default
    recipe (strong: hold-out, EMA, RandAugment), one output per class of the data, and
    evaluates that model; a hold-out the data cannot give is refused before any output.
    The paper's preset is shrunk (width 8, depth 1; patch 4 on 32 x 32 as in the paper) so
    that the test compiles in seconds; what reproduce takes from it and what from the data
    is the same."""
    from convmixer_jax.model.convmixer import PRESETS

    monkeypatch.setitem(
        PRESETS, "paper", make_tiny_config(patch_size=4, num_classes=10, image_size=32)
    )
    monkeypatch.setenv("CONVMIXER_JAX_CACHE", str(tmp_path / "cache"))
    png_tree(tmp_path / "data", n_per_class=4, classes=3, size=32)
    common = [
        "reproduce",
        "--data-dir",
        str(tmp_path / "data"),
        "--epochs",
        "1",
        "--train-batch-size",
        "3",
        "--num-keys",
        "2",
        "--key-seed",
        "4",
        "--quiet",
    ]
    assert cli.main([*common, "--out", str(tmp_path / "too-small")]) == 2
    assert "--holdout N with N < 12" in capsys.readouterr().err
    assert not (tmp_path / "too-small").exists() and not (tmp_path / "too-small-work").exists()
    rep = tmp_path / "rep"
    assert cli.main([*common, "--holdout", "3", "--out", str(rep)]) == 0
    res = json.loads((rep / "results.json").read_text())
    assert (
        res["train_config"]["augment"] == ["crop", "flip", "randaugment"]
        and res["train_config"]["ema_decay"] > 0
    )
    assert res["holdout"]["images"] == 3 and res["weights"] in ("ema", "raw") and res["epochs"] == 1
    assert "test_accuracy" not in res["train_log"][0] and "val_accuracy_ema" in res["train_log"][0]
    from convmixer_jax.files.model_dir import load_model

    config, variables, meta = load_model(rep / "plain-model")
    assert (config.dim, config.depth, config.patch_size, config.num_classes) == (8, 1, 4, 3)
    assert meta["classes"] == ["class0", "class1", "class2"] and meta["weights"] == res["weights"]
    # the saved model is the one evaluated
    from convmixer_jax.data import load_split
    from convmixer_jax.model.inference import predict_logits

    test_x, test_y, _ = load_split("test", data_dir=str(tmp_path / "data"))
    acc = float(
        np.mean(np.argmax(np.asarray(predict_logits(config, variables, test_x)), -1) == test_y)
    )
    assert res["baseline_plain"] == pytest.approx(acc) and res["identical_predictions"] == 12
