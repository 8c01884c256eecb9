"""Predictions and classification metrics on in-memory uint8 images."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import to_input


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device
) -> torch.Tensor:
    """Logits of `model` for uint8 images (N, H, W), computed in eval mode, returned on CPU."""
    was_training = model.training
    model.eval()
    outputs = [
        model(to_input(images[i : i + batch_size].to(device))).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    model.train(was_training)
    return torch.cat(outputs)


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Counts (n_classes, n_classes), rows = true class, columns = predicted class."""
    flat = y_true.long() * n_classes + y_pred.long()
    return torch.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def classification_metrics(logits: torch.Tensor, y_true: torch.Tensor) -> dict[str, float]:
    """Accuracy (fraction in 0..1), mean cross-entropy, and accuracy of each true class."""
    n_classes = logits.shape[1]
    y_true = y_true.long()
    y_pred = logits.argmax(1)
    matrix = confusion_matrix(y_true, y_pred, n_classes)
    per_class = matrix.diag().float() / matrix.sum(1).clamp(min=1).float()
    return {
        "accuracy": float((y_pred == y_true).float().mean()),
        "loss": float(F.cross_entropy(logits, y_true)),
        **{f"class_{c}_accuracy": float(a) for c, a in enumerate(per_class)},
    }
