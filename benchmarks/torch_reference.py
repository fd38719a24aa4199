"""PyTorch eager ConvMixer: the reference the JAX model is benchmarked against.

Same architecture as ``convmixer_jax.model.convmixer`` (locuslab definition), channels_last,
float32. Benchmarks only: torch is never a runtime dependency of convmixer-jax.
"""

from __future__ import annotations

from torch import nn


class Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


def torch_convmixer(dim=256, depth=8, kernel_size=9, patch_size=4, num_classes=10, channels=3):
    """locuslab/convmixer's ConvMixer definition with the (x-0.5)/0.5 normalization in front."""
    layers = [
        nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size),
        nn.GELU(),
        nn.BatchNorm2d(dim),
    ]
    for _ in range(depth):
        layers += [
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
        ]
    layers += [nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(dim, num_classes)]
    return nn.Sequential(*layers)
