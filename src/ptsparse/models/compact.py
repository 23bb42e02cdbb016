"""The compact reference model: a MobileNetV2-style CNN for 1x28x28 inputs (Fashion-MNIST).

Inverted residual blocks (Sandler et al., 2018): a 1x1 expansion, a depthwise 3x3 convolution and a linear 1x1
projection, each followed by BatchNorm, with an identity shortcut wherever stride and width allow. Depthwise
layers hold few weights each but decide whole channels, which is where post-training sparsity is hardest: the
reason this model sits beside the ResNet-20 in the benchmark.
"""

from __future__ import annotations

import torch
from torch import nn

# (expansion, output channels, blocks, stride of the first block): 28x28 -> 14x14 -> 7x7.
STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (4, 24, 2, 2),
    (4, 32, 3, 2),
    (4, 64, 2, 1),
    (4, 96, 1, 1),
)


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
             activation: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups,
                  bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if activation:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expansion (left out when the expansion is 1), depthwise 3x3, linear 1x1 projection."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = [] if expansion == 1 else [_conv_bn(in_channels, hidden, 1)]
        layers += [_conv_bn(hidden, hidden, 3, stride=stride, groups=hidden),
                   _conv_bn(hidden, out_channels, 1, activation=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class CompactMobileNet(nn.Module):
    """MobileNetV2-style classifier for small grey images (about 0.14M parameters).

    Args:
        num_classes: size of the output layer.
        in_channels: channels of the input images.
        stem_channels: channels of the first 3x3 convolution.
        head_channels: channels of the last 1x1 convolution, before pooling.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, stem_channels: int = 16,
                 head_channels: int = 256) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, stem_channels, 3)
        blocks, channels = [], stem_channels
        for expansion, width, count, stride in STAGES:
            for index in range(count):
                blocks.append(InvertedResidual(channels, width, stride if index == 0 else 1, expansion))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn(channels, head_channels, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def compact_mobilenet(num_classes: int = 10, in_channels: int = 1) -> CompactMobileNet:
    """Builds the compact reference MobileNet with random weights."""
    return CompactMobileNet(num_classes=num_classes, in_channels=in_channels)
