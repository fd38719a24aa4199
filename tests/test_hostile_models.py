"""Hostile model directories and file names: a model directory is sealed (config.json and
its weights), and every command that loads one refuses it, with one line and no file
changed, once any sealed field, the seal itself or a file of its weights was edited;
``seal-model`` seals a model changed on purpose. ``predict`` prints file names so that
none can forge a line of its output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from convmixer_jax import cli
from tests.hostile_helpers import refused_in_process, refused_subprocess, tree_digests

CLASSES = ["ant", "bee", "cat"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_config, png_tree):
    """Read only: a plain model P (records its class names), a second plain model P2 of the
    same architecture (other weights), P encrypted with key K as E, a second key K2, a
    class tree whose classes are P's, images x.npy and x.npy encrypted with K."""
    from convmixer_jax.files.model_dir import encrypt_model_dir, save_model
    from convmixer_jax.scheme.images import encrypt_images
    from convmixer_jax.scheme.keys import generate_key, key_file_text
    from convmixer_jax.training.loop import init_variables

    root = tmp_path_factory.mktemp("hostile-models")
    extra = {"created_by": "init-model", "seed": 0, "classes": CLASSES}
    save_model(root / "P", tiny_config, init_variables(tiny_config, 0), extra=extra)
    save_model(root / "P2", tiny_config, init_variables(tiny_config, 1), extra=extra)
    k, k2 = generate_key(2, 3, seed=1), generate_key(2, 3, seed=2)
    (root / "k.json").write_text(key_file_text(k))
    (root / "k2.json").write_text(key_file_text(k2))
    encrypt_model_dir(root / "P", root / "E", k)
    data = png_tree(root / "data", n_per_class=2, classes=3, size=8)
    for i, name in enumerate(sorted(p.name for p in (data / "train").iterdir())):
        for split in ("train", "test"):
            (data / split / name).rename(data / split / CLASSES[i])
    x = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    np.save(root / "x.npy", x)
    np.save(root / "ex.npy", np.asarray(encrypt_images(x, k)))
    return SimpleNamespace(root=root, data=data)


def plain_commands(m: Path, s: SimpleNamespace, out: Path) -> dict[str, list]:
    """Every command that loads a plain model ``m``, writing under ``out``."""
    d = ["--data-dir", s.data]
    return {
        "predict": ["predict", m, s.root / "x.npy", "--out", out / "l.npy"],
        "predict-stdout": ["predict", m, s.root / "x.npy"],
        "evaluate": ["evaluate", m, *d, "--quiet", "--out", out / "r.json"],
        "encrypt-model": ["encrypt-model", "--key", s.root / "k.json", m, "--out", out / "m"],
        "export-torch": ["export-torch", m, "--out", out / "w.safetensors"],
        "attack": ["attack", m, *d, "--num-keys", "2", "--quiet", "--out", out / "a.json"],
        "average-models": ["average-models", m, s.root / "P2", *d, "--quiet", "--out", out / "v"],
        "train-init-from": [
            "train",
            "--init-from",
            m,
            *d,
            "--epochs",
            "1",
            "--quiet",
            "--workdir",
            out / "w",
            "--out",
            out / "t",
        ],
        "reproduce": ["reproduce", "--checkpoint", m, *d, "--quiet", "--out", out / "rep"],
        "security-report": ["security-report", m, *d, "--quiet", "--out", out / "sec"],
    }


def encrypted_commands(m: Path, s: SimpleNamespace, out: Path) -> dict[str, list]:
    """Every command that loads an encrypted model ``m``, writing under ``out``."""
    k, k2 = s.root / "k.json", s.root / "k2.json"
    return {
        "predict": ["predict", m, s.root / "ex.npy", "--out", out / "l.npy"],
        "decrypt-model": ["decrypt-model", "--key", k, m, "--out", out / "d"],
        "rekey-model": ["rekey-model", "--old-key", k, "--new-key", k2, m, "--out", out / "r"],
        "export-torch": ["export-torch", m, "--out", out / "w.safetensors"],
        "recover-key": [
            "recover-key",
            "--encrypted",
            s.root / "ex.npy",
            "--block-size",
            "2",
            "--model",
            m,
            "--public",
            s.root / "x.npy",
            "--quiet",
            "--out",
            out / "k.json",
        ],
    }


def _set(path: str, value):
    """An edit of config.json: the field at ``path`` ('a/b') set to ``value``."""

    def apply(meta: dict) -> None:
        *parents, last = path.split("/")
        node = meta
        for p in parents:
            node = node[p]
        node[last] = value

    return apply


def _delete(name: str):
    return lambda meta: meta.pop(name, None)


# Every sealed field that changes outputs or labels, and some that only tell where a model
# comes from: each edit alone must be refused by every command that loads the model.
SEALED_EDITS = {
    "activation": _set("model/activation", "relu"),
    "mean": _set("model/mean", [0.5, 0.5, 0.5]),
    "std": _set("model/std", [0.25, 0.25, 0.25]),
    "gelu_approximate": _set("model/gelu_approximate", True),
    "depthwise_impl": _set("model/depthwise_impl", "shift"),
    "classes_order": _set("classes", ["bee", "ant", "cat"]),
    "classes_removed": _delete("classes"),
    "provenance_seed": _set("seed", 7),
    "provenance_added": _set("test_accuracy", 0.99),
    "integer_as_float": _set("seed", 0.0),
    "variables_record": lambda meta: meta["variables_sha256"].update(
        {k: "0" * 64 for k in list(meta["variables_sha256"])[:1]}
    ),
}
UNSEALED = {
    "seal_deleted": _delete("model_sha256"),
    "seal_empty_object": _set("model_sha256", {}),
    "seal_empty_string": _set("model_sha256", ""),
    "seal_null": _set("model_sha256", None),
    "variables_record_deleted": _delete("variables_sha256"),
    "variables_record_empty": _set("variables_sha256", {}),
}


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    meta = json.loads((dst / "config.json").read_text())
    edit(meta)
    (dst / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return dst


def _refused_by_all(capsys, tmp_path, s, model: Path, commands, contains: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for name, argv in commands(model, s, out).items():
        line = refused_in_process(capsys, argv, watch=[tmp_path, s.root], contains=contains)
        assert str(model) in line, (name, line)


@pytest.mark.parametrize("field", sorted(SEALED_EDITS))
def test_edited_sealed_field_refused_by_every_command(models, tmp_path, capsys, field):
    p = _edited_copy(models.root / "P", tmp_path / "P", SEALED_EDITS[field])
    _refused_by_all(capsys, tmp_path, models, p, plain_commands, "was edited")


@pytest.mark.parametrize("field", ["activation", "mean", "classes_order", "provenance_seed"])
def test_edited_encrypted_model_refused_by_every_command(models, tmp_path, capsys, field):
    e = _edited_copy(models.root / "E", tmp_path / "E", SEALED_EDITS[field])
    _refused_by_all(capsys, tmp_path, models, e, encrypted_commands, "was edited")


def test_edited_encryption_record_refused(models, tmp_path, capsys):
    e = _edited_copy(
        models.root / "E", tmp_path / "E", _set("encryption/key_fingerprint", "ab" * 32)
    )
    _refused_by_all(capsys, tmp_path, models, e, encrypted_commands, "was edited")
    # a plain model made to look encrypted, and an encrypted one made to look plain
    shutil.rmtree(tmp_path / "out")
    fake = json.loads((models.root / "E" / "config.json").read_text())["encryption"]
    p = _edited_copy(models.root / "P", tmp_path / "P", _set("encryption", fake))
    _refused_by_all(capsys, tmp_path, models, p, encrypted_commands, "was edited")
    shutil.rmtree(tmp_path / "out")
    e2 = _edited_copy(models.root / "E", tmp_path / "E2", _set("encryption", None))
    _refused_by_all(capsys, tmp_path, models, e2, plain_commands, "was edited")


@pytest.mark.parametrize("case", sorted(UNSEALED))
def test_model_without_seal_refused(models, tmp_path, capsys, case):
    p = _edited_copy(models.root / "P", tmp_path / "P", UNSEALED[case])
    _refused_by_all(capsys, tmp_path, models, p, plain_commands, "seal-model")


def test_unsealed_model_with_swapped_weights_refused(models, tmp_path, capsys):
    """The attack of an older release: drop the digests, then swap the weights."""
    p = _edited_copy(models.root / "P", tmp_path / "P", _delete("variables_sha256"))
    shutil.rmtree(p / "variables")
    shutil.copytree(models.root / "P2" / "variables", p / "variables")
    _refused_by_all(capsys, tmp_path, models, p, plain_commands, "not sealed")


def _swap_variables(src: Path, donor: Path, dst: Path, *, with_record: bool) -> Path:
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "variables")
    shutil.copytree(donor / "variables", dst / "variables")
    if with_record:  # the donor's digests copied too: only the seal can tell
        meta = json.loads((dst / "config.json").read_text())
        meta["variables_sha256"] = json.loads((donor / "config.json").read_text())[
            "variables_sha256"
        ]
        (dst / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return dst


@pytest.mark.parametrize("with_record", [False, True], ids=["files", "files-and-digests"])
def test_swapped_weights_refused(models, tmp_path, capsys, with_record):
    p = _swap_variables(
        models.root / "P", models.root / "P2", tmp_path / "P", with_record=with_record
    )
    word = "was edited" if with_record else "variables/"
    _refused_by_all(capsys, tmp_path, models, p, plain_commands, word)


def test_changed_added_or_removed_weight_file_refused(models, tmp_path, capsys):
    files = sorted(f for f in (models.root / "P" / "variables").rglob("*") if f.is_file())
    rel = files[-1].relative_to(models.root / "P")
    cases = {}
    cases["changed"] = shutil.copytree(models.root / "P", tmp_path / "changed")
    with open(cases["changed"] / rel, "ab") as f:
        f.write(b"\0")
    cases["added"] = shutil.copytree(models.root / "P", tmp_path / "added")
    (cases["added"] / "variables" / "extra").write_bytes(b"x")
    cases["removed"] = shutil.copytree(models.root / "P", tmp_path / "removed")
    (cases["removed"] / rel).unlink()
    out = tmp_path / "out"
    out.mkdir()
    for how, m in cases.items():
        for argv in plain_commands(m, models, out).values():
            line = refused_in_process(capsys, argv, watch=[tmp_path, models.root])
            assert "variables/" in line and str(m) in line, (how, line)


def _predict_lines(capsys, model: Path, images: Path) -> list[str]:
    assert cli.main(["predict", str(model), str(images), "--quiet"]) == 0
    return capsys.readouterr().out.splitlines()


def test_seal_model_makes_an_edited_model_load(models, tmp_path, capsys):
    p = _edited_copy(models.root / "P", tmp_path / "P", SEALED_EDITS["activation"])
    before = tree_digests(p)
    assert cli.main(["seal-model", str(p), "--out", str(tmp_path / "sealed")]) == 0
    out = capsys.readouterr().out
    assert "accepted as it is now" in out and str(tmp_path / "sealed") in out
    assert tree_digests(p) == before  # the edited model is left as it was
    sealed = json.loads((tmp_path / "sealed" / "config.json").read_text())
    assert sealed["model"]["activation"] == "relu" and sealed["classes"] == CLASSES
    relu = _predict_lines(capsys, tmp_path / "sealed", models.root / "x.npy")
    gelu = _predict_lines(capsys, models.root / "P", models.root / "x.npy")
    assert len(relu) == len(gelu) == 4 and relu != gelu  # the edit is now in effect
    # an unsealed model with other weights, sealed on purpose, loads with those weights
    q = _edited_copy(models.root / "P", tmp_path / "Q", _delete("model_sha256"))
    shutil.rmtree(q / "variables")
    shutil.copytree(models.root / "P2" / "variables", q / "variables")
    assert cli.main(["seal-model", str(q), "--out", str(tmp_path / "q-sealed")]) == 0
    capsys.readouterr()
    assert _predict_lines(capsys, tmp_path / "q-sealed", models.root / "x.npy") == (
        _predict_lines(capsys, models.root / "P2", models.root / "x.npy")
    )
    # an intact model sealed again says so
    assert cli.main(["seal-model", str(models.root / "P"), "--out", str(tmp_path / "p")]) == 0
    assert "sealed and intact" in capsys.readouterr().out


def test_seal_model_refuses_what_cannot_be_a_model(models, tmp_path, capsys, make_tiny_config):
    from convmixer_jax.files.model_dir import model_digest

    watch = [tmp_path, models.root]
    # weights that do not fit the (edited) architecture
    p = _edited_copy(models.root / "P", tmp_path / "P", _set("model/dim", 16))
    refused_in_process(
        capsys, ["seal-model", p, "--out", tmp_path / "s"], watch=watch, contains="has shape"
    )
    # an architecture that is no model
    q = _edited_copy(models.root / "P", tmp_path / "Q", _set("model/depth", -1))
    refused_in_process(capsys, ["seal-model", q, "--out", tmp_path / "s"], watch=watch)
    # the output inside the input, or over the input itself
    for out in (models.root / "P" / "variables" / "x", models.root / "P"):
        refused_in_process(
            capsys, ["seal-model", models.root / "P", "--out", out, "--force"], watch=watch
        )
    # an existing output without --force
    (tmp_path / "taken").mkdir()
    refused_in_process(
        capsys, ["seal-model", models.root / "P", "--out", tmp_path / "taken"], watch=watch
    )
    # the shape check is reached when the seal is right (a model sealed with the wrong dim)
    r = _edited_copy(models.root / "P", tmp_path / "R", _set("model/dim", 16))
    meta = json.loads((r / "config.json").read_text())
    meta["model_sha256"] = model_digest(meta)
    (r / "config.json").write_text(json.dumps(meta))
    refused_in_process(
        capsys,
        ["predict", r, models.root / "x.npy", "--out", tmp_path / "l.npy"],
        watch=watch,
        contains="has shape",
    )


def test_unsealed_notes_and_layout_may_change(models, tmp_path, capsys):
    """The 'notes' field is outside the seal, and so is the JSON layout (indentation, key
    order): the seal is taken over the canonical JSON of the sealed fields."""
    p = shutil.copytree(models.root / "P", tmp_path / "P")
    meta = json.loads((p / "config.json").read_text())
    meta["notes"] = "checked by hand on 3 photos"
    reordered = dict(reversed(list(meta.items())))
    (p / "config.json").write_text(json.dumps(reordered, indent=5, sort_keys=False))
    assert _predict_lines(capsys, p, models.root / "x.npy") == _predict_lines(
        capsys, models.root / "P", models.root / "x.npy"
    )
    assert cli.main(["seal-model", str(p), "--out", str(tmp_path / "s")]) == 0
    assert "sealed and intact" in capsys.readouterr().out
    assert json.loads((tmp_path / "s" / "config.json").read_text())["notes"] == meta["notes"]


def test_a_model_is_replaced_whole_and_only_by_model_writers(
    models, tmp_path, capsys, arch_args, tiny_config
):
    x = models.root / "x.npy"
    target = shutil.copytree(models.root / "P", tmp_path / "T")
    assert cli.main(["seal-model", str(models.root / "P2"), "--out", str(target), "--force"]) == 0
    capsys.readouterr()
    assert _predict_lines(capsys, target, x) == _predict_lines(capsys, models.root / "P2", x)
    argv = ["init-model", *arch_args(tiny_config), "--seed", "3", "--out", str(target), "--force"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    watch = [tmp_path, models.root]
    k = models.root / "k.json"
    for argv in (
        ["predict", models.root / "P", x, "--out", target, "--force"],
        ["encrypt-images", "--key", k, x, "--out", target, "--force"],
        ["seal-model", models.root / "P", "--out", target / "variables", "--force"],
        ["seal-model", models.root / "P", "--out", target / "config.json", "--force"],
    ):
        refused_in_process(capsys, argv, watch=watch)


def test_edited_model_refused_in_a_real_process(models, tmp_path):
    p = _edited_copy(models.root / "P", tmp_path / "P", SEALED_EDITS["mean"])
    refused_subprocess(
        ["predict", p, models.root / "x.npy"],
        watch=[tmp_path, models.root],
        contains="was edited",
        status=1,
    )


# --------------------------------------------------------------------------- printed file names


def _png(path: Path, seed: int) -> None:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")


FORGING_NAMES = [
    "b.png: 1 0.999\nc.png",  # a line of its own
    "b.png: ant 0.999\rc.png",  # a carriage return redraws the line
    "b\x1b[2K.png",  # a terminal escape
    "b\u2028.png",  # a Unicode line separator
    "b\u202ec.png",  # a right-to-left override
    "b.png: ant 1.000.png",  # the separator alone
    "'quoted'.png",  # a name that reads as an escaped one
]


@pytest.mark.parametrize("name", FORGING_NAMES)
def test_predict_names_cannot_forge_lines(models, tmp_path, capsys, name):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _png(folder / "a.png", 0)
    _png(folder / name, 1)
    lines = _predict_lines(capsys, models.root / "P", folder)
    assert len(lines) == 2, lines
    plain = next(line for line in lines if line.startswith("a.png: "))
    assert plain.count(": ") == 1  # an ordinary name is printed as it is
    other = next(line for line in lines if line is not plain)
    assert other.startswith(repr(name) + ": ") and other.isprintable(), other
    assert other[len(repr(name)) + 2 :].count(": ") == 0


def test_predict_undecodable_name_is_escaped(models, tmp_path):
    """A file name that is not UTF-8 prints escaped, in a real process with a UTF-8 stdout."""
    import os
    import subprocess
    import sys

    folder = tmp_path / "imgs"
    folder.mkdir()
    _png(folder / "a.png", 0)
    _png(Path(os.fsdecode(os.fsencode(str(folder)) + b"/b\xff.png")), 1)
    r = subprocess.run(
        [sys.executable, "-m", "convmixer_jax.cli", "predict", str(models.root / "P"), str(folder)]
        + ["--quiet"],
        capture_output=True,
        env=dict(os.environ, PYTHONIOENCODING="utf-8"),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert len(lines) == 2 and lines[1].startswith("'b\\udcff.png': "), lines


def test_recover_key_refuses_an_edited_model_before_reading_public_images(models, tmp_path, capsys):
    """recover-key --model loads the model first: an edited one is refused before the
    public images are looked for (here there are none, and no download is tried)."""
    e = _edited_copy(models.root / "E", tmp_path / "E", SEALED_EDITS["activation"])
    argv = ["recover-key", "--encrypted", models.root / "ex.npy", "--block-size", "2"]
    argv += ["--model", e, "--data-dir", tmp_path / "no-such-data", "--quiet"]
    argv += ["--out", tmp_path / "out" / "k.json"]
    (tmp_path / "out").mkdir()
    refused_in_process(
        capsys, argv, watch=[models.root, e, tmp_path / "out"], contains="was edited"
    )
