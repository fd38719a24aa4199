"""Training curves: reading train_log.json and drawing it; CLI errors leave no file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from convmixer_jax import cli
from convmixer_jax.training.curves import (
    TrainLogError,
    chain_train_logs,
    plot_training_curves,
    read_train_log,
)


def make_log(path, n_epochs, test=True):
    rng = np.random.default_rng(n_epochs)
    epochs = [
        {
            "epoch": i + 1,
            "train_loss": float(2.0 / (i + 1)),
            "train_accuracy": float(rng.uniform(0.1, 1)),
            "train_seconds": 1.0,
            "images_per_second": 10.0,
        }
        for i in range(n_epochs)
    ]
    if test:
        for e in epochs:
            e["test_accuracy"] = round(float(rng.uniform(0.1, 1)), 4)
    path.write_text(json.dumps({"model": {}, "recipe": {"epochs": 7}, "epochs": epochs}))
    return epochs


def test_read_from_dir_or_file_and_plot(tmp_path):
    epochs = make_log(tmp_path / "train_log.json", 3)
    assert read_train_log(tmp_path)["epochs"] == epochs
    assert read_train_log(tmp_path / "train_log.json")["epochs"] == epochs
    plot_training_curves(read_train_log(tmp_path), tmp_path / "c.png")
    data = (tmp_path / "c.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_plot_without_test_accuracy(tmp_path):
    make_log(tmp_path / "train_log.json", 2, test=False)
    plot_training_curves(read_train_log(tmp_path), tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 5000


@pytest.mark.parametrize(
    "content, words",
    [
        (None, "does not exist"),
        ("not json", "is not JSON"),
        ('{"epochs": 3}', "no 'epochs' list"),
        ('{"epochs": []}', "no finished epoch"),
    ],
)
def test_bad_logs_are_refused_by_name(tmp_path, content, words):
    path = tmp_path / "train_log.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TrainLogError, match=words):
        read_train_log(path)


def test_cli_errors_write_nothing(tmp_path, capsys):
    make_log(tmp_path / "train_log.json", 2)
    assert cli.main(["plot-training", str(tmp_path), "--out", str(tmp_path / "c.jpg")]) == 2
    assert (
        cli.main(["plot-training", str(tmp_path / "nope"), "--out", str(tmp_path / "c.png")]) == 1
    )
    assert cli.main(["plot-training", str(tmp_path), "--out", str(tmp_path / "no" / "c.png")]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_log.json"]
    (tmp_path / "c.png").write_bytes(b"keep")
    assert cli.main(["plot-training", str(tmp_path), "--out", str(tmp_path / "c.png")]) == 1
    assert (tmp_path / "c.png").read_bytes() == b"keep"
    err = capsys.readouterr().err
    assert "must end in .png" in err and "does not exist" in err and "--force" in err
    assert (
        cli.main(["plot-training", str(tmp_path), "--out", str(tmp_path / "c.png"), "--force"]) == 0
    )
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_chained_stages_count_on(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = make_log(tmp_path / "a" / "train_log.json", 3)
    second = make_log(tmp_path / "b" / "train_log.json", 2)
    chained = chain_train_logs([read_train_log(tmp_path / "a"), read_train_log(tmp_path / "b")])
    assert [e["epoch"] for e in chained["epochs"]] == [1, 2, 3, 4, 5]
    assert [e["test_accuracy"] for e in chained["epochs"]] == [
        e["test_accuracy"] for e in first + second
    ]
    assert chained["stage_starts"] == [3] and chained["recipe"]["epochs"] == 14
    assert read_train_log(tmp_path / "a")["epochs"] == first  # the inputs are not changed
    assert (
        cli.main(
            [
                "plot-training",
                str(tmp_path / "a"),
                str(tmp_path / "b"),
                "--out",
                str(tmp_path / "c.png"),
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["epochs"] == 5 and out["test_accuracy"] == second[-1]["test_accuracy"]
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(TrainLogError, match="no training log"):
        chain_train_logs([])


def test_validation_curves_are_drawn(tmp_path, monkeypatch):
    """A run with a hold-out draws its raw and EMA validation accuracy, labelled with the last
    values."""
    import convmixer_jax.training.curves as curves

    epochs = make_log(tmp_path / "train_log.json", 3, test=False)
    for i, e in enumerate(epochs):
        e["val_accuracy"], e["val_accuracy_ema"] = 0.5 + i / 10, 0.55 + i / 10
    (tmp_path / "train_log.json").write_text(
        json.dumps({"recipe": {"epochs": 3}, "epochs": epochs})
    )
    seen = {}

    def capture(fig, path, dpi=130):
        ax = fig.axes[1]
        seen["labels"] = [t.get_text() for t in ax.get_legend().get_texts()]
        seen["lines"] = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}

    monkeypatch.setattr(curves, "save_figure_atomic", capture)
    plot_training_curves(read_train_log(tmp_path), tmp_path / "c.png")
    assert "validation (last 0.7000)" in seen["labels"]
    assert "validation, EMA weights (last 0.7500)" in seen["labels"]
    assert seen["lines"]["validation, EMA weights (last 0.7500)"] == [0.55, 0.65, 0.75]
