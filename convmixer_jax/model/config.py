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

    def __post_init__(self):
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"ConvMixerConfig.{name} must be a positive integer, got {value!r}"
                )
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
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(float(v) for v in value)
                object.__setattr__(self, name, value)
                if len(value) != self.channels:
                    raise ValueError(
                        f"{name} has {len(value)} entries but the model has "
                        f"{self.channels} channels"
                    )
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")

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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ConvMixer config fields: {sorted(unknown)}")
        d = dict(d)
        for name in ("mean", "std"):
            if d.get(name) is not None:
                d[name] = tuple(d[name])
        return cls(**d)


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

#: The presets by name, in the order the command line lists them.
REGISTRY: dict[str, Preset] = {
    "paper": PAPER,
    "convmixer_768_32": CONVMIXER_768_32,
    "convmixer_1536_20": CONVMIXER_1536_20,
    "convmixer_1024_20_ks9_p14": CONVMIXER_1024_20_KS9_P14,
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
    "Preset",
    "PAPER_SOURCE",
    "TIMM_SOURCE",
    "REGISTRY",
    "PRESETS",
    "TIMM_NAMES",
]
