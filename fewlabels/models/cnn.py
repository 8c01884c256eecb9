"""The classifiers of the seed reports. Pure nn.Modules: no I/O, no training code."""

from __future__ import annotations

from torch import Tensor, nn


class BaselineCNN(nn.Module):
    """The SGAN report's compact supervised CNN.

    Two (3x3 conv + ReLU + 2x2 max-pool) blocks, then Linear(hidden) + ReLU + Dropout and
    a linear classifier. Input (N, 1, 28, 28) floats in [0, 1]; output class logits.
    """

    def __init__(
        self,
        n_classes: int = 10,
        channels: tuple[int, int] | list[int] = (32, 64),
        hidden: int = 128,
        dropout: float = 0.3,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        in_channels = 1
        for out_channels in channels:
            blocks += [
                nn.Conv2d(in_channels, out_channels, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            in_channels = out_channels
        side = image_size // 2 ** len(channels)
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Linear(in_channels * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """The CS229 report's linear softmax (`hidden=[]`) and fully connected net ([256])."""

    def __init__(self, n_classes: int = 10, hidden: list[int] = (), image_size: int = 28) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = image_size * image_size
        for units in hidden:
            layers += [nn.Linear(width, units), nn.ReLU(inplace=True)]
            width = units
        self.net = nn.Sequential(*layers, nn.Linear(width, n_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CS229CNN(nn.Module):
    """The CS229 report's 4-layer ([32]) and 5-layer ([32, 64]) CNNs.

    5x5 valid convolutions with ReLU, one 2x2 max-pool, Linear(hidden) + ReLU, classifier.
    """

    def __init__(
        self,
        n_classes: int = 10,
        channels: list[int] = (32,),
        hidden: int = 128,
        kernel: int = 5,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels, side = 1, image_size
        for out_channels in channels:
            layers += [nn.Conv2d(in_channels, out_channels, kernel), nn.ReLU(inplace=True)]
            in_channels, side = out_channels, side - kernel + 1
        side //= 2
        self.features = nn.Sequential(*layers, nn.MaxPool2d(2), nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Linear(in_channels * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class WaterlooCNN(nn.Module):
    """The Waterloo report's CNN: 3 x (3x3 valid conv + ReLU), max-pools after the first two,
    then Linear(576 -> hidden) + ReLU and a linear classifier.

    `features` (the flattened 64x3x3 conv output) is what the cluster loss pulls towards
    class centroids and what feature extraction reads; `forward` returns logits only, like
    every model here, so evaluation code needs no special case.
    """

    def __init__(
        self,
        n_classes: int = 10,
        channels: list[int] = (32, 64, 64),
        hidden: int = 300,
        batch_norm: bool = False,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels, side = 1, image_size
        for i, out_channels in enumerate(channels):
            layers.append(nn.Conv2d(in_channels, out_channels, 3))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_channels))
            in_channels, side = out_channels, side - 2
            # Pool, then ReLU: the same values and gradients as the report's ReLU then pool
            # (ReLU is non-decreasing, so it commutes with max), with the ReLU on a quarter
            # of the elements.
            if i < len(channels) - 1:
                layers.append(nn.MaxPool2d(2))
                side //= 2
            layers.append(nn.ReLU(inplace=True))
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Linear(in_channels * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
