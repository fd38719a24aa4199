"""The ConvMixer's architecture as data: :class:`ConvMixerConfig` and the named presets.

This module imports neither JAX nor Flax, so that the command line can list the presets
(``--preset`` and ``--timm-name`` choices and help) without starting JAX.

A new preset is one :class:`Preset` definition below plus one line in :data:`REGISTRY`;
:data:`PRESETS` (name -> :class:`ConvMixerConfig`) and :data:`TIMM_NAMES` follow from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

#: The formulations of the depthwise convolution (``model.convmixer.depthwise``); 'auto'
#: picks one per grid size (``model.convmixer.resolve_depthwise_impl``).
DEPTHWISE_IMPLS = ("auto", "toeplitz", "shift", "conv")
#: The elementwise activations of a ConvMixer.
ACTIVATIONS = ("gelu", "relu")
#: timm's ImageNet input normalization (per RGB channel, of values in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_POSITIVE_INTS = (
    "dim",
    "depth",
    "kernel_size",
    "patch_size",
    "num_classes",
    "image_size",
    "channels",
)


@dataclasses.dataclass(frozen=True)
class ConvMixerConfig:
    """Architecture of a ConvMixer.

    Attributes:
      dim: embedding width d.
      depth: number of mixer blocks L.
      kernel_size: depthwise kernel size k.
      patch_size: patch size P (= the encryption block size M).
      num_classes: classifier outputs.
      image_size: input height and width (square); must be divisible by P.
      channels: input channels C.
      mean, std: per-channel input normalization, length C (None: 0.5 / 0.5).
      activation: 'gelu' (exact erf GELU, the paper's and most timm models') or 'relu'
        (timm's ``convmixer_768_32``).
      gelu_approximate: tanh GELU instead of exact erf GELU.
      depthwise_impl: 'auto' | 'toeplitz' | 'shift' | 'conv' (all exact).
    """

    dim: int = 256
    depth: int = 8
    kernel_size: int = 9
    patch_size: int = 4
    num_classes: int = 10
    image_size: int = 32
    channels: int = 3
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    gelu_approximate: bool = False
    depthwise_impl: str = "auto"
    activation: str = "gelu"

    family = "convmixer"

    def __post_init__(self):
        _check_positive_ints(self, _POSITIVE_INTS)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}; "
                "choose an image size that is a multiple of the patch size"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.depthwise_impl not in DEPTHWISE_IMPLS:
            raise ValueError(
                f"depthwise_impl must be one of {DEPTHWISE_IMPLS}, got {self.depthwise_impl!r}"
            )
        _check_norm(self)

    @property
    def grid_size(self) -> int:
        """Side of the patch grid, image_size // patch_size."""
        return self.image_size // self.patch_size

    @property
    def norm_mean(self) -> tuple[float, ...]:
        return self.mean if self.mean is not None else (0.5,) * self.channels

    @property
    def norm_std(self) -> tuple[float, ...]:
        return self.std if self.std is not None else (0.5,) * self.channels

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConvMixerConfig:
        d = dict(d)
        family = d.pop("family", cls.family)
        if family != cls.family:
            raise ValueError(f"not a ConvMixer config: family {family!r}")
        return _from_fields(cls, d, "ConvMixer")

#: Pooling of a ViT's tokens before the head: the class token, or the mean of the patch tokens.
VIT_POOLS = ("token", "avg")

_VIT_POSITIVE_INTS = ("dim", "depth", "num_heads", "patch_size", "num_classes", "image_size",
                      "channels")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture of a Vision Transformer in timm's ``VisionTransformer`` layout.

    Attributes:
      dim: embedding width d (timm ``embed_dim``).
      depth: number of transformer blocks.
      num_heads: attention heads; must divide ``dim``.
      mlp_ratio: hidden width of each block's MLP, as a multiple of ``dim``.
      patch_size: patch size P (= the encryption block size M).
      num_classes: classifier outputs.
      image_size: input height and width (square); must be divisible by P.
      channels: input channels C.
      mean, std: per-channel input normalization, length C (None: 0.5 / 0.5).
      qkv_bias: the attention's query/key/value projection has a bias.
      class_token: a learned class token is prepended to the patch tokens.
      global_pool: 'token' (head on the class token) or 'avg' (head on the mean of the
        patch tokens; as timm, the final norm then follows the pooling: ``fc_norm``).
      no_embed_class: the position embedding has patch rows only and the class token gets
        none (timm's ``no_embed_class``).
      norm_eps: LayerNorm epsilon (timm: 1e-6).
    """

    family = "vit"

    dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    patch_size: int = 16
    num_classes: int = 1000
    image_size: int = 224
    channels: int = 3
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    qkv_bias: bool = True
    class_token: bool = True
    global_pool: str = "token"
    no_embed_class: bool = False
    norm_eps: float = 1e-6

    def __post_init__(self):
        _check_positive_ints(self, _VIT_POSITIVE_INTS)
        if self.dim % self.num_heads:
            raise ValueError(
                f"dim {self.dim} is not divisible by num_heads {self.num_heads}; choose a "
                "head count that divides the width"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}; "
                "choose an image size that is a multiple of the patch size"
            )
        if not self.mlp_ratio > 0 or int(self.dim * self.mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio!r}")
        if self.global_pool not in VIT_POOLS:
            raise ValueError(f"global_pool must be one of {VIT_POOLS}, got {self.global_pool!r}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool 'token' needs a class token; use global_pool 'avg'")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps!r}")
        object.__setattr__(self, "mlp_ratio", float(self.mlp_ratio))
        object.__setattr__(self, "norm_eps", float(self.norm_eps))
        _check_norm(self)

    @property
    def grid_size(self) -> int:
        """Side of the patch grid, image_size // patch_size."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def pos_rows(self) -> int:
        """Rows of the position embedding: the patch tokens, plus the class token's row
        unless ``no_embed_class``."""
        extra = 1 if self.class_token and not self.no_embed_class else 0
        return extra + self.num_patches

    @property
    def mlp_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)

    @property
    def norm_mean(self) -> tuple[float, ...]:
        return self.mean if self.mean is not None else (0.5,) * self.channels

    @property
    def norm_std(self) -> tuple[float, ...]:
        return self.std if self.std is not None else (0.5,) * self.channels

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        d = dict(d)
        family = d.pop("family", cls.family)
        if family != cls.family:
            raise ValueError(f"not a ViT config: family {family!r}")
        return _from_fields(cls, d, "ViT")


def _check_positive_ints(cfg, names) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(
                f"{type(cfg).__name__}.{name} must be a positive integer, got {value!r}"
            )


def _check_norm(cfg) -> None:
    for name in ("mean", "std"):
        value = getattr(cfg, name)
        if value is not None:
            value = tuple(float(v) for v in value)
            object.__setattr__(cfg, name, value)
            if len(value) != cfg.channels:
                raise ValueError(
                    f"{name} has {len(value)} entries but the model has {cfg.channels} channels"
                )
    if cfg.std is not None and any(s <= 0 for s in cfg.std):
        raise ValueError(f"std must be positive, got {cfg.std}")


def _from_fields(cls, d: dict[str, Any], what: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {what} config fields: {sorted(unknown)}")
    for name in ("mean", "std"):
        if d.get(name) is not None:
            d[name] = tuple(d[name])
    return cls(**d)


#: The model families by name: the ``family`` of a config dict (absent: 'convmixer').
FAMILIES: dict[str, type] = {"convmixer": ConvMixerConfig, "vit": ViTConfig}

ModelConfig = Any  # ConvMixerConfig | ViTConfig


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """The architecture of a model directory's ``model`` object, of either family.

    A dict without ``family`` is a ConvMixer (every model file written before the ViT).
    """
    family = d.get("family", "convmixer")
    if family not in FAMILIES:
        raise ValueError(
            f"unknown model family {family!r}; this version knows {', '.join(FAMILIES)}"
        )
    return FAMILIES[family].from_dict(d)


#: A preset defined by the paper, Iijima & Kiya (2022), section 4 (``Preset.source``).
PAPER_SOURCE = "paper"
#: A preset that is timm 1.0's model of the same name (timm/models/convmixer.py).
TIMM_SOURCE = "timm"


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named architecture and where it is defined.

    source: :data:`PAPER_SOURCE`, or :data:`TIMM_SOURCE` for timm's model of the same
    name, whose PyTorch weights ``import-torch --timm-name NAME`` reads.
    """

    config: ConvMixerConfig
    source: str


def _timm_imagenet(**architecture) -> ConvMixerConfig:
    """One of timm's ImageNet ConvMixers: 224 x 224 RGB, 1000 classes, ImageNet mean/std."""
    return ConvMixerConfig(
        num_classes=1000,
        image_size=224,
        channels=3,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        **architecture,
    )


#: ConvMixer-256/8, k = 9, p = 4 on CIFAR-10 (the paper's model).
PAPER = Preset(
    ConvMixerConfig(
        dim=256, depth=8, kernel_size=9, patch_size=4, num_classes=10, image_size=32, channels=3
    ),
    PAPER_SOURCE,
)
#: Patch 7 on RGB gives the odd block length pb = 147.
CONVMIXER_768_32 = Preset(
    _timm_imagenet(dim=768, depth=32, kernel_size=7, patch_size=7, activation="relu"),
    TIMM_SOURCE,
)
CONVMIXER_1536_20 = Preset(
    _timm_imagenet(dim=1536, depth=20, kernel_size=9, patch_size=7), TIMM_SOURCE
)
CONVMIXER_1024_20_KS9_P14 = Preset(
    _timm_imagenet(dim=1024, depth=20, kernel_size=9, patch_size=14), TIMM_SOURCE
)



def _timm_vit(dim: int, num_heads: int, *, mean=None, std=None) -> ViTConfig:
    """One of timm's ImageNet ViT/DeiT models with 16 x 16 patches on 224 x 224 RGB, 1000
    classes, depth 12, MLP ratio 4, a class token and the head on it."""
    return ViTConfig(
        dim=dim, depth=12, num_heads=num_heads, patch_size=16, num_classes=1000,
        image_size=224, channels=3, mean=mean, std=std,
    )


#: The project's CIFAR-size ViT: 4 x 4 patches (the paper's block size M = 4) on 32 x 32 RGB,
#: an 8 x 8 grid of 64 tokens, width 192, depth 7, 3 heads, MLP ratio 2, no class token
#: and the head on the mean of the patch tokens (as timm's ``*_gap`` ViTs).
VIT_CIFAR = Preset(
    ViTConfig(
        dim=192, depth=7, num_heads=3, mlp_ratio=2.0, patch_size=4, num_classes=10,
        image_size=32, channels=3, class_token=False, global_pool="avg",
    ),
    PAPER_SOURCE,
)
VIT_TINY_PATCH16_224 = Preset(_timm_vit(192, 3), TIMM_SOURCE)
VIT_SMALL_PATCH16_224 = Preset(_timm_vit(384, 6), TIMM_SOURCE)
VIT_BASE_PATCH16_224 = Preset(_timm_vit(768, 12), TIMM_SOURCE)
DEIT_TINY_PATCH16_224 = Preset(
    _timm_vit(192, 3, mean=IMAGENET_MEAN, std=IMAGENET_STD), TIMM_SOURCE
)
DEIT_SMALL_PATCH16_224 = Preset(
    _timm_vit(384, 6, mean=IMAGENET_MEAN, std=IMAGENET_STD), TIMM_SOURCE
)

#: The presets by name, in the order the command line lists them.
REGISTRY: dict[str, Preset] = {
    "paper": PAPER,
    "convmixer_768_32": CONVMIXER_768_32,
    "convmixer_1536_20": CONVMIXER_1536_20,
    "convmixer_1024_20_ks9_p14": CONVMIXER_1024_20_KS9_P14,
    "vit_cifar": VIT_CIFAR,
    "vit_tiny_patch16_224": VIT_TINY_PATCH16_224,
    "vit_small_patch16_224": VIT_SMALL_PATCH16_224,
    "vit_base_patch16_224": VIT_BASE_PATCH16_224,
    "deit_tiny_patch16_224": DEIT_TINY_PATCH16_224,
    "deit_small_patch16_224": DEIT_SMALL_PATCH16_224,
}

#: name -> architecture of every preset (``--preset``).
PRESETS: dict[str, ConvMixerConfig] = {name: p.config for name, p in REGISTRY.items()}
#: The presets that are timm models of that name (``import-torch --timm-name``).
TIMM_NAMES: tuple[str, ...] = tuple(name for name, p in REGISTRY.items() if p.source == TIMM_SOURCE)

__all__ = [
    "ACTIVATIONS",
    "DEPTHWISE_IMPLS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ConvMixerConfig",
    "FAMILIES",
    "ModelConfig",
    "Preset",
    "VIT_POOLS",
    "ViTConfig",
    "config_from_dict",
    "PAPER_SOURCE",
    "TIMM_SOURCE",
    "REGISTRY",
    "PRESETS",
    "TIMM_NAMES",
]
