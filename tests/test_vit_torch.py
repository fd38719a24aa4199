"""timm's VisionTransformer in and out: import-torch, export-torch, and an encrypted ViT.

Every check compares against timm itself (``VisionTransformer`` in eval mode, random weights
including LayerNorm scales, class token and position embedding); the encrypted images come
from an independent NumPy transcription of docs/method.md written here (a loop over blocks:
pixel key inside each block, block key across positions).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from convmixer_jax import cli  # noqa: E402
from convmixer_jax.files.model_dir import load_model  # noqa: E402
from convmixer_jax.model.config import IMAGENET_MEAN, IMAGENET_STD, PRESETS  # noqa: E402
from convmixer_jax.model.inference import predict_logits  # noqa: E402

torch.set_num_threads(1)
HALF = (0.5, 0.5, 0.5)


def randomized(model, seed=0):
    """Every parameter random (LayerNorm scales around 1, biases, class token and position
    embedding of the same order as the activations); eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * r)
            elif p.ndim >= 2 and name not in ("cls_token", "pos_embed"):
                p.copy_(r / np.sqrt(p[0].numel()))
            else:
                p.copy_(0.3 * r)
    return model.eval()


def tiny_vit(seed=0, **kw):
    args = dict(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=5)
    return randomized(VisionTransformer(**{**args, **kw}), seed)


def timm_logits(model, images, mean, std):
    """timm eval logits of float images (N, H, W, C) in [0, 1], normalized as timm expects."""
    x = (images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()


def assert_logits_close(ours, theirs):
    assert ours.shape == theirs.shape
    err = np.abs(ours - theirs).max()
    assert err <= 1e-4 * np.abs(theirs).max(), (err, np.abs(theirs).max())


def images(n, size, channels, seed=0):
    return np.random.default_rng(seed).random((n, size, size, channels), dtype=np.float32)


def run(*argv):
    return cli.main([str(a) for a in argv])


def printed_timm_model(printed: str):
    """The model export-torch says to build, built by evaluating its printed call."""
    call = re.search(r"^use: (.+?) on \d+ x \d+ inputs", printed, re.M).group(1)
    return eval(call, {"timm": timm, "functools": functools}).eval()  # noqa: S307


def exported_into_timm(tmp_path, model_dir, capsys, name="out.safetensors"):
    """export-torch MODEL_DIR, then the printed timm call loading it with strict=True."""
    capsys.readouterr()
    out = tmp_path / name
    assert run("export-torch", model_dir, "--out", out) == 0
    model = printed_timm_model(capsys.readouterr().out)
    sd = safetensors_torch.load_file(str(out))
    model.load_state_dict(sd, strict=True)
    return model, sd


# --------------------------------------------------------------------------- round trips

VARIANTS = {
    # class token, head on it (norm), qkv bias, MLP ratio 4; safetensors; 0.5/0.5 by default
    "token": dict(
        timm=dict(depth=2),
        file="w.safetensors",
        options=("--num-heads", 2),
        norm=(HALF, HALF),
        expect=dict(class_token=True, global_pool="token", qkv_bias=True, mlp_ratio=4.0),
    ),
    # no class token, mean of the patch tokens (fc_norm), no qkv bias, one channel, patch 3,
    # MLP ratio 2; a DeiT-style training checkpoint {'model': ...} in .pth
    "avg": dict(
        timm=dict(
            img_size=12,
            patch_size=3,
            in_chans=1,
            class_token=False,
            global_pool="avg",
            qkv_bias=False,
            mlp_ratio=2.0,
        ),
        file="ckpt.pth",
        options=("--num-heads", 2, "--mean", 0.3, "--std", 0.2),
        norm=((0.3,), (0.2,)),
        expect=dict(class_token=False, global_pool="avg", qkv_bias=False, mlp_ratio=2.0),
    ),
    # class token without a position row (no_embed_class), mean pooling, 4 heads, ratio 3
    "no_embed_class": dict(
        timm=dict(num_heads=4, global_pool="avg", no_embed_class=True, mlp_ratio=3.0),
        file="w.safetensors",
        options=("--num-heads", 4, "--mean", *IMAGENET_MEAN, "--std", *IMAGENET_STD),
        norm=(IMAGENET_MEAN, IMAGENET_STD),
        expect=dict(class_token=True, global_pool="avg", no_embed_class=True, num_heads=4),
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_gives_timms_logits_and_export_loads_strictly(variant, tmp_path, capsys):
    v = VARIANTS[variant]
    model = tiny_vit(seed=len(variant), **v["timm"])
    original = model.state_dict()
    weights = tmp_path / v["file"]
    if weights.suffix == ".pth":
        torch.save({"model": original, "epoch": 3}, weights)
    else:
        safetensors_torch.save_file(original, str(weights))
    size, channels = model.patch_embed.img_size[0], model.patch_embed.proj.in_channels
    x = images(4, size, channels)
    expected = timm_logits(model, x, *v["norm"])

    assert run("import-torch", weights, "--out", tmp_path / "m", *v["options"]) == 0
    config, variables, meta = load_model(tmp_path / "m")
    assert config.family == "vit" and meta["created_by"] == "import-torch"
    assert (config.image_size, config.channels, config.num_classes) == (size, channels, 5)
    assert (config.norm_mean, config.norm_std) == tuple(map(tuple, v["norm"]))
    for field, value in v["expect"].items():
        assert getattr(config, field) == value, field
    assert_logits_close(predict_logits(config, variables, x), expected)

    # export: the printed timm call builds the network, the weights load strictly and are
    # bit for bit the ones imported
    back, sd = exported_into_timm(tmp_path, tmp_path / "m", capsys)
    assert set(sd) == set(original)
    for name, tensor in original.items():
        assert torch.equal(sd[name], tensor), name
    assert_logits_close(timm_logits(back, x, *v["norm"]), expected)


def test_vit_presets_are_timms_models():
    """Our ViT/DeiT presets against the installed timm: shapes (on the meta device), head
    count, normalization; and export-torch's call for them is timm.create_model(name)."""
    from convmixer_jax.files.torch_weights import (
        timm_vit_call,
        vit_config_from_state_dict,
        vit_expected_shapes,
    )

    names = [n for n, c in PRESETS.items() if c.family == "vit" and n.startswith(("vit_", "deit"))]
    assert {"vit_tiny_patch16_224", "deit_small_patch16_224"} <= set(names)
    for name in names:
        if name == "vit_cifar":
            continue
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        sd = {
            k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in model.state_dict().items()
        }
        cfg = model.pretrained_cfg
        config = vit_config_from_state_dict(
            sd, num_heads=model.blocks[0].attn.num_heads, mean=cfg["mean"], std=cfg["std"]
        )
        preset = PRESETS[name]
        assert config.image_size == cfg["input_size"][-1]
        assert (config.norm_mean, config.norm_std) == (preset.norm_mean, preset.norm_std)
        assert dataclasses.replace(config, mean=preset.mean, std=preset.std) == preset, name
        call = timm_vit_call(preset)
        assert call == (
            f"timm.create_model({name!r}, pretrained=False, num_classes=1000, img_size=224)"
        )
        assert vit_expected_shapes(preset) == {k: tuple(v.shape) for k, v in sd.items()}
    # the name a model was imported by wins among the presets of the same architecture
    vit_tiny = PRESETS["vit_tiny_patch16_224"]
    assert "'vit_tiny_patch16_224'" in timm_vit_call(vit_tiny)
    assert "'deit_tiny_patch16_224'" in timm_vit_call(vit_tiny, prefer="deit_tiny_patch16_224")
    assert "'deit_tiny_patch16_224'" not in timm_vit_call(vit_tiny, prefer="deit_small_patch16_224")


def test_deit_tiny_by_its_timm_name(tmp_path, capsys):
    """A real preset: deit_tiny_patch16_224's weights (random) imported by the timm name
    alone: the head count and ImageNet normalization come from the name. (Its logits are not
    compared here, to keep the test fast: the tiny round trips above compare logits.)"""
    from convmixer_jax.files.model_dir import load_model_meta

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    weights = tmp_path / "deit.safetensors"
    safetensors_torch.save_file(model.state_dict(), str(weights))
    out = tmp_path / "m"
    capsys.readouterr()
    assert run("import-torch", weights, "--timm-name", "deit_tiny_patch16_224", "--out", out) == 0
    assert "3 heads" in capsys.readouterr().out
    config, meta = load_model_meta(out)
    assert config == PRESETS["deit_tiny_patch16_224"] and config.norm_mean == IMAGENET_MEAN
    assert meta["timm_name"] == "deit_tiny_patch16_224"


# --------------------------------------------------------------------------- refusals


def refused(capsys, tmp_path, weights, *argv, says=(), status=1):
    capsys.readouterr()
    out = tmp_path / "refused"
    assert run("import-torch", weights, *argv, "--out", out) == status
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("convmixer-jax: error:"), err
    for s in says:
        assert s in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".refused")]


def saved(tmp_path, name, sd):
    f = tmp_path / f"{name}.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(f))
    return f


def test_refuses_variants_this_vit_does_not_implement(tmp_path, capsys):
    from timm.models.deit import VisionTransformerDistilled

    tiny = dict(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=5)
    for name, model, tensor, reason in (
        ("distilled", VisionTransformerDistilled(**tiny), "dist_token", "distill"),
        ("registers", VisionTransformer(**tiny, reg_tokens=2), "reg_token", "register"),
        ("layerscale", VisionTransformer(**tiny, init_values=1e-5), "blocks.0.ls1.gamma", "Scale"),
        ("qknorm", VisionTransformer(**tiny, qk_norm=True), "blocks.0.attn.k_norm.bias", "qk-norm"),
        ("prenorm", VisionTransformer(**tiny, pre_norm=True), "norm_pre.bias", "pre_norm"),
        (
            "norm-before-avg",
            VisionTransformer(**tiny, class_token=False, global_pool="avg", fc_norm=False),
            "norm.weight",
            "fc_norm",
        ),
    ):
        f = saved(tmp_path, name, model.state_dict())
        refused(capsys, tmp_path, f, "--num-heads", 2, says=[repr(tensor), reason])


def test_refuses_what_does_not_fit(tmp_path, capsys):
    good = tiny_vit().state_dict()
    f = saved(tmp_path, "good", good)
    refused(capsys, tmp_path, f, says=["--num-heads", "--timm-name", "head count"], status=2)
    refused(capsys, tmp_path, f, "--num-heads", 3, says=["num_heads 3", "dim 16"])
    refused(
        capsys,
        tmp_path,
        f,
        "--num-heads",
        2,
        "--image-size",
        32,
        says=["--image-size 32", "4 x 4 grid", "16 x 16"],
        status=2,
    )
    refused(
        capsys, tmp_path, f, "--timm-name", "deit_tiny_patch16_224", says=["deit_tiny", "dim 16"]
    )
    refused(capsys, tmp_path, f, "--timm-name", "convmixer_768_32", says=["ConvMixer", "ViT"])
    refused(capsys, tmp_path, f, "--num-heads", 2, "--activation", "relu", says=["GELU"], status=2)
    refused(
        capsys, tmp_path, f, "--num-heads", 2, "--layout", "locuslab", says=["locuslab"], status=2
    )
    refused(capsys, tmp_path, f, "--num-heads", 2, "--mean", 0.5, "--std", 0.5, says=["3 channels"])
    for name, change in (
        ("blocks.0.attn.proj.bias", lambda sd, n: sd.pop(n)),
        ("head.bias", lambda sd, n: sd.__setitem__(n, torch.zeros(4))),
        ("blocks.0.extra", lambda sd, n: sd.__setitem__(n, torch.zeros(2))),
        ("head.weight", lambda sd, n: sd.pop(n)),
    ):
        sd = dict(good)
        change(sd, name)
        refused(capsys, tmp_path, saved(tmp_path, name, sd), "--num-heads", 2, says=[repr(name)])
    sd = dict(good, pos_embed=torch.zeros(1, 12, 16))
    refused(capsys, tmp_path, saved(tmp_path, "pos", sd), "--num-heads", 2, says=["'pos_embed'"])
    # ConvMixer weights are read as before, and refuse the ViT-only option
    convmixer = timm.models.convmixer.ConvMixer(8, 1, kernel_size=3, patch_size=2, num_classes=3)
    f = saved(tmp_path, "convmixer", convmixer.state_dict())
    refused(capsys, tmp_path, f, "--num-heads", 2, says=["--num-heads", "ConvMixer"], status=2)
    refused(capsys, tmp_path, f, "--timm-name", "vit_tiny_patch16_224", says=["ConvMixer", "ViT"])


# --------------------------------------------------------------------------- encrypted ViT


def encrypt_independently(images, key_file):
    """method.md in NumPy, block by block: the block at position b = r*gw + s of the
    encrypted image is the plain block at position block_perm[b], flattened (row, col,
    channel), shuffled y[k] = x[perm[k]], flipped z = 1 - y where flip, put back."""
    key = json.loads(Path(key_file).read_text())
    m = key["block_size"]
    perm, flip = np.asarray(key["perm"]), np.asarray(key["flip"])
    block_perm = np.asarray(key["block_perm"])
    n, h, w, c = images.shape
    gh, gw = h // m, w // m
    assert [gh, gw] == list(key["grid"])
    out = np.empty_like(images)
    for b in range(gh * gw):
        r, s = divmod(b, gw)
        src_r, src_s = divmod(int(block_perm[b]), gw)
        block = images[:, src_r * m : (src_r + 1) * m, src_s * m : (src_s + 1) * m, :]
        x = block.reshape(n, m * m * c)
        y = x[:, perm]
        z = np.where(flip == 1, 1.0 - y, y)
        out[:, r * m : (r + 1) * m, s * m : (s + 1) * m, :] = z.reshape(n, m, m, c)
    return out


def test_encrypted_vit_224_gives_plain_logits_in_jax_and_in_timm(tmp_path, capsys):
    """The acceptance check: a timm ViT (224 x 224 RGB, 16 x 16 patches) with random weights,
    exported to safetensors, imported, encrypted with a block-scrambling key, gives timm's
    plain logits on images encrypted independently, here and, exported, in timm."""
    model = tiny_vit(seed=7, img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=2)
    weights = tmp_path / "vit.safetensors"
    safetensors_torch.save_file(model.state_dict(), str(weights))
    x = images(3, 224, 3, seed=4)
    expected = timm_logits(model, x, HALF, HALF)

    assert run("import-torch", weights, "--num-heads", 2, "--out", tmp_path / "m") == 0
    key = tmp_path / "key.json"
    keygen = ("keygen", "--block-size", 16, "--channels", 3, "--key-seed", 11)
    assert run(*keygen, "--block-scrambling", "--image-size", 224, "--out", key) == 0
    assert run("encrypt-model", "--key", key, tmp_path / "m", "--out", tmp_path / "e") == 0
    xe = encrypt_independently(x, key)
    assert len(set(json.loads(key.read_text())["block_perm"][:20])) == 20

    config_e, variables_e, meta = load_model(tmp_path / "e")
    assert meta["encryption"]["key_fingerprint"]
    assert_logits_close(predict_logits(config_e, variables_e, xe), expected)
    # the block key matters: without block scrambling the same images give other logits
    config, variables, _ = load_model(tmp_path / "m")
    assert np.abs(predict_logits(config, variables, xe) - expected).max() > 1e-2

    back, sd = exported_into_timm(tmp_path, tmp_path / "e", capsys, "e.safetensors")
    assert_logits_close(timm_logits(back, xe, HALF, HALF), expected)
    plain = model.state_dict()
    assert not torch.equal(sd["patch_embed.proj.weight"], plain["patch_embed.proj.weight"])
    assert not torch.equal(sd["pos_embed"], plain["pos_embed"])
    assert torch.equal(sd["pos_embed"][:, 0], plain["pos_embed"][:, 0])  # the class token's row
    assert torch.equal(sd["blocks.0.attn.qkv.weight"], plain["blocks.0.attn.qkv.weight"])
    with safetensors_torch.safe_open(str(tmp_path / "e.safetensors"), "pt") as f:
        info = f.metadata()
    assert (
        info["encrypted"] == "true"
        and info["key_fingerprint"] == meta["encryption"]["key_fingerprint"]
    )
    assert "perm" not in json.dumps(info)
