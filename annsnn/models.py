"""Conversion-safe networks: every activation is an ``nn.ReLU`` module and pooling is average pooling.

Build a plain ReLU network with :func:`build_model`, then turn it into an RNL network with
:func:`annsnn.rnl.replace_relu` (``build_model(..., rnl=True)`` does both).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .rnl import replace_relu

MODELS = ("small_cnn", "vgg8", "vgg16", "preact_resnet18")


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``; the first layer of every model, so inputs are images in [0, 1]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


SMALL_CFG = (32, 32, "A", 64, 64, 64, "A", 128, 128, 128)


def small_cnn(num_classes: int = 10, in_channels: int = 1, image_size: int = 8,
              mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,)) -> nn.Sequential:
    """A small VGG-style CNN for 8x8 digits or 28x28 MNIST.

    Eight conv-BN-ReLU layers, two average pools and a 256-unit hidden layer: nine spiking layers,
    deep enough for the classic conversions to show their latency, small enough for a CPU.
    """
    if image_size % 4:
        raise ValueError(f"small_cnn needs an image size divisible by 4, got {image_size}")
    layers: list[nn.Module] = [Normalize(mean, std)]
    cin = in_channels
    for v in SMALL_CFG:
        if v == "A":
            layers.append(nn.AvgPool2d(2))
        else:
            layers += _conv_bn_relu(cin, v)
            cin = v
    side = image_size // 4
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin * side * side, 256), nn.ReLU(),
                         nn.Linear(256, num_classes))


VGG16_CFG = (64, 64, "A", 128, 128, "A", 256, 256, 256, "A", 512, 512, 512, "A", 512, 512, 512, "A")
# The medium profile's network: six convolutions and one hidden layer, seven spiking layers in all, small
# enough that an epoch of CIFAR-10 takes well under a minute and a half on two CPU cores.
VGG8_CFG = (32, "A", 64, 64, "A", 128, 128, "A", 256, "A")


class VGG(nn.Module):
    """A VGG for 32x32 inputs: conv-BN-ReLU layers and 2x2 average pools as ``cfg`` lists them ("A" is a
    pool), then hidden ReLU layers of the sizes in ``hidden``. The defaults are VGG-16: 13 convolutions
    and a 4096-4096 classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                 cfg: Sequence = VGG16_CFG, hidden: Sequence[int] = (4096, 4096), dropout: float = 0.5) -> None:
        super().__init__()
        step = 2 ** list(cfg).count("A")
        if image_size % step:
            raise ValueError(f"this VGG needs images whose side is a multiple of {step}, got {image_size}x{image_size}; "
                             "use --model small_cnn for small images")
        layers: list[nn.Module] = [Normalize(mean, std)]
        cin, side = in_channels, image_size
        for v in cfg:
            if v == "A":
                layers.append(nn.AvgPool2d(2))
                side //= 2
            else:
                layers += _conv_bn_relu(cin, v)
                cin = v
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = [nn.Flatten()]
        width = cin * side * side
        for h in hidden:
            head += [nn.Linear(width, h), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
            width = h
        self.classifier = nn.Sequential(*head, nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class PreActBlock(nn.Module):
    """Pre-activation residual block with every activation a module (``relu1`` feeds the shortcut too).

    Between spiking layers everything is linear, so the residual stream carries currents and the
    addition is exact in the converted network.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
                         if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreActResNet-18 (He et al. 2016) in a conversion-safe form, for 32x32 inputs."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)) -> None:
        super().__init__()
        self.stem = nn.Sequential(Normalize(mean, std), nn.Conv2d(in_channels, 64, 3, padding=1, bias=False))
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def build_model(name: str, num_classes: int, in_channels: int, image_size: int,
                mean: Sequence[float], std: Sequence[float], rnl: bool = True, p: float = 0.95) -> nn.Module:
    """Build a model by name; with ``rnl=True`` every ReLU becomes a Rate Norm Layer with one shared scale."""
    kwargs = dict(num_classes=num_classes, in_channels=in_channels, image_size=image_size, mean=mean, std=std)
    if name == "small_cnn":
        model = small_cnn(**kwargs)
    elif name == "vgg16":
        model = VGG(**kwargs)
    elif name == "vgg8":
        model = VGG(**kwargs, cfg=VGG8_CFG, hidden=(256,), dropout=0.0)
    elif name == "preact_resnet18":
        model = PreActResNet18(**kwargs)
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return replace_relu(model, shared=True, p=p) if rnl else model
