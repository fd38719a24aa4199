"""PyTorch weights in and out: timm's and the locuslab reference's ConvMixers, timm's ViTs.

Two PyTorch layouts of the ConvMixer are read (names of ``model.state_dict()``):

- ``timm`` (``timm.models.convmixer.ConvMixer``): ``stem.0`` Conv2d (dim, C, P, P),
  ``stem.2`` BatchNorm2d, ``blocks.{i}.0.fn.0`` depthwise Conv2d (dim, 1, k, k),
  ``blocks.{i}.0.fn.2`` BatchNorm2d, ``blocks.{i}.1`` 1x1 Conv2d (dim, dim, 1, 1),
  ``blocks.{i}.3`` BatchNorm2d, ``head`` Linear (classes, dim).
- ``locuslab`` (the paper's ``nn.Sequential``): ``0`` stem Conv2d, ``2`` BatchNorm2d,
  ``{3+i}.0.fn.0`` / ``{3+i}.0.fn.2`` / ``{3+i}.1`` / ``{3+i}.3`` as timm's block i, and
  the Linear head at index ``3 + depth + 2``.

A BatchNorm2d holds ``weight``, ``bias``, ``running_mean``, ``running_var`` (and
``num_batches_tracked``, a scalar, or of shape (1,) as PyTorch also loads it; ignored on
import). PyTorch convolution weights are
(out, in, kh, kw) and are cross-correlations like ours, so every kernel maps to
our HWIO layout (docs/design.md, "Parameter layout") by ``transpose(2, 3, 1, 0)``
and the head by a transpose; both layouts pad the depthwise convolution 'same'
(for even k, PyTorch and lax both put the extra row and column after).
A ``module.`` prefix (``nn.DataParallel``) is removed.

Written weights are always timm's layout, with ``num_batches_tracked`` zeros so
that ``load_state_dict(strict=True)`` accepts them. The weights carry neither the
activation nor the input normalization, which the caller states.

timm's ``VisionTransformer`` (ViT and DeiT; ``timm/models/vision_transformer.py``) is read
and written too: ``cls_token`` (1, 1, d), ``pos_embed`` (1, T, d), ``patch_embed.proj``
Conv2d (d, C, P, P), ``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``
(Linear weights (out, in); ``attn.qkv`` has outputs ordered (3, heads, head_dim) as ours),
``norm`` (head on the class token) or ``fc_norm`` (head on the mean of the patch tokens),
``head``. The architecture comes from the shapes but for the head count, which no shape
shows and the caller gives. What this ViT does not implement (a distilled DeiT's
``dist_token``/``head_dist``, register tokens, LayerScale, qk-norm, a norm before the
blocks, attention pooling, ...) is refused with a reason naming the tensor.
:func:`detect_family` tells the two families apart by their names.

PyTorch and safetensors are optional (``pip install 'convmixer-jax[torch]'``) and
imported inside the functions that need them; files are never unpickled beyond
PyTorch's ``weights_only`` loader.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from convmixer_jax.model.config import ConvMixerConfig, ViTConfig

LAYOUTS = ("timm", "locuslab")
INSTALL_HINT = "pip install 'convmixer-jax[torch]'"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_BN_STATS = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}
_UNWRAP = ("state_dict", "model", "model_state_dict")

StateDict = dict[str, np.ndarray]


class NotAConvMixer(ValueError):
    """A state dict that is not a ConvMixer of a known layout (names the first tensor that
    does not fit)."""


# --------------------------------------------------------------------------- reading files


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"reading and writing PyTorch weights needs {module.split('.')[0]}; "
            f"install it with {INSTALL_HINT}"
        ) from None


def _is_safetensors(path: Path) -> bool:
    """Whether the file starts like safetensors: an 8-byte little-endian header length, then '{'."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return (
        len(head) == 9 and head[8:9] == b"{" and 1 < int.from_bytes(head[:8], "little") < (1 << 27)
    )


def _is_torch_file(path: Path) -> bool:
    """A PyTorch zip archive (torch.save since 1.6)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _to_numpy(name: str, value) -> np.ndarray:
    torch = _need("torch")
    if not isinstance(value, torch.Tensor):
        raise NotAConvMixer(
            f"the entry {name!r} is a {type(value).__name__}, not a tensor; "
            "not a state dict of weights"
        )
    value = value.detach().cpu()
    if value.is_floating_point() and value.dtype not in (
        torch.float32,
        torch.float64,
        torch.float16,
    ):
        value = value.float()  # bfloat16 and the like have no NumPy dtype
    return value.numpy().copy()


def _read_torch(path: Path) -> StateDict:
    torch = _need("torch")
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # PyTorch bolds part of its message
        first = text.splitlines()[0].split(". ")[0] if text else type(e).__name__
        raise ValueError(
            f"{path} is not a weights-only PyTorch file (loading it would run arbitrary "
            f"pickled code: {first[:160]}); save the weights with "
            "torch.save(model.state_dict(), ...) or as .safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(
            f"{path} is not a readable PyTorch file ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160] if str(e) else ''})"
        ) from None
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for name in _UNWRAP:  # a training checkpoint {"state_dict": ..., "epoch": ...}
            if isinstance(obj.get(name), dict):
                obj = obj[name]
                break
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path} holds a {type(obj).__name__}, not a state dict (a dict of tensors)"
        )
    return {str(k): _to_numpy(str(k), v) for k, v in obj.items()}


def read_state_dict(path) -> StateDict:
    """Read a state dict: ``.safetensors`` (preferred) or a PyTorch file loaded weights-only.

    Returns {name: array} in the file's order. A PyTorch checkpoint dict holding
    the weights under ``state_dict`` / ``model`` / ``model_state_dict`` is
    unwrapped. Raises ValueError for a file of another kind or one that would
    need arbitrary unpickling, ImportError (naming the extra) without the libraries.
    """
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise ValueError(
                f"{path} is not a file; give the weights file (.safetensors, .pth, ...)"
            )
        raise FileNotFoundError(f"weights file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors" or (suffix not in TORCH_SUFFIXES and _is_safetensors(path)):
        st = _need("safetensors.numpy")
        try:
            return dict(st.load_file(str(path)))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            if "bf16" in str(e).lower() or "bfloat16" in str(e).lower():
                sd = _need("safetensors.torch").load_file(str(path))
                return {k: _to_numpy(k, v) for k, v in sd.items()}
            raise ValueError(
                f"{path} is not a readable safetensors file ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:160] if str(e) else ''})"
            ) from None
    if suffix in TORCH_SUFFIXES or _is_torch_file(path):
        return _read_torch(path)
    raise ValueError(
        f"{path} is neither a .safetensors file nor a PyTorch weights file "
        f"({', '.join(TORCH_SUFFIXES)}); give the weights in one of those formats"
    )


# --------------------------------------------------------------------------- names and shapes


def _strip_prefix(sd: StateDict) -> StateDict:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _bn(prefix: str, dim: int) -> dict[str, tuple]:
    return {f"{prefix}.{n}": (dim,) for n in _BN_STATS}


def _names(layout: str, depth: int) -> dict[str, str]:
    """Our module path -> the PyTorch module prefix, for every module of the network."""
    if layout == "timm":
        out = {"stem": "stem.0", "stem_bn": "stem.2", "head": "head"}
        blocks = [f"blocks.{i}" for i in range(depth)]
    else:
        out = {"stem": "0", "stem_bn": "2", "head": f"{3 + depth + 2}"}
        blocks = [f"{3 + i}" for i in range(depth)]
    for i, b in enumerate(blocks):
        out.update(
            {
                f"block_{i}/depthwise": f"{b}.0.fn.0",
                f"block_{i}/depthwise_bn": f"{b}.0.fn.2",
                f"block_{i}/pointwise": f"{b}.1",
                f"block_{i}/pointwise_bn": f"{b}.3",
            }
        )
    return out


def expected_shapes(config: ConvMixerConfig, layout: str = "timm") -> dict[str, tuple]:
    """{PyTorch tensor name: shape} of a ConvMixer of ``config`` in ``layout``
    (without ``num_batches_tracked``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    d, p, c, k = config.dim, config.patch_size, config.channels, config.kernel_size
    shapes = {}
    for ours, theirs in _names(layout, config.depth).items():
        if ours.endswith("_bn"):
            shapes.update(_bn(theirs, d))
            continue
        weight = {"stem": (d, c, p, p), "head": (config.num_classes, d)}.get(ours)
        if weight is None:
            weight = (d, 1, k, k) if ours.endswith("depthwise") else (d, d, 1, 1)
        shapes[f"{theirs}.weight"] = weight
        shapes[f"{theirs}.bias"] = (config.num_classes,) if ours == "head" else (d,)
    return shapes


def detect_layout(sd: StateDict) -> str:
    """'timm' or 'locuslab' from the stem's name; :class:`NotAConvMixer` otherwise."""
    sd = _strip_prefix(sd)
    if "stem.0.weight" in sd:
        return "timm"
    if "0.weight" in sd:
        return "locuslab"
    if not sd:
        raise NotAConvMixer("the state dict is empty; not a ConvMixer")
    # name the tensor that would have to be the stem: the first convolution weight, else the
    # first tensor
    first = next((k for k, v in sd.items() if np.ndim(v) == 4), next(iter(sd)))
    raise NotAConvMixer(
        f"not a ConvMixer state dict: its first convolution {first!r} (shape "
        f"{tuple(np.shape(sd[first]))}) is neither timm's stem 'stem.0.weight' nor the "
        "locuslab reference's '0.weight', and neither is present (nor timm's ViT patch "
        "embedding 'patch_embed.proj.weight')"
    )


def _shape(sd: StateDict, name: str, ndim: int) -> tuple:
    if name not in sd:
        raise NotAConvMixer(f"not a ConvMixer state dict: the tensor {name!r} is missing")
    shape = tuple(np.shape(sd[name]))
    if len(shape) != ndim:
        raise NotAConvMixer(
            f"not a ConvMixer state dict: the tensor {name!r} has shape {shape}, "
            f"expected {ndim} dimensions"
        )
    return shape


def _infer_depth(sd: StateDict, layout: str) -> int:
    if layout == "timm":
        pat = re.compile(r"blocks\.(\d+)\.0\.fn\.0\.weight")
        found = {int(m.group(1)) for k in sd if (m := pat.fullmatch(k))}
        depth = 0
        while depth in found:
            depth += 1
    else:
        pat = re.compile(r"(\d+)\.0\.fn\.0\.weight")
        found = {int(m.group(1)) for k in sd if (m := pat.fullmatch(k))}
        depth = 0
        while 3 + depth in found:
            depth += 1
    if depth == 0:
        name = "blocks.0.0.fn.0.weight" if layout == "timm" else "3.0.fn.0.weight"
        raise NotAConvMixer(
            f"not a ConvMixer state dict: the tensor {name!r} (the first mixer block's "
            "depthwise convolution) is missing"
        )
    return depth


def config_from_state_dict(
    sd: StateDict,
    *,
    activation: str = "gelu",
    mean=None,
    std=None,
    image_size: int | None = 224,
    layout: str | None = None,
) -> tuple[ConvMixerConfig, str]:
    """The architecture of a PyTorch ConvMixer state dict: ``(config, layout)``.

    dim, depth, kernel size, patch size, channels and classes come from the
    tensor shapes; the activation, the normalization ``mean``/``std`` (None:
    0.5 / 0.5) and ``image_size`` (a multiple of the patch size; None: the
    patch size, for reading the shapes only) are not in the weights and are given.
    ``layout``: 'timm', 'locuslab' or None (detected). Every tensor is then checked:
    :class:`NotAConvMixer` names the first one
    that is missing, unexpected or of the wrong shape.
    """
    sd = _strip_prefix(sd)
    layout = layout or detect_layout(sd)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    stem, dw = ("stem.0", "blocks.0.0.fn.0") if layout == "timm" else ("0", "3.0.fn.0")
    dim, channels, p, p2 = _shape(sd, f"{stem}.weight", 4)
    depth = _infer_depth(sd, layout)
    k = _shape(sd, f"{dw}.weight", 4)[2]
    head = "head" if layout == "timm" else f"{3 + depth + 2}"
    classes = _shape(sd, f"{head}.weight", 2)[0]
    if p != p2:
        raise NotAConvMixer(
            f"not a ConvMixer state dict: the stem {stem}.weight has a non-square kernel {(p, p2)}"
        )
    image_size = p if image_size is None else image_size
    try:
        config = ConvMixerConfig(
            dim=dim,
            depth=depth,
            kernel_size=k,
            patch_size=p,
            num_classes=classes,
            image_size=image_size,
            channels=channels,
            mean=mean,
            std=std,
            activation=activation,
        )
    except ValueError as e:
        raise ValueError(
            f"the weights (dim {dim}, depth {depth}, kernel {k}, patch {p}, {channels} channels, "
            f"{classes} classes) do not fit the options: {e}"
        ) from None
    check_state_dict(sd, config, layout)
    return config, layout


def check_state_dict(sd: StateDict, config: ConvMixerConfig, layout: str) -> None:
    """Raise :class:`NotAConvMixer` naming the first tensor of ``sd`` that is missing,
    unexpected or of another shape than a ConvMixer of ``config`` in ``layout`` has."""
    sd = _strip_prefix(sd)
    expected = expected_shapes(config, layout)
    what = f"a {layout} ConvMixer (dim {config.dim}, depth {config.depth})"
    for name, value in sd.items():
        shape = tuple(np.shape(value))
        if (
            name.endswith(".num_batches_tracked")
            and f"{name.rsplit('.', 1)[0]}.running_mean" in expected
        ):
            if shape not in ((), (1,)):  # (1,): PyTorch loads it too (older files, earlier exports)
                raise NotAConvMixer(
                    f"the tensor {name!r} has shape {shape}, expected a scalar (a BatchNorm's "
                    "batch counter)"
                )
            continue
        if name not in expected:
            raise NotAConvMixer(f"the tensor {name!r} (shape {shape}) is not part of {what}")
        if shape != expected[name]:
            raise NotAConvMixer(
                f"the tensor {name!r} has shape {shape} but {what} has {expected[name]}"
            )
        if (
            np.asarray(value).dtype.kind in "biucOSUM"
        ):  # bfloat16 (ml_dtypes) is floating but not np.floating
            raise NotAConvMixer(
                f"the tensor {name!r} has dtype {np.asarray(value).dtype}, expected floating point"
            )
    missing = [n for n in expected if n not in sd]
    if missing:
        raise NotAConvMixer(
            f"the tensor {missing[0]!r} of {what} is missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )


# --------------------------------------------------------------------------- conversion


def _put(tree: dict, path: str, name: str, value) -> None:
    for part in path.split("/"):
        tree = tree.setdefault(part, {})
    tree[name] = value


def _get(tree: dict, path: str, name: str):
    for part in path.split("/"):
        tree = tree[part]
    return np.asarray(tree[name])


def variables_from_state_dict(
    sd: StateDict, config: ConvMixerConfig, layout: str
) -> dict[str, Any]:
    """``{'params', 'batch_stats'}`` (float32 NumPy) of our ConvMixer from a PyTorch state dict.

    Conv weights (out, in, kh, kw) become HWIO kernels, the Linear weight
    (classes, dim) the Dense kernel (dim, classes); BatchNorm weight/bias/
    running_mean/running_var become scale/bias/mean/var. Checked first
    (:func:`check_state_dict`).
    """
    sd = _strip_prefix(sd)
    check_state_dict(sd, config, layout)

    def f32(name: str) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(sd[name], np.float32))

    out: dict[str, Any] = {"params": {}, "batch_stats": {}}
    for ours, theirs in _names(layout, config.depth).items():
        if ours.endswith("_bn"):
            for torch_name, (collection, name) in _BN_STATS.items():
                _put(out[collection], ours, name, f32(f"{theirs}.{torch_name}"))
            continue
        weight = f32(f"{theirs}.weight")
        kernel = weight.T if ours == "head" else weight.transpose(2, 3, 1, 0)
        _put(out["params"], ours, "kernel", np.ascontiguousarray(kernel))
        _put(out["params"], ours, "bias", f32(f"{theirs}.bias"))
    return out


def state_dict_from_variables(config: ConvMixerConfig, variables) -> StateDict:
    """timm's ``ConvMixer`` state dict (float32, plus int64 ``num_batches_tracked`` zeros)
    of our variables ``{'params', 'batch_stats'}``, in timm's order."""
    params, stats = variables["params"], variables["batch_stats"]
    sd: StateDict = {}
    for ours, theirs in _names("timm", config.depth).items():
        if ours.endswith("_bn"):
            for torch_name, (collection, name) in _BN_STATS.items():
                tree = params if collection == "params" else stats
                sd[f"{theirs}.{torch_name}"] = np.ascontiguousarray(
                    _get(tree, ours, name), np.float32
                )
            sd[f"{theirs}.num_batches_tracked"] = np.zeros((), np.int64)
            continue
        kernel = _get(params, ours, "kernel").astype(np.float32)
        weight = kernel.T if ours == "head" else kernel.transpose(3, 2, 0, 1)
        sd[f"{theirs}.weight"] = np.ascontiguousarray(weight)
        sd[f"{theirs}.bias"] = np.ascontiguousarray(_get(params, ours, "bias"), np.float32)
    check_state_dict(sd, config, "timm")
    return sd


# --------------------------------------------------------------------------- ViT


class NotAViT(ValueError):
    """A state dict that is not a timm ``VisionTransformer`` this ViT implements (names the
    tensor that does not fit, and why)."""


_VIT_MARKERS = ("patch_embed.proj.weight", "pos_embed", "cls_token")

#: Tensors of timm ViT variants this model does not implement: pattern -> what they are.
_VIT_UNSUPPORTED = (
    (r"dist_token|head_dist\..*", "a distilled DeiT's distillation token and second head"),
    (r"reg_token", "register tokens"),
    (r"blocks\.\d+\.ls[12]\..*", "LayerScale"),
    (r"blocks\.\d+\.attn\.[qk]_norm\..*", "qk-norm"),
    (r"blocks\.\d+\.attn\.norm\..*", "a norm inside the attention (scale_attn_norm)"),
    (r"blocks\.\d+\.mlp\.norm\..*", "a norm inside the MLP (scale_mlp_norm)"),
    (r"blocks\.\d+\.attn\.gate\..*", "gated attention"),
    (r"blocks\.\d+\.mlp\.fc1_[gx]\..*", "a SwiGLU MLP"),
    (r"norm_pre\..*", "a norm before the blocks (pre_norm, as in CLIP)"),
    (r"patch_embed\.norm\..*", "a norm in the patch embedding"),
    (r"attn_pool\..*", "attention pooling (global_pool 'map')"),
)


def detect_family(sd: StateDict) -> str:
    """'vit' for timm ``VisionTransformer`` names (``patch_embed.proj.weight``,
    ``pos_embed``, ``cls_token``), else 'convmixer' (checked further by the ConvMixer path)."""
    sd = _strip_prefix(sd)
    return "vit" if any(name in sd for name in _VIT_MARKERS) else "convmixer"


def _refuse_unsupported(sd: StateDict) -> None:
    for pattern, what in _VIT_UNSUPPORTED:
        for name in sd:
            if re.fullmatch(pattern, name):
                raise NotAViT(
                    f"the tensor {name!r} belongs to {what}, which this ViT does not "
                    "implement; only timm's plain VisionTransformer is (class token or average "
                    "pooling, learned position embedding, blocks of LayerNorm, attention, MLP)"
                )


def _vit_shape(sd: StateDict, name: str, ndim: int, what: str) -> tuple:
    if name not in sd:
        raise NotAViT(f"not a timm ViT state dict: the tensor {name!r} ({what}) is missing")
    shape = tuple(np.shape(sd[name]))
    if len(shape) != ndim:
        raise NotAViT(
            f"not a timm ViT state dict: the tensor {name!r} ({what}) has shape {shape}, "
            f"expected {ndim} dimensions"
        )
    return shape


def _grid_side(n: int) -> int | None:
    side = int(round(np.sqrt(n)))
    return side if side >= 1 and side * side == n else None


def _mlp_ratio(hidden: int, dim: int) -> float:
    """A float ratio r with ``int(dim * r) == hidden`` (timm's rule for the MLP width)."""
    ratio = hidden / dim
    if int(dim * ratio) < hidden:
        ratio = float(np.nextafter(ratio, np.inf))
    return ratio


def vit_architecture(sd: StateDict) -> dict[str, Any]:
    """What the shapes of a timm ViT state dict say: ``dim``, ``depth``, ``mlp_ratio``,
    ``patch_size``, ``channels``, ``num_classes``, ``image_size`` (grid side x patch size,
    from the position embedding's rows), ``qkv_bias``, ``class_token``, ``global_pool``
    ('token' with ``norm``, 'avg' with ``fc_norm``: timm's 'max' and 'avgmax' pooling have
    the same tensors and are not told apart) and ``no_embed_class``; not the head count.
    Raises :class:`NotAViT` naming the tensor that does not fit."""
    sd = _strip_prefix(sd)
    _refuse_unsupported(sd)
    dim, channels, p, p2 = _vit_shape(sd, "patch_embed.proj.weight", 4, "the patch embedding")
    if p != p2:
        raise NotAViT(
            f"the patch embedding 'patch_embed.proj.weight' has a non-square kernel {(p, p2)}; "
            "only square patches are supported"
        )
    pos = _vit_shape(sd, "pos_embed", 3, "the learned position embedding")
    rows = pos[1]
    class_token = "cls_token" in sd
    side = _grid_side(rows - 1) if class_token else None
    no_embed_class = False
    if side is None:
        side = _grid_side(rows)
        no_embed_class = class_token  # the class token has no row (timm's no_embed_class)
    if side is None:
        raise NotAViT(
            f"the position embedding 'pos_embed' has {rows} rows, which is no square grid of "
            f"patches{' (with or without a class token row)' if class_token else ''}; only "
            "square images are supported"
        )
    pat = re.compile(r"blocks\.(\d+)\.norm1\.weight")
    found = {int(m.group(1)) for k in sd if (m := pat.fullmatch(k))}
    depth = 0
    while depth in found:
        depth += 1
    if depth == 0:
        raise NotAViT(
            "not a timm ViT state dict: the tensor 'blocks.0.norm1.weight' (the first "
            "transformer block) is missing"
        )
    hidden = _vit_shape(sd, "blocks.0.mlp.fc1.weight", 2, "the first block's MLP")[0]
    classes = _vit_shape(sd, "head.weight", 2, "the classification head")[0]
    has_norm, has_fc_norm = "norm.weight" in sd, "fc_norm.weight" in sd
    if has_norm and has_fc_norm:
        raise NotAViT(
            "the weights hold both 'norm.weight' and 'fc_norm.weight'; this ViT has one final "
            "norm, before the class token ('norm') or after average pooling ('fc_norm')"
        )
    if not (has_norm or has_fc_norm):
        raise NotAViT(
            "not a supported timm ViT: the final norm ('norm.weight' or 'fc_norm.weight') is "
            "missing (final_norm=False is not implemented)"
        )
    if has_norm and not class_token:
        raise NotAViT(
            "the tensor 'norm.weight' without 'cls_token': a norm before average pooling "
            "(timm's fc_norm=False) is not implemented; only 'fc_norm' after the pooling"
        )
    return dict(
        dim=dim,
        depth=depth,
        mlp_ratio=_mlp_ratio(hidden, dim),
        patch_size=p,
        channels=channels,
        num_classes=classes,
        image_size=side * p,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        class_token=class_token,
        global_pool="token" if has_norm else "avg",
        no_embed_class=no_embed_class,
    )


def vit_config_from_state_dict(sd: StateDict, *, num_heads: int, mean=None, std=None) -> ViTConfig:
    """The :class:`ViTConfig` of a timm ViT state dict (:func:`vit_architecture`), with the
    head count and the normalization ``mean``/``std`` (None: 0.5 / 0.5, timm's default for
    its ViTs; DeiTs use ImageNet's) given. Every tensor is then checked
    (:func:`check_vit_state_dict`). LayerNorm epsilon is timm's 1e-6."""
    arch = vit_architecture(sd)
    try:
        config = ViTConfig(num_heads=num_heads, mean=mean, std=std, **arch)
    except ValueError as e:
        raise ValueError(
            f"the ViT weights (dim {arch['dim']}, depth {arch['depth']}, patch "
            f"{arch['patch_size']}, {arch['channels']} channels) do not fit the options: {e}"
        ) from None
    check_vit_state_dict(sd, config)
    return config


def _vit_names(config: ViTConfig) -> list[tuple[str, str, str]]:
    """(our module path, timm module prefix, kind) for every module with weights, in timm's
    order; kind is 'norm', 'dense' or 'conv'."""
    out = [("patch_embed", "patch_embed.proj", "conv")]
    for i in range(config.depth):
        b, ours = f"blocks.{i}", f"blocks_{i}"
        out += [
            (f"{ours}/norm1", f"{b}.norm1", "norm"),
            (f"{ours}/attn/qkv", f"{b}.attn.qkv", "dense"),
            (f"{ours}/attn/proj", f"{b}.attn.proj", "dense"),
            (f"{ours}/norm2", f"{b}.norm2", "norm"),
            (f"{ours}/mlp/fc1", f"{b}.mlp.fc1", "dense"),
            (f"{ours}/mlp/fc2", f"{b}.mlp.fc2", "dense"),
        ]
    final = "norm" if config.global_pool == "token" else "fc_norm"
    return out + [(final, final, "norm"), ("head", "head", "dense")]


def vit_expected_shapes(config: ViTConfig) -> dict[str, tuple]:
    """{timm tensor name: shape} of a timm ``VisionTransformer`` of ``config``."""
    d, p, c = config.dim, config.patch_size, config.channels
    shapes: dict[str, tuple] = {}
    if config.class_token:
        shapes["cls_token"] = (1, 1, d)
    shapes["pos_embed"] = (1, config.pos_rows, d)
    dense = {
        "qkv": (3 * d, d),
        "proj": (d, d),
        "fc1": (config.mlp_dim, d),
        "fc2": (d, config.mlp_dim),
        "head": (config.num_classes, d),
    }
    for _, theirs, kind in _vit_names(config):
        if kind == "conv":
            shapes[f"{theirs}.weight"] = (d, c, p, p)
            shapes[f"{theirs}.bias"] = (d,)
        elif kind == "norm":
            shapes[f"{theirs}.weight"] = shapes[f"{theirs}.bias"] = (d,)
        else:
            weight = dense[theirs.rsplit(".", 1)[-1]]
            shapes[f"{theirs}.weight"] = weight
            if config.qkv_bias or not theirs.endswith(".qkv"):
                shapes[f"{theirs}.bias"] = (weight[0],)
    return shapes


def check_vit_state_dict(sd: StateDict, config: ViTConfig) -> None:
    """Raise :class:`NotAViT` naming the first tensor of ``sd`` that is missing, unexpected
    (with the reason for the known timm variants) or of another shape than a timm ViT of
    ``config`` has."""
    sd = _strip_prefix(sd)
    _refuse_unsupported(sd)
    expected = vit_expected_shapes(config)
    what = f"a timm ViT (dim {config.dim}, depth {config.depth})"
    for name, value in sd.items():
        shape = tuple(np.shape(value))
        if name not in expected:
            raise NotAViT(f"the tensor {name!r} (shape {shape}) is not part of {what}")
        if shape != expected[name]:
            raise NotAViT(f"the tensor {name!r} has shape {shape} but {what} has {expected[name]}")
        if np.asarray(value).dtype.kind in "biucOSUM":
            raise NotAViT(
                f"the tensor {name!r} has dtype {np.asarray(value).dtype}, expected floating point"
            )
    missing = [n for n in expected if n not in sd]
    if missing:
        raise NotAViT(
            f"the tensor {missing[0]!r} of {what} is missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )


def vit_variables_from_state_dict(sd: StateDict, config: ViTConfig) -> dict[str, Any]:
    """``{'params'}`` (float32 NumPy) of our ViT from a timm ViT state dict.

    The patch embedding (d, C, P, P) becomes the HWIO kernel (P, P, C, d), Linear weights
    (out, in) Dense kernels (in, out), LayerNorm weight/bias scale/bias; ``cls_token`` and
    ``pos_embed`` are taken as they are. Checked first (:func:`check_vit_state_dict`).
    """
    sd = _strip_prefix(sd)
    check_vit_state_dict(sd, config)

    def f32(name: str) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(sd[name], np.float32))

    params: dict[str, Any] = {}
    for name in ("cls_token", "pos_embed"):
        if name in sd:
            params[name] = f32(name)
    for ours, theirs, kind in _vit_names(config):
        if kind == "norm":
            _put(params, ours, "scale", f32(f"{theirs}.weight"))
        else:
            weight = f32(f"{theirs}.weight")
            kernel = weight.transpose(2, 3, 1, 0) if kind == "conv" else weight.T
            _put(params, ours, "kernel", np.ascontiguousarray(kernel))
        if f"{theirs}.bias" in sd:
            _put(params, ours, "bias", f32(f"{theirs}.bias"))
    return {"params": params}


def vit_state_dict_from_variables(config: ViTConfig, variables) -> StateDict:
    """timm's ``VisionTransformer`` state dict (float32) of our ViT variables ``{'params'}``,
    in timm's order."""
    params = variables["params"]
    sd: StateDict = {}
    for name in ("cls_token", "pos_embed"):
        if config.class_token or name == "pos_embed":
            sd[name] = np.ascontiguousarray(np.asarray(params[name]), np.float32)
    for ours, theirs, kind in _vit_names(config):
        if kind == "norm":
            sd[f"{theirs}.weight"] = np.ascontiguousarray(_get(params, ours, "scale"), np.float32)
        else:
            kernel = _get(params, ours, "kernel").astype(np.float32)
            weight = kernel.transpose(3, 2, 0, 1) if kind == "conv" else kernel.T
            sd[f"{theirs}.weight"] = np.ascontiguousarray(weight)
        if kind != "dense" or config.qkv_bias or not theirs.endswith(".qkv"):
            sd[f"{theirs}.bias"] = np.ascontiguousarray(_get(params, ours, "bias"), np.float32)
    check_vit_state_dict(sd, config)
    return sd


def timm_vit_kwargs(config: ViTConfig) -> dict[str, Any]:
    """The keyword arguments of ``timm.models.vision_transformer.VisionTransformer`` that
    build ``config``'s architecture (its weights then load with ``strict=True``)."""
    return dict(
        img_size=config.image_size,
        patch_size=config.patch_size,
        in_chans=config.channels,
        num_classes=config.num_classes,
        embed_dim=config.dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=config.qkv_bias,
        class_token=config.class_token,
        global_pool=config.global_pool,
        no_embed_class=config.no_embed_class,
    )


#: The fields that make two ViTs the same network (all but the head's width, the image size
#: and the normalization, which ``timm.create_model`` takes or which the weights do not hold).
_VIT_ARCH = (
    "dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "patch_size",
    "channels",
    "qkv_bias",
    "class_token",
    "global_pool",
    "no_embed_class",
    "norm_eps",
)


def vit_differences(config: ViTConfig, other: ViTConfig) -> list[str]:
    """The architecture fields where ``config`` differs from ``other``, as
    ``'name value (other value)'``; the head width, image size and normalization aside."""
    return [
        f"{n} {getattr(config, n)} ({getattr(other, n)})"
        for n in _VIT_ARCH
        if getattr(config, n) != getattr(other, n)
    ]


def timm_vit_name(config: ViTConfig, prefer: str | None = None) -> str | None:
    """The timm model name (one of ``model.config.TIMM_NAMES``) whose architecture is
    ``config``'s, or None: ``prefer`` if it fits, else one with ``config``'s normalization
    too, else the first that fits."""
    from convmixer_jax.model.config import PRESETS, TIMM_NAMES

    fits = [
        n
        for n in TIMM_NAMES
        if isinstance(PRESETS[n], ViTConfig) and not vit_differences(config, PRESETS[n])
    ]
    if prefer in fits:
        return prefer
    same_norm = [
        n
        for n in fits
        if (PRESETS[n].norm_mean, PRESETS[n].norm_std) == (config.norm_mean, config.norm_std)
    ]
    return (same_norm or fits or [None])[0]


def timm_vit_call(config: ViTConfig, prefer: str | None = None) -> str:
    """The Python expression that builds ``config``'s network in timm (the names ``timm``,
    ``functools`` imported), into which :func:`vit_state_dict_from_variables` loads with
    ``strict=True``: ``timm.create_model(NAME, pretrained=False, num_classes=..,
    img_size=..)`` when the architecture is one of timm's presets (:func:`timm_vit_name`),
    else ``timm.models.vision_transformer.VisionTransformer(...)``."""
    name = timm_vit_name(config, prefer)
    if name is not None:
        kwargs = dict(num_classes=config.num_classes, img_size=config.image_size)
        head = f"timm.create_model({name!r}, pretrained=False, "
    else:
        kwargs = timm_vit_kwargs(config)
        head = "timm.models.vision_transformer.VisionTransformer("
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    if config.norm_eps != 1e-6 and name is None:
        args += f", norm_layer=functools.partial(timm.layers.LayerNorm, eps={config.norm_eps!r})"
    return head + args + ")"


# --------------------------------------------------------------------------- either family


def any_state_dict_from_variables(config, variables) -> StateDict:
    """timm's state dict of a model of either family: a ConvMixer
    (:func:`state_dict_from_variables`) or a ViT (:func:`vit_state_dict_from_variables`)."""
    if isinstance(config, ViTConfig):
        return vit_state_dict_from_variables(config, variables)
    return state_dict_from_variables(config, variables)


def safetensors_bytes(sd: StateDict, metadata: dict[str, str] | None = None) -> bytes:
    """A state dict serialized as safetensors (write it with
    ``files.atomic.write_bytes_atomic``)."""
    st = _need("safetensors.numpy")
    # np.require keeps 0-d tensors 0-d (np.ascontiguousarray would make them (1,))
    return st.save({k: np.require(v, requirements="C") for k, v in sd.items()}, metadata=metadata)


__all__ = [
    "LAYOUTS",
    "NotAConvMixer",
    "read_state_dict",
    "detect_layout",
    "expected_shapes",
    "config_from_state_dict",
    "check_state_dict",
    "variables_from_state_dict",
    "state_dict_from_variables",
    "safetensors_bytes",
    "NotAViT",
    "detect_family",
    "vit_architecture",
    "vit_config_from_state_dict",
    "vit_expected_shapes",
    "check_vit_state_dict",
    "vit_variables_from_state_dict",
    "vit_state_dict_from_variables",
    "timm_vit_kwargs",
    "vit_differences",
    "timm_vit_name",
    "timm_vit_call",
    "any_state_dict_from_variables",
]
