"""PyTorch weights: import a timm or locuslab ConvMixer or a timm ViT/DeiT, export a model as
timm safetensors."""

from __future__ import annotations

from convmixer_jax.cli.options import (
    UsageError,
    add_force,
    add_out,
    positive_float,
    positive_int,
)
from convmixer_jax.model.config import ACTIVATIONS, TIMM_NAMES

_ARCH = ("dim", "depth", "kernel_size", "patch_size", "channels")


def _extra_needed(cmd):
    """Report a missing torch extra as one line (exit 1) like any other bad input."""
    import functools

    @functools.wraps(cmd)
    def run(args) -> int:
        try:
            return cmd(args)
        except ImportError as e:
            raise ValueError(str(e)) from None

    return run


def _read_class_names(path: str, classes: int) -> list[str]:
    from pathlib import Path

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the class names file {path}: {e}") from None
    names = [line.strip() for line in lines if line.strip()]
    if len(names) != classes:
        raise ValueError(
            f"{path} names {len(names)} classes but the weights have {classes} outputs; "
            "give one class name per line, in the order of the outputs"
        )
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"{path} names the class {dup!r} twice; class names must be distinct")
    return names


@_extra_needed
def cmd_import_torch(args) -> int:
    from convmixer_jax.files.atomic import check_output
    from convmixer_jax.files.torch_weights import detect_family, read_state_dict

    if (args.mean is None) != (args.std is None):
        raise UsageError(
            "import-torch: give --mean and --std together (one value per channel each)"
        )
    check_output(
        args.out,
        args.force,
        kind="model_dir",
        inputs={"WEIGHTS": args.weights, "--class-names": args.class_names},
    )
    sd = read_state_dict(args.weights)
    if detect_family(sd) == "vit":
        return _import_vit(args, sd)
    return _import_convmixer(args, sd)


def _timm_preset(args, family: str):
    """--timm-name's architecture, refused when it is a model of the other family."""
    from convmixer_jax.model.config import PRESETS

    if not args.timm_name:
        return None
    preset = PRESETS[args.timm_name]
    if preset.family != family:
        kinds = {"vit": "a timm VisionTransformer (ViT/DeiT)", "convmixer": "a ConvMixer"}
        raise ValueError(
            f"the weights are {kinds[family]} but --timm-name {args.timm_name} is "
            f"{kinds[preset.family]}; give the timm name of the weights' model"
        )
    return preset


def _import_convmixer(args, sd) -> int:
    import dataclasses

    from convmixer_jax.files.torch_weights import (
        config_from_state_dict,
        variables_from_state_dict,
    )
    from convmixer_jax.model.config import IMAGENET_MEAN, IMAGENET_STD

    if args.num_heads is not None:
        raise UsageError(
            "import-torch: --num-heads is for ViT weights; these are a ConvMixer's, drop it"
        )
    preset = _timm_preset(args, "convmixer")
    # First the shapes alone (normalization and image size do not affect them) ...
    config, layout = config_from_state_dict(
        sd, activation="gelu", image_size=None, layout=args.layout
    )
    if preset is not None:
        diff = [
            f"{n} {getattr(config, n)} (timm: {getattr(preset, n)})"
            for n in _ARCH
            if getattr(config, n) != getattr(preset, n)
        ]
        if diff:
            raise ValueError(
                f"the weights are not timm's {args.timm_name}: {', '.join(diff)}; "
                "drop --timm-name and give --activation, --mean/--std and --image-size"
            )
    # ... then the settings the weights do not hold: options, else --timm-name, else the
    # layout's default.
    activation = args.activation or (preset.activation if preset else "gelu")
    if args.mean is not None:
        mean, std = tuple(args.mean), tuple(args.std)
    elif preset is not None:
        mean, std = preset.mean, preset.std
    elif layout == "timm" and config.channels == 3:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = None, None  # 0.5 / 0.5, the locuslab reference's
    image_size = args.image_size or (preset.image_size if preset else None)
    if image_size is None:
        if layout != "timm":
            raise UsageError(
                "import-torch: the locuslab layout does not say the image size it was trained "
                "at (32 for CIFAR, 224 for ImageNet); give --image-size"
            )
        image_size = 224
    if image_size % config.patch_size:
        raise UsageError(
            f"import-torch: --image-size {image_size} is not a multiple of the weights' patch "
            f"size {config.patch_size}"
        )
    try:
        config = dataclasses.replace(
            config, activation=activation, mean=mean, std=std, image_size=image_size
        )
    except ValueError as e:
        raise ValueError(
            f"the options do not fit the weights ({config.channels} channels): {e}"
        ) from None
    variables = variables_from_state_dict(sd, config, layout)
    _save_imported(args, config, variables, layout)
    print(
        f"plain model from {layout} weights (dim {config.dim}, depth {config.depth}, "
        f"kernel {config.kernel_size}, patch {config.patch_size}, "
        f"{config.num_classes} classes, {activation}, mean {_fmt(config.norm_mean)}, "
        f"std {_fmt(config.norm_std)}, {image_size} x {image_size}) -> {args.out}"
    )
    return 0


def _import_vit(args, sd) -> int:
    from convmixer_jax.files.torch_weights import (
        vit_architecture,
        vit_config_from_state_dict,
        vit_variables_from_state_dict,
    )

    if args.layout == "locuslab":
        raise UsageError(
            "import-torch: the weights are a timm VisionTransformer, not the locuslab "
            "ConvMixer layout; drop --layout"
        )
    if args.activation not in (None, "gelu"):
        raise UsageError(
            f"import-torch: a ViT's MLP uses GELU; --activation {args.activation} applies to "
            "ConvMixer weights only, drop it"
        )
    preset = _timm_preset(args, "vit")
    num_heads = args.num_heads or (preset.num_heads if preset else None)
    if num_heads is None:
        raise UsageError(
            "import-torch: the weights are a timm ViT, whose head count no tensor shape "
            "shows; give --num-heads N or --timm-name NAME"
        )
    arch = vit_architecture(sd)
    if preset is not None:
        diff = [
            f"{n} {value} ({getattr(preset, n)})"
            for n, value in arch.items()
            if n != "num_classes" and value != getattr(preset, n)
        ]
        if num_heads != preset.num_heads:
            diff.append(f"num_heads {num_heads} ({preset.num_heads})")
        if diff:
            raise ValueError(
                f"the weights are not timm's {args.timm_name}: {', '.join(diff)} (timm's in "
                "parentheses); drop --timm-name and give --num-heads and --mean/--std"
            )
    if args.image_size is not None and args.image_size != arch["image_size"]:
        side, p = arch["image_size"], arch["patch_size"]
        raise UsageError(
            f"import-torch: the weights' position embedding is a {side // p} x {side // p} "
            f"grid of {p} px patches, for {side} x {side} images; --image-size "
            f"{args.image_size} does not match (resizing the position embedding is not "
            "supported), drop it"
        )
    if args.mean is not None:
        mean, std = tuple(args.mean), tuple(args.std)
    elif preset is not None:
        mean, std = preset.mean, preset.std
    else:
        mean, std = None, None  # 0.5 / 0.5, timm's default for its ViTs
    config = vit_config_from_state_dict(sd, num_heads=num_heads, mean=mean, std=std)
    variables = vit_variables_from_state_dict(sd, config)
    _save_imported(args, config, variables, "timm")
    pool = "class token" if config.global_pool == "token" else "mean of the patch tokens"
    print(
        f"plain ViT from timm weights (dim {config.dim}, depth {config.depth}, "
        f"{config.num_heads} heads, MLP ratio {config.mlp_ratio:g}, patch {config.patch_size}, "
        f"{config.num_classes} classes, head on the {pool}, mean {_fmt(config.norm_mean)}, "
        f"std {_fmt(config.norm_std)}, {config.image_size} x {config.image_size}) -> {args.out}"
    )
    return 0


def _save_imported(args, config, variables, layout: str) -> None:
    from pathlib import Path

    from convmixer_jax.files.model_dir import save_model

    extra = {
        "created_by": "import-torch",
        "source": Path(args.weights).name,
        "source_layout": layout,
    }
    if args.timm_name:
        extra["timm_name"] = args.timm_name
    if args.class_names:
        extra["classes"] = _read_class_names(args.class_names, config.num_classes)
    save_model(args.out, config, variables, force=args.force, extra=extra)


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


@_extra_needed
def cmd_export_torch(args) -> int:
    from convmixer_jax.files.atomic import check_output, write_bytes_atomic
    from convmixer_jax.files.model_dir import is_encrypted, load_model
    from convmixer_jax.files.torch_weights import (
        any_state_dict_from_variables,
        safetensors_bytes,
        timm_vit_call,
    )

    out = check_output(args.out, args.force, inputs={"MODEL_DIR": args.model})
    if out.suffix.lower() != ".safetensors":
        raise UsageError(f"export-torch: --out {out} must end in .safetensors")
    config, variables, meta = load_model(args.model)
    sd = any_state_dict_from_variables(config, variables)
    info = {
        "format": "pt",
        "mean": ",".join(f"{v!r}" for v in config.norm_mean),
        "std": ",".join(f"{v!r}" for v in config.norm_std),
        "image_size": str(config.image_size),
        "encrypted": str(is_encrypted(meta)).lower(),
    }
    if config.family == "vit":
        what = "timm VisionTransformer"
        call = timm_vit_call(config, prefer=meta.get("timm_name"))
        info.update({"convmixer_jax": what, "timm_call": call})
    else:
        what = "timm ConvMixer"
        act = "torch.nn.ReLU" if config.activation == "relu" else "torch.nn.GELU"
        call = (
            f"timm.models.convmixer.ConvMixer(dim={config.dim}, depth={config.depth}, "
            f"kernel_size={config.kernel_size}, patch_size={config.patch_size}, "
            f"in_chans={config.channels}, num_classes={config.num_classes}, act_layer={act})"
        )
        info.update({"convmixer_jax": what, "activation": config.activation})
    if is_encrypted(meta):
        info["key_fingerprint"] = meta["encryption"]["key_fingerprint"]
    write_bytes_atomic(out, safetensors_bytes(sd, metadata=info), force=args.force)
    print(f"{what} weights -> {out}")
    print(
        f"use: {call} on {config.image_size} x {config.image_size} inputs "
        f"normalized with mean {_fmt(config.norm_mean)}, std {_fmt(config.norm_std)}"
        + (
            "; the weights are encrypted (key fingerprint "
            f"{meta['encryption']['key_fingerprint']}): feed images encrypted with that key"
            if is_encrypted(meta)
            else ""
        )
    )
    return 0


def _floats(n: str):
    return dict(nargs="+", type=positive_float if n == "std" else float, metavar=n[0].upper())


def register(add) -> None:
    """Add this group's subcommands with ``add(name, func, help, description)``."""
    p = add(
        "import-torch",
        cmd_import_torch,
        "make a model directory from PyTorch ConvMixer or ViT weights",
        "Read a timm (timm.models.convmixer.ConvMixer) or locuslab (the paper's nn.Sequential) "
        "ConvMixer state dict, or a timm VisionTransformer (ViT, DeiT) state dict, from "
        ".safetensors or a PyTorch file loaded weights-only, and write a plain model directory; "
        "the family is told by the tensor names. The architecture comes from the tensor shapes; "
        "what the weights do not hold is given: --timm-name fills it for timm's ImageNet models "
        "(and checks the shapes are that model's). ConvMixer: otherwise the activation defaults "
        "to gelu, the normalization to ImageNet's mean/std for the timm layout on RGB and "
        "0.5/0.5 otherwise (the locuslab reference's), and the image size to 224 for the timm "
        "layout (locuslab weights need --image-size). ViT: the image size is the position "
        "embedding's grid times the patch size; the head count is in no shape and needs "
        "--num-heads or --timm-name; the normalization defaults to 0.5/0.5 (timm's vit_* "
        "models; its deit_* use ImageNet's). Distilled DeiTs, register tokens, LayerScale, "
        "qk-norm and other ViT variants are refused, naming the tensor. Needs the torch extra: "
        "pip install 'convmixer-jax[torch]'.",
    )
    p.add_argument(
        "weights", metavar="WEIGHTS", help="state dict: .safetensors, or .pth/.pt/.bin/.ckpt"
    )
    add_out(p, "MODEL_DIR", "model directory to write")
    p.add_argument(
        "--timm-name",
        choices=TIMM_NAMES,
        help="the timm model the weights are: sets activation (ConvMixer), head count (ViT), "
        "mean/std and image size",
    )
    p.add_argument(
        "--layout",
        choices=["timm", "locuslab"],
        help="ConvMixer: the state dict's names (default: detected)",
    )
    p.add_argument(
        "--activation",
        choices=list(ACTIVATIONS),
        help="ConvMixer: the activation the weights were trained with (default gelu, or "
        "--timm-name's)",
    )
    p.add_argument(
        "--num-heads",
        type=positive_int,
        metavar="N",
        help="ViT: attention heads (no shape shows them; or --timm-name's)",
    )
    p.add_argument("--mean", **_floats("mean"), help="input normalization mean, one per channel")
    p.add_argument("--std", **_floats("std"), help="input normalization std, one per channel")
    p.add_argument(
        "--image-size",
        type=positive_int,
        metavar="N",
        help="input height = width, a multiple of the patch size (ConvMixer: default 224 for "
        "the timm layout; ViT: fixed by the position embedding, checked if given)",
    )
    p.add_argument(
        "--class-names",
        metavar="FILE.txt",
        help="class names, one per line in output order (recorded as the model's classes)",
    )
    add_force(p)

    p = add(
        "export-torch",
        cmd_export_torch,
        "write a model's weights as a timm ConvMixer or VisionTransformer state dict",
        "Write the model's weights as timm's ConvMixer or VisionTransformer state dict in "
        ".safetensors (load_state_dict(strict=True) accepts it). An encrypted model exports its "
        "encrypted weights, which is how a provider deploys it: the PyTorch model "
        "then expects images encrypted with the key. The file holds weights only: "
        "the command prints the timm call that builds the network and the input "
        "normalization the PyTorch side must use (also stored in the file's metadata). "
        "Needs the torch extra.",
    )
    p.add_argument("model", metavar="MODEL_DIR", help="model directory (plain or encrypted)")
    add_out(p, "WEIGHTS.safetensors", "safetensors file to write")
    add_force(p)
