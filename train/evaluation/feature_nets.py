"""torchvision-compatible AlexNet, ResNet-50 and EfficientNet-B1 for MindEye's feature spaces.

torchvision cannot be installed in this project's environment, so these networks are
written out here. Each one has exactly torchvision's module tree, so its ``state_dict``
keys and shapes equal those of ``torchvision.models.alexnet`` / ``resnet50`` /
``efficientnet_b1`` and torchvision's published ``.pth`` files load into it unchanged
(train/evaluation/feature_extractors.py does the loading; Inception v3 is in
train/evaluation/feature_nets_inception.py). Layers without parameters (ReLU, pooling, dropout) keep
torchvision's positions in the ``nn.Sequential`` containers, because the key indices
(``features.3``, ``classifier.6``) depend on them. ReLUs are not in-place, so an
intermediate activation read as a feature (AlexNet ``features.4``) is never overwritten.

All networks take ImageNet-normalised images (N, 3, H, W) float32.
"""
from __future__ import annotations

import math

import torch
from torch import nn

IMAGENET_CLASSES = 1000  # output width of every torchvision ImageNet classifier head
# Input normalisation of torchvision's ImageNet weights (their weights.transforms()).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ---- AlexNet (torchvision's "one weird trick" variant, alexnet-owt-7be5be79.pth) ----------

ALEXNET_POOLED = 6  # torchvision's AdaptiveAvgPool2d((6, 6)) before the classifier
ALEXNET_HIDDEN = 4096
ALEXNET_DROPOUT = 0.5


class AlexNet(nn.Module):
    """AlexNet with torchvision's layer indices.

    ``features`` indices: 0 conv1, 1 ReLU, 2 pool, 3 conv2, 4 ReLU, 5 pool, 6 conv3, 7 ReLU,
    8 conv4, 9 ReLU, 10 conv5, 11 ReLU, 12 pool. ``classifier``: 0 dropout, 1 fc6, 2 ReLU,
    3 dropout, 4 fc7, 5 ReLU, 6 fc8.
    """

    def __init__(self, num_classes: int = IMAGENET_CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((ALEXNET_POOLED, ALEXNET_POOLED))
        self.classifier = nn.Sequential(
            nn.Dropout(ALEXNET_DROPOUT), nn.Linear(256 * ALEXNET_POOLED ** 2, ALEXNET_HIDDEN), nn.ReLU(),
            nn.Dropout(ALEXNET_DROPOUT), nn.Linear(ALEXNET_HIDDEN, ALEXNET_HIDDEN), nn.ReLU(),
            nn.Linear(ALEXNET_HIDDEN, num_classes),
        )

    def feature_map(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Output of ``features[index]``: (N, 3, H, W) -> (N, C, h, w).

        For H = W = 256: index 4 gives (N, 192, 31, 31), index 11 gives (N, 256, 15, 15);
        for 224: (N, 192, 27, 27) and (N, 256, 13, 13).
        """
        return self.features[: index + 1](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> logits (N, num_classes)."""
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ---- ResNet-50 (torchvision v1.5: stride on the 3x3 conv) ----------------------------------

RESNET50_BLOCKS = (3, 4, 6, 3)  # bottleneck blocks per stage (He et al. 2016, table 1)
RESNET_WIDTHS = (64, 128, 256, 512)  # bottleneck widths per stage
BOTTLENECK_EXPANSION = 4  # output channels = 4 x bottleneck width


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 with a residual; (N, C_in, H, W) -> (N, 4 * width, H / s, W / s)."""

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * BOTTLENECK_EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet50(nn.Module):
    """torchvision ``resnet50``: conv1/bn1, layer1..layer4 of Bottlenecks, avgpool, fc."""

    def __init__(self, num_classes: int = IMAGENET_CLASSES):
        super().__init__()
        stem = RESNET_WIDTHS[0]
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = stem
        for stage, (blocks, width) in enumerate(zip(RESNET50_BLOCKS, RESNET_WIDTHS)):
            stride = 1 if stage == 0 else 2
            layers = [Bottleneck(in_channels, width, stride)]
            in_channels = width * BOTTLENECK_EXPANSION
            layers += [Bottleneck(in_channels, width) for _ in range(blocks - 1)]
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_channels, num_classes)

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled layer4 output: (N, 3, H, W) -> (N, 2048)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> logits (N, num_classes)."""
        return self.fc(self.pooled_features(x))


# ---- EfficientNet-B1 (torchvision efficientnet_b1: width 1.0, depth 1.1) -------------------

# EfficientNet-B0 stages (Tan & Le 2019, table 1; torchvision _efficientnet_conf):
# (expand ratio, kernel, stride, in channels, out channels, layers)
EFFNET_B0_STAGES = (
    (1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1),
)
EFFNET_B1_DEPTH_MULT = 1.1  # B1 = B0 with ceil(1.1 x layers) per stage; width unchanged
EFFNET_HEAD_EXPANSION = 4  # last 1x1 conv: 4 x 320 = 1280 channels
EFFNET_SE_RATIO = 4  # squeeze channels = block input channels // 4
EFFNET_DROPOUT = 0.2


class ConvBNAct(nn.Sequential):
    """torchvision ``Conv2dNormActivation``: conv (no bias, 'same' padding) -> BN -> optional SiLU.

    Keys ``0.weight`` (conv) and ``1.*`` (BN); (N, C_in, H, W) -> (N, C_out, H / s, W / s).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1,
                 groups: int = 1, activation: bool = True):
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel, stride, padding=(kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        if activation:
            layers.append(nn.SiLU())
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision ``SqueezeExcitation``: x * sigmoid(fc2(silu(fc1(mean_hw(x))))); shape preserved."""

    def __init__(self, channels: int, squeeze_channels: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = nn.SiLU()
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand] -> depthwise kxk -> SE -> 1x1 project (+ input if shapes match).

    Stochastic depth is the identity at eval, so it has no module here (it has no parameters).
    """

    def __init__(self, expand_ratio: int, kernel: int, stride: int, in_channels: int, out_channels: int):
        super().__init__()
        expanded = in_channels * expand_ratio
        layers: list[nn.Module] = []
        if expanded != in_channels:
            layers.append(ConvBNAct(in_channels, expanded))
        layers += [
            ConvBNAct(expanded, expanded, kernel, stride, groups=expanded),
            SqueezeExcitation(expanded, max(1, in_channels // EFFNET_SE_RATIO)),
            ConvBNAct(expanded, out_channels, activation=False),
        ]
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


class EfficientNetB1(nn.Module):
    """torchvision ``efficientnet_b1``: features.0 stem, features.1..7 MBConv stages, features.8 head
    conv (1280), avgpool, classifier (dropout, linear)."""

    def __init__(self, num_classes: int = IMAGENET_CLASSES):
        super().__init__()
        stages: list[nn.Module] = [ConvBNAct(3, EFFNET_B0_STAGES[0][3], kernel=3, stride=2)]
        for expand, kernel, stride, in_channels, out_channels, layers in EFFNET_B0_STAGES:
            n_blocks = math.ceil(layers * EFFNET_B1_DEPTH_MULT)
            blocks = [MBConv(expand, kernel, stride, in_channels, out_channels)]
            blocks += [MBConv(expand, kernel, 1, out_channels, out_channels) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
        last = EFFNET_B0_STAGES[-1][4]
        stages.append(ConvBNAct(last, EFFNET_HEAD_EXPANSION * last))
        self.features = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(EFFNET_DROPOUT), nn.Linear(EFFNET_HEAD_EXPANSION * last, num_classes))

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """avgpool output, flattened: (N, 3, H, W) -> (N, 1280)."""
        return torch.flatten(self.avgpool(self.features(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> logits (N, num_classes)."""
        return self.classifier(self.pooled_features(x))
