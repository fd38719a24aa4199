"""PyTorch weights: import a timm or locuslab ConvMixer, export a model as timm safetensors."""

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
    import dataclasses
    from pathlib import Path

    from convmixer_jax.files.atomic import check_output
    from convmixer_jax.files.model_dir import save_model
    from convmixer_jax.files.torch_weights import (
        config_from_state_dict,
        read_state_dict,
        variables_from_state_dict,
    )
    from convmixer_jax.model.config import IMAGENET_MEAN, IMAGENET_STD, PRESETS

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
    preset = PRESETS[args.timm_name] if args.timm_name else None
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
    print(
        f"plain model from {layout} weights (dim {config.dim}, depth {config.depth}, "
        f"kernel {config.kernel_size}, patch {config.patch_size}, "
        f"{config.num_classes} classes, {activation}, mean {_fmt(config.norm_mean)}, "
        f"std {_fmt(config.norm_std)}, {image_size} x {image_size}) -> {args.out}"
    )
    return 0


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


@_extra_needed
def cmd_export_torch(args) -> int:
    from convmixer_jax.files.atomic import check_output, write_bytes_atomic
    from convmixer_jax.files.model_dir import is_encrypted, load_model
    from convmixer_jax.files.torch_weights import safetensors_bytes, state_dict_from_variables

    out = check_output(args.out, args.force, inputs={"MODEL_DIR": args.model})
    if out.suffix.lower() != ".safetensors":
        raise UsageError(f"export-torch: --out {out} must end in .safetensors")
    config, variables, meta = load_model(args.model)
    sd = state_dict_from_variables(config, variables)
    info = {
        "format": "pt",
        "convmixer_jax": "timm ConvMixer",
        "activation": config.activation,
        "mean": ",".join(f"{v!r}" for v in config.norm_mean),
        "std": ",".join(f"{v!r}" for v in config.norm_std),
        "image_size": str(config.image_size),
        "encrypted": str(is_encrypted(meta)).lower(),
    }
    if is_encrypted(meta):
        info["key_fingerprint"] = meta["encryption"]["key_fingerprint"]
    write_bytes_atomic(out, safetensors_bytes(sd, metadata=info), force=args.force)
    act = "torch.nn.ReLU" if config.activation == "relu" else "torch.nn.GELU"
    print(f"timm ConvMixer weights -> {out}")
    print(
        f"use: timm.models.convmixer.ConvMixer(dim={config.dim}, depth={config.depth}, "
        f"kernel_size={config.kernel_size}, patch_size={config.patch_size}, "
        f"in_chans={config.channels}, num_classes={config.num_classes}, "
        f"act_layer={act}) on {config.image_size} x {config.image_size} inputs "
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
        "make a model directory from PyTorch ConvMixer weights",
        "Read a timm (timm.models.convmixer.ConvMixer) or locuslab (the paper's nn.Sequential) "
        "ConvMixer state dict, from .safetensors or a PyTorch file loaded weights-only, and "
        "write a plain model directory. The architecture comes from the tensor shapes; what the "
        "weights do not hold is given: --timm-name fills it for timm's ImageNet models (and "
        "checks the shapes are that model's); otherwise the activation defaults to gelu, the "
        "normalization to ImageNet's mean/std for the timm layout on RGB and 0.5/0.5 otherwise "
        "(the locuslab reference's), and the image size to 224 for the timm layout (locuslab "
        "weights need --image-size). Needs the torch extra: pip install 'convmixer-jax[torch]'.",
    )
    p.add_argument(
        "weights", metavar="WEIGHTS", help="state dict: .safetensors, or .pth/.pt/.bin/.ckpt"
    )
    add_out(p, "MODEL_DIR", "model directory to write")
    p.add_argument(
        "--timm-name",
        choices=TIMM_NAMES,
        help="the timm model the weights are: sets activation, mean/std and image size",
    )
    p.add_argument(
        "--layout", choices=["timm", "locuslab"], help="the state dict's names (default: detected)"
    )
    p.add_argument(
        "--activation",
        choices=list(ACTIVATIONS),
        help="the activation the weights were trained with (default gelu, or --timm-name's)",
    )
    p.add_argument("--mean", **_floats("mean"), help="input normalization mean, one per channel")
    p.add_argument("--std", **_floats("std"), help="input normalization std, one per channel")
    p.add_argument(
        "--image-size",
        type=positive_int,
        metavar="N",
        help="input height = width, a multiple of the patch size (default 224 for the timm layout)",
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
        "write a model's weights as a timm ConvMixer state dict",
        "Write the model's weights as timm's ConvMixer state dict in .safetensors "
        "(load_state_dict(strict=True) accepts it). An encrypted model exports its "
        "encrypted weights, which is how a provider deploys it: the PyTorch model "
        "then expects images encrypted with the key. The file holds weights only: "
        "the command prints the activation and input normalization the PyTorch "
        "side must use (also stored in the file's metadata). Needs the torch extra.",
    )
    p.add_argument("model", metavar="MODEL_DIR", help="model directory (plain or encrypted)")
    add_out(p, "WEIGHTS.safetensors", "safetensors file to write")
    add_force(p)
