"""Fuzzing the command line with malformed files.

Hypothesis makes random bytes and random edits of valid ``.npy`` image files, key files
and model directories and runs the CLI entry point in-process on them. An independent
oracle says whether the edited input is still valid (an edit inside JSON whitespace, say);
if it is not, the run must exit non-zero with exactly one line on stderr, no traceback,
and no file created or changed. Nothing else may ever happen.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convmixer_jax import cli

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


@pytest.fixture(scope="module")
def base(tmp_path_factory, make_model_dir, make_tiny_config):
    """A key (block size 4), images and a plain model of patch 4, 10 classes, on 8 x 8 RGB."""
    d = tmp_path_factory.mktemp("fuzz-base")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert (
            cli.main(
                [
                    "keygen",
                    "--block-size",
                    "4",
                    "--channels",
                    "3",
                    "--seed",
                    "9",
                    "--out",
                    str(d / "k.json"),
                ]
            )
            == 0
        )
    make_model_dir(d / "m", make_tiny_config(patch_size=4, num_classes=10), seed=0)
    np.save(d / "x.npy", np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8))
    return d


def snapshot(d: Path) -> dict:
    return {
        str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(d.rglob("*"))
    }


def run(argv, folder: Path) -> tuple[int, str]:
    before = snapshot(folder)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    text = err.getvalue()
    if code != 0:
        lines = [line for line in text.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("convmixer-jax: error: "), text
        assert snapshot(folder) == before, "a failed run changed files"
    assert "Traceback" not in text
    return code, text


def edit(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for kind, pos, value in edits:
        if not b:
            break
        i = pos % len(b)
        if kind == "set":
            b[i] = value
        elif kind == "insert":
            b.insert(i, value)
        elif kind == "delete":
            del b[i]
        else:  # truncate
            del b[i:]
    return bytes(b)


EDITS = st.lists(
    st.tuples(
        st.sampled_from(["set", "insert", "delete", "truncate"]),
        st.integers(0, 10**6),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=4,
)
FILE = st.one_of(
    st.binary(max_size=400).map(lambda b: ("bytes", b)), EDITS.map(lambda e: ("edit", e))
)


def images_valid(path: Path) -> bool:
    """Independent oracle: numpy reads it, and it is a batch of 8x8 RGB uint8 or [0, 1] float
    images."""
    try:
        x = np.load(path, allow_pickle=False)
    except Exception:
        return False
    if x.ndim not in (3, 4) or x.shape[-3:] != (8, 8, 3):
        return False
    if x.dtype == np.uint8:
        return True
    return bool(
        np.issubdtype(x.dtype, np.floating)
        and np.isfinite(x).all()
        and x.min() >= 0
        and x.max() <= 1
    )


@SETTINGS
@given(case=FILE)
def test_fuzzed_images(base, case):
    with tempfile.TemporaryDirectory() as t:
        t = Path(t)
        kind, val = case
        data = val if kind == "bytes" else edit((base / "x.npy").read_bytes(), val)
        (t / "in.npy").write_bytes(data)
        valid = images_valid(t / "in.npy")
        for argv in (
            ["encrypt-images", "--key", base / "k.json", t / "in.npy", t / "out.npy"],
            ["predict", base / "m", t / "in.npy", "--out", t / "l.npy"],
        ):
            code, err = run(argv, t)
            assert (code == 0) == valid, (code, err)


@SETTINGS
@given(case=FILE)
def test_fuzzed_keys(base, case):
    original = json.loads((base / "k.json").read_text())
    with tempfile.TemporaryDirectory() as t:
        t = Path(t)
        kind, val = case
        data = val if kind == "bytes" else edit((base / "k.json").read_bytes(), val)
        (t / "k.json").write_bytes(data)
        try:
            valid = (
                json.loads(data) == original
            )  # only an edit that leaves the JSON value as it was
        except Exception:
            valid = False
        code, err = run(["encrypt-images", "--key", t / "k.json", base / "x.npy", t / "out.npy"], t)
        assert (code == 0) == valid, (code, err)
        code, err = run(["encrypt-model", "--key", t / "k.json", base / "m", t / "em"], t)
        assert (code == 0) == valid, (code, err)


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


MODEL_EDIT = st.tuples(
    st.sampled_from(["config", "variables", "delete"]), st.integers(0, 10**6), EDITS
)


@SETTINGS
@given(case=MODEL_EDIT)
def test_fuzzed_model_directories(base, case):
    target, which, edits = case
    with tempfile.TemporaryDirectory() as t:
        t = Path(t)
        shutil.copytree(base / "m", t / "m")
        files = sorted(p for p in (t / "m" / "variables").rglob("*") if p.is_file())
        valid = False
        if target == "config":
            cfg = t / "m" / "config.json"
            data = edit(cfg.read_bytes(), edits)
            cfg.write_bytes(data)
            try:
                # the seal covers the JSON value, types included (1.0 is not 1)
                valid = _canonical(json.loads(data)) == _canonical(
                    json.loads((base / "m" / "config.json").read_text())
                )
            except Exception:
                valid = False
        elif target == "variables":
            f = files[which % len(files)]
            data = f.read_bytes()
            new = edit(data, edits)
            f.write_bytes(new)
            valid = new == data
        else:
            files[which % len(files)].unlink()
        np.save(t / "x.npy", np.load(base / "x.npy"))
        code, err = run(["predict", t / "m", t / "x.npy", "--out", t / "l.npy"], t)
        assert (code == 0) == valid, (code, err)
