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
    matrix = confusion_matrix(y_true, logits.argmax(1), n_classes).tolist()
    # Ratios of integer counts, so the JSON shows 0.9502 rather than a float32 artefact.
    correct = sum(matrix[c][c] for c in range(n_classes))
    return {
        "accuracy": correct / len(y_true),
        "loss": round(float(F.cross_entropy(logits, y_true)), 6),
        **{f"class_{c}_accuracy": matrix[c][c] / max(1, sum(matrix[c])) for c in range(n_classes)},
    }
