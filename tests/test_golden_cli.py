"""Golden outputs of the CLI for fixed seeds, pinned before the package was reorganized.

keygen, encrypt-images, init-model, encrypt-model and predict run in-process
on fixed inputs; their files must equal (keys, images: byte for byte) or match
(logits: to float32 rounding) what the code wrote when the golden file was
made. Regenerate only on purpose: ``CONVMIXER_JAX_WRITE_GOLDEN=1 pytest
tests/test_golden_cli.py`` (and say why in the commit).
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from convmixer_jax import cli

GOLDEN = Path(__file__).with_name("golden") / "cli_outputs.json"
ARCH = [
    "--dim",
    "16",
    "--depth",
    "2",
    "--kernel-size",
    "3",
    "--patch-size",
    "4",
    "--image-size",
    "8",
]


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _config_without_paths(model_dir: Path) -> dict:
    """config.json without ``variables_sha256`` and ``model_sha256`` (added after the golden
    file was made: digests of Orbax's files, which hold write times, and the seal over
    them, so the first are checked for form and the seal against the rest)."""
    from convmixer_jax.files.model_dir import model_digest

    meta = json.loads((model_dir / "config.json").read_text())
    assert meta["model_sha256"] == model_digest(meta)
    meta.pop("model_sha256")
    digests = meta.pop("variables_sha256")
    assert digests and all(len(v) == 64 and int(v, 16) >= 0 for v in digests.values())
    return meta


def _run(tmp: Path, capsys) -> dict:
    def call(*argv):
        assert cli.main([str(a) for a in argv]) == 0
        return capsys.readouterr().out.strip()

    out = {}
    out["keygen_stdout"] = call(
        "keygen", "--block-size", 4, "--channels", 3, "--seed", 11, "--out", tmp / "k.json"
    )
    out["key_sha256"] = _sha(tmp / "k.json")
    images = np.random.default_rng(5).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.save(tmp / "x.npy", images)
    np.save(tmp / "xf.npy", images.astype(np.float32) / 255)
    call("encrypt-images", "--key", tmp / "k.json", tmp / "x.npy", tmp / "ex.npy")
    call("encrypt-images", "--key", tmp / "k.json", tmp / "xf.npy", tmp / "exf.npy")
    out["encrypted_uint8_sha256"] = _sha(tmp / "ex.npy")
    out["encrypted_float32_sha256"] = _sha(tmp / "exf.npy")
    call("init-model", *ARCH, "--seed", 3, "--out", tmp / "m")
    out["plain_config"] = _config_without_paths(tmp / "m")
    call("encrypt-model", "--key", tmp / "k.json", tmp / "m", tmp / "em")
    out["encrypted_config"] = _config_without_paths(tmp / "em")
    call("predict", tmp / "m", tmp / "x.npy", "--out", tmp / "plain_logits.npy")
    call("predict", tmp / "em", tmp / "ex.npy", "--out", tmp / "enc_logits.npy")
    out["plain_logits"] = np.load(tmp / "plain_logits.npy").tolist()
    out["encrypted_logits"] = np.load(tmp / "enc_logits.npy").tolist()
    return out


def test_cli_outputs_match_golden(tmp_path, capsys):
    got = _run(tmp_path, capsys)
    if os.environ.get("CONVMIXER_JAX_WRITE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())
    for name in (
        "keygen_stdout",
        "key_sha256",
        "encrypted_uint8_sha256",
        "encrypted_float32_sha256",
        "plain_config",
        "encrypted_config",
    ):
        assert got[name] == want[name], name
    for name in ("plain_logits", "encrypted_logits"):
        np.testing.assert_allclose(
            np.asarray(got[name]), np.asarray(want[name]), rtol=1e-5, atol=1e-5, err_msg=name
        )
    # the scheme's claim, on the pinned files too
    np.testing.assert_allclose(got["encrypted_logits"], got["plain_logits"], rtol=1e-4, atol=1e-4)
