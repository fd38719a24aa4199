"""PyTorch weights in and out: timm's and locuslab's ConvMixers imported, run, encrypted, exported.

Every check compares against PyTorch itself (timm's ``ConvMixer`` and the
locuslab ``nn.Sequential`` reference in eval mode, with random weights and
random BatchNorm running statistics); the encrypted images come from an
independent NumPy transcription of the method written here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm_convmixer = pytest.importorskip("timm.models.convmixer")
safetensors_torch = pytest.importorskip("safetensors.torch")

from convmixer_jax import cli  # noqa: E402
from convmixer_jax.files.model_dir import load_model  # noqa: E402
from convmixer_jax.model.convmixer import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from convmixer_jax.model.inference import predict_logits  # noqa: E402

nn = torch.nn
torch.set_num_threads(1)
# PyTorch notes that padding='same' with an even kernel copies the input; the result is what we
# compare
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")


# --------------------------------------------------------------------------- PyTorch models


class Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


def locuslab_convmixer(dim, depth, kernel_size, patch_size, n_classes, channels=3):
    """The paper's reference definition (github.com/locuslab/convmixer), verbatim but for
    in_chans."""
    return nn.Sequential(
        nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size),
        nn.GELU(),
        nn.BatchNorm2d(dim),
        *[
            nn.Sequential(
                Residual(
                    nn.Sequential(
                        nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"),
                        nn.GELU(),
                        nn.BatchNorm2d(dim),
                    )
                ),
                nn.Conv2d(dim, dim, kernel_size=1),
                nn.GELU(),
                nn.BatchNorm2d(dim),
            )
            for _ in range(depth)
        ],
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(dim, n_classes),
    )


def randomized(model, seed):
    """Random weights and random BatchNorm running statistics; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.5 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(m.running_var.shape, generator=g))
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(
                    torch.randn(m.weight.shape, generator=g) / np.sqrt(m.weight[0].numel())
                )
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


def timm_model(dim, depth, kernel_size, patch_size, classes, channels, relu=False, seed=0):
    act = nn.ReLU if relu else nn.GELU
    return randomized(
        timm_convmixer.ConvMixer(
            dim,
            depth,
            kernel_size=kernel_size,
            patch_size=patch_size,
            in_chans=channels,
            num_classes=classes,
            act_layer=act,
        ),
        seed,
    )


def torch_logits(model, images, mean, std):
    """PyTorch eval logits of float images (N, H, W, C) in [0, 1], normalized as timm expects."""
    x = (images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()


def encrypt_independently(images, key_file, m):
    """method.md in NumPy: per M x M block, flatten (row, col, channel), y[k] = x[perm[k]],
    z = 1 - y where flip."""
    key = json.loads(Path(key_file).read_text())
    perm, flip = np.asarray(key["perm"]), np.asarray(key["flip"])
    n, h, w, c = images.shape
    blocks = (
        images.reshape(n, h // m, m, w // m, m, c)
        .transpose(0, 1, 3, 2, 4, 5)
        .reshape(n, h // m, w // m, -1)
    )
    y = blocks[..., perm]
    z = np.where(flip == 1, 1.0 - y, y).astype(images.dtype)
    return z.reshape(n, h // m, w // m, m, m, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)


def assert_logits_close(ours, theirs):
    assert ours.shape == theirs.shape
    err = np.abs(ours - theirs).max()
    assert err <= 1e-4 * np.abs(theirs).max(), (err, np.abs(theirs).max())


def images(n, size, channels, seed=0):
    return np.random.default_rng(seed).random((n, size, size, channels), dtype=np.float32)


def run(*argv):
    return cli.main([str(a) for a in argv])


def fresh_timm(config_like, relu=False):
    return timm_convmixer.ConvMixer(**config_like, act_layer=nn.ReLU if relu else nn.GELU).eval()


# --------------------------------------------------------------------------- round trips


def test_timm_gelu_patch7_rgb_import_encrypt_export(tmp_path, capsys):
    # pb = 7 * 7 * 3 = 147 (odd), even depthwise kernel 4 ('same' padding puts the extra tap after)
    model = timm_model(16, 2, 4, 7, 5, 3, seed=1)
    weights = tmp_path / "w.safetensors"
    safetensors_torch.save_file(model.state_dict(), str(weights))
    x = images(6, 28, 3)
    expected = torch_logits(model, x, IMAGENET_MEAN, IMAGENET_STD)

    assert run("import-torch", weights, "--out", tmp_path / "m", "--image-size", 28) == 0
    config, variables, meta = load_model(tmp_path / "m")
    assert (
        config.dim,
        config.depth,
        config.kernel_size,
        config.patch_size,
        config.num_classes,
    ) == (16, 2, 4, 7, 5)
    assert (
        config.mean == IMAGENET_MEAN and config.std == IMAGENET_STD and config.activation == "gelu"
    )
    assert meta["created_by"] == "import-torch" and meta["source"] == "w.safetensors"
    assert meta["source_layout"] == "timm"
    assert_logits_close(predict_logits(config, variables, x), expected)

    key = tmp_path / "key.json"
    assert run("keygen", "--block-size", 7, "--channels", 3, "--key-seed", 3, "--out", key) == 0
    assert run("encrypt-model", "--key", key, tmp_path / "m", "--out", tmp_path / "e") == 0
    xe = encrypt_independently(x, key, 7)
    config_e, variables_e, _ = load_model(tmp_path / "e")
    assert_logits_close(predict_logits(config_e, variables_e, xe), expected)
    # the same through the command line: predict on the plain and on the encrypted images
    for model_dir, imgs, name in ((tmp_path / "m", x, "x"), (tmp_path / "e", xe, "xe")):
        np.save(tmp_path / f"{name}.npy", np.asarray(imgs, np.float32))
        assert (
            run(
                "predict",
                model_dir,
                tmp_path / f"{name}.npy",
                "--quiet",
                "--out",
                tmp_path / f"{name}-logits.npy",
            )
            == 0
        )
        assert_logits_close(np.load(tmp_path / f"{name}-logits.npy"), expected)

    capsys.readouterr()
    for name, imgs in (("m", x), ("e", xe)):
        out = tmp_path / f"{name}.safetensors"
        assert run("export-torch", tmp_path / name, "--out", out) == 0
        back = fresh_timm(
            dict(dim=16, depth=2, kernel_size=4, patch_size=7, in_chans=3, num_classes=5)
        )
        back.load_state_dict(safetensors_torch.load_file(str(out)), strict=True)
        assert_logits_close(torch_logits(back, imgs, IMAGENET_MEAN, IMAGENET_STD), expected)
    printed = capsys.readouterr().out
    assert "act_layer=torch.nn.GELU" in printed and "0.485" in printed and "encrypted" in printed
    # the encrypted export really differs from the plain one (only the stem)
    plain = safetensors_torch.load_file(str(tmp_path / "m.safetensors"))
    enc = safetensors_torch.load_file(str(tmp_path / "e.safetensors"))
    assert not torch.equal(plain["stem.0.weight"], enc["stem.0.weight"])
    assert torch.equal(plain["blocks.1.1.weight"], enc["blocks.1.1.weight"])
    # existing output refused without --force, replaced with it
    assert run("export-torch", tmp_path / "m", "--out", tmp_path / "m.safetensors") == 1
    assert run("export-torch", tmp_path / "m", "--out", tmp_path / "m.safetensors", "--force") == 0


def test_timm_relu_pth_with_options_and_class_names(tmp_path):
    model = timm_model(16, 2, 3, 2, 4, 1, relu=True, seed=2)
    weights = tmp_path / "w.pth"
    torch.save(model.state_dict(), weights)
    names = tmp_path / "classes.txt"
    names.write_text("ant\nbee\ncat\ndog\n")
    assert (
        run(
            "import-torch",
            weights,
            "--out",
            tmp_path / "m",
            "--activation",
            "relu",
            "--mean",
            0.3,
            "--std",
            0.2,
            "--image-size",
            14,
            "--class-names",
            names,
        )
        == 0
    )
    config, variables, meta = load_model(tmp_path / "m")
    assert config.activation == "relu" and config.mean == (0.3,) and config.image_size == 14
    assert meta["classes"] == ["ant", "bee", "cat", "dog"]
    x = images(5, 14, 1, seed=1)
    expected = torch_logits(model, x, (0.3,), (0.2,))
    assert_logits_close(predict_logits(config, variables, x), expected)

    key = tmp_path / "key.json"
    assert run("keygen", "--block-size", 2, "--channels", 1, "--key-seed", 4, "--out", key) == 0
    assert run("encrypt-model", "--key", key, tmp_path / "m", "--out", tmp_path / "e") == 0
    xe = encrypt_independently(x, key, 2)
    config_e, variables_e, _ = load_model(tmp_path / "e")
    assert_logits_close(predict_logits(config_e, variables_e, xe), expected)
    assert run("export-torch", tmp_path / "e", "--out", tmp_path / "e.safetensors") == 0
    back = fresh_timm(
        dict(dim=16, depth=2, kernel_size=3, patch_size=2, in_chans=1, num_classes=4), relu=True
    )
    back.load_state_dict(safetensors_torch.load_file(str(tmp_path / "e.safetensors")), strict=True)
    assert_logits_close(torch_logits(back, xe, (0.3,), (0.2,)), expected)


def test_locuslab_sequential_and_checkpoint_dict(tmp_path):
    model = randomized(locuslab_convmixer(16, 2, 5, 2, 3), seed=3)
    weights = tmp_path / "ckpt.pth"
    # a training checkpoint, saved from nn.DataParallel (names prefixed 'module.')
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 7, "state_dict": sd}, weights)
    assert run("import-torch", weights, "--out", tmp_path / "m", "--image-size", 8) == 0
    config, variables, meta = load_model(tmp_path / "m")
    assert meta["source_layout"] == "locuslab" and config.mean is None and config.kernel_size == 5
    x = images(4, 8, 3, seed=2)
    assert_logits_close(
        predict_logits(config, variables, x), torch_logits(model, x, (0.5,) * 3, (0.5,) * 3)
    )
    # exported in timm's layout: the same network as a timm ConvMixer
    assert run("export-torch", tmp_path / "m", "--out", tmp_path / "t.safetensors") == 0
    back = fresh_timm(dict(dim=16, depth=2, kernel_size=5, patch_size=2, in_chans=3, num_classes=3))
    back.load_state_dict(safetensors_torch.load_file(str(tmp_path / "t.safetensors")), strict=True)
    assert_logits_close(
        torch_logits(back, x, (0.5,) * 3, (0.5,) * 3),
        torch_logits(model, x, (0.5,) * 3, (0.5,) * 3),
    )


def test_bfloat16_and_float16_weights_read_as_float32(tmp_path):
    from convmixer_jax.files.torch_weights import (
        config_from_state_dict,
        read_state_dict,
        variables_from_state_dict,
    )

    model = timm_model(8, 1, 3, 2, 3, 3)
    for dtype, f in (
        (torch.bfloat16, tmp_path / "b.safetensors"),
        (torch.float16, tmp_path / "h.pth"),
    ):
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
        (
            safetensors_torch.save_file(sd, str(f))
            if f.suffix == ".safetensors"
            else torch.save(sd, f)
        )
        config, layout = config_from_state_dict(read_state_dict(f), image_size=8)
        kernel = variables_from_state_dict(read_state_dict(f), config, layout)["params"]["stem"][
            "kernel"
        ]
        assert kernel.dtype == np.float32 and layout == "timm"
        np.testing.assert_array_equal(
            kernel, sd["stem.0.weight"].float().numpy().transpose(2, 3, 1, 0)
        )


@pytest.mark.parametrize(
    "name", ["convmixer_768_32", "convmixer_1536_20", "convmixer_1024_20_ks9_p14"]
)
def test_presets_are_timms_models(name):
    """Our PRESETS against the installed timm: shapes (on the meta device, no memory),
    activation, normalization."""
    import timm

    from convmixer_jax.files.torch_weights import config_from_state_dict
    from convmixer_jax.model.convmixer import PRESETS

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    sd = {
        k: np.broadcast_to(
            np.zeros((), np.int64 if "num_batches" in k else np.float32), tuple(v.shape)
        )
        for k, v in model.state_dict().items()
    }
    cfg = model.pretrained_cfg
    config, layout = config_from_state_dict(
        sd,
        activation=type(model.stem[1]).__name__.lower(),
        mean=cfg["mean"],
        std=cfg["std"],
        image_size=cfg["input_size"][-1],
    )
    assert layout == "timm" and config == PRESETS[name]


def test_timm_name_fills_what_the_weights_lack(tmp_path, monkeypatch):
    import dataclasses

    from convmixer_jax.model import convmixer

    # a small stand-in for the preset, so that the weights stay tiny
    small = dataclasses.replace(
        convmixer.PRESETS["convmixer_768_32"],
        dim=8,
        depth=1,
        kernel_size=3,
        patch_size=2,
        num_classes=3,
        image_size=6,
    )
    monkeypatch.setitem(convmixer.PRESETS, "convmixer_768_32", small)
    model = timm_model(8, 1, 3, 2, 3, 3, relu=True)
    f = tmp_path / "w.safetensors"
    safetensors_torch.save_file(model.state_dict(), str(f))
    assert run("import-torch", f, "--timm-name", "convmixer_768_32", "--out", tmp_path / "m") == 0
    config, variables, meta = load_model(tmp_path / "m")
    assert config == small and meta["timm_name"] == "convmixer_768_32"
    x = images(3, 6, 3)
    assert_logits_close(
        predict_logits(config, variables, x), torch_logits(model, x, IMAGENET_MEAN, IMAGENET_STD)
    )


# --------------------------------------------------------------------------- refusals


def _refused(capsys, tmp_path, *argv, says=(), status=1):
    capsys.readouterr()
    out = tmp_path / "refused"
    assert run("import-torch", *argv, "--out", out) == status
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("convmixer-jax: error:") and "\x1b" not in err, (
        err
    )
    for s in says:
        assert s in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".refused")]


def test_refuses_what_is_not_a_convmixer(tmp_path, capsys):
    torchvision = pytest.importorskip("torchvision")
    resnet = tmp_path / "resnet.safetensors"
    safetensors_torch.save_file(torchvision.models.resnet18(weights=None).state_dict(), str(resnet))
    _refused(capsys, tmp_path, resnet, says=["conv1.weight"])

    good = timm_model(8, 2, 3, 2, 3, 3).state_dict()
    for name, change in (
        ("blocks.1.1.weight", lambda sd, n: sd.__setitem__(n, torch.zeros(8, 8, 3, 3))),
        ("blocks.0.3.running_var", lambda sd, n: sd.pop(n)),
        ("blocks.0.extra", lambda sd, n: sd.__setitem__(n, torch.zeros(2))),
        ("head.bias", lambda sd, n: sd.__setitem__(n, torch.zeros(4))),
    ):
        sd = dict(good)
        change(sd, name)
        f = tmp_path / f"{name}.safetensors"
        safetensors_torch.save_file(sd, str(f))
        _refused(capsys, tmp_path, f, says=[repr(name)])

    f = tmp_path / "good.safetensors"
    safetensors_torch.save_file(good, str(f))
    _refused(
        capsys, tmp_path, f, "--timm-name", "convmixer_768_32", says=["convmixer_768_32", "dim 8"]
    )
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n")
    _refused(capsys, tmp_path, f, "--class-names", names, says=["2 classes", "3 outputs"])
    _refused(capsys, tmp_path, f, "--mean", 0.5, 0.5, 0.5, says=["--std"], status=2)
    _refused(capsys, tmp_path, f, "--mean", 0.5, "--std", 0.5, says=["3 channels"])
    _refused(capsys, tmp_path, f, "--image-size", 7, says=["multiple of", "patch size 2"], status=2)
    locus = tmp_path / "locus.pth"
    torch.save(randomized(locuslab_convmixer(8, 1, 3, 2, 3), 0).state_dict(), locus)
    _refused(capsys, tmp_path, locus, says=["--image-size"], status=2)


def test_refuses_pickles_and_other_files(tmp_path, capsys):
    whole = tmp_path / "whole.pth"
    torch.save(timm_model(8, 1, 3, 2, 3, 3), whole)  # the module itself: unpickling would run code
    _refused(capsys, tmp_path, whole, says=["weights-only", "state_dict"])
    text = tmp_path / "weights.txt"
    text.write_text("not weights")
    _refused(capsys, tmp_path, text, says=["neither"])
    _refused(capsys, tmp_path, tmp_path / "missing.safetensors", says=["does not exist"])
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    _refused(capsys, tmp_path, broken, says=["safetensors"])
    capsys.readouterr()
    f = tmp_path / "w.safetensors"
    safetensors_torch.save_file(timm_model(8, 1, 3, 2, 3, 3).state_dict(), str(f))
    assert run("import-torch", f, "--out", tmp_path / "m") == 0
    assert run("export-torch", tmp_path / "m", "--out", tmp_path / "w.pth") == 2
    assert not (tmp_path / "w.pth").exists()


def test_library_without_torch_at_import():
    code = (
        "import sys, convmixer_jax.files.torch_weights, convmixer_jax.cli.app; "
        "bad = [m for m in ('torch', 'safetensors', 'timm') if m in sys.modules]; "
        "assert not bad, bad"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
    )
    assert r.returncode == 0, r.stderr


def test_missing_extra_is_one_line(tmp_path, capsys, monkeypatch):
    f = tmp_path / "w.safetensors"
    safetensors_torch.save_file(timm_model(8, 1, 3, 2, 3, 3).state_dict(), str(f))
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)  # import fails as if not installed
    _refused(capsys, tmp_path, f, says=["pip install 'convmixer-jax[torch]'"])
