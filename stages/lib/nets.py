"""Model architectures. Pure nn.Modules: no I/O, no data handling."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .config import PipelineError


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


ARCHITECTURES: dict[str, type[nn.Module]] = {
    "baseline_cnn": BaselineCNN,
}


def build_model(arch: str, **config: Any) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise PipelineError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**config)
