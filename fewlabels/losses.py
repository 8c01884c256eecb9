"""Losses on unlabeled images that several methods share: entropy minimisation and
FixMatch's confidence-thresholded pseudo-labels (with FlexMatch's per-class thresholds).

Every loss takes logits of a batch and returns a scalar to minimise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the predicted class distribution (minimising it sharpens predictions).

    The Waterloo report's code returns mean(sum p log p), the *negative* entropy, so its
    "entropy minimisation" term in fact pushed predictions towards uniform; this is the
    intended sign.
    """
    log_p = logits.log_softmax(1)
    return -(log_p.exp() * log_p).sum(1).mean()


def pseudo_label_loss(
    logits_weak: torch.Tensor, logits_strong: torch.Tensor, threshold: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """FixMatch: cross-entropy of the strong view against the weak view's confident argmax.

    Returns the loss (averaged over the whole batch, so few confident images give a small
    loss) and the fraction of images above `threshold` (a number, or one per image). No
    gradient flows into the target.
    """
    probs = logits_weak.detach().softmax(1)
    confidence, target = probs.max(1)
    mask = (confidence >= threshold).float()
    loss = (F.cross_entropy(logits_strong, target, reduction="none") * mask).mean()
    return loss, mask.mean()


def flexmatch_thresholds(
    threshold: float, confident_class: torch.Tensor, predicted: torch.Tensor, n_classes: int
) -> torch.Tensor:
    """FlexMatch's class-adaptive thresholds (Zhang et al. 2021), one per image.

    `confident_class` holds, for every unlabeled image, the class its weak view was last
    predicted with confidence >= `threshold` (-1: never yet). A class's learning effect is
    its count over the largest count, the never-confident images counted as one more
    "class" (the paper's warm-up: early on every class is barely learnt and every bar low);
    it is mapped through x / (2 - x) and scaled by `threshold`. So a class the model rarely
    predicts confidently gets a lower bar, and its uncertain images still teach it instead
    of drifting to a class that is learnt faster.
    """
    counts = torch.bincount(confident_class + 1, minlength=n_classes + 1)
    learned = counts[1:].float() / counts.max()
    return threshold * (learned / (2 - learned))[predicted]


class PseudoLabelLoss:
    """The pseudo-label loss of a training run: FixMatch's one `threshold`, or with
    `adaptive` FlexMatch's per-class thresholds (`flexmatch_thresholds`).

    Called as `loss(logits_weak, logits_strong, image_idx)` like `pseudo_label_loss`;
    `image_idx` are the batch's indices into the `n_unlabeled` unlabeled images. FlexMatch
    remembers, per unlabeled image, the class its weak view was last predicted with
    confidence >= `threshold` (-1: never yet): that memory is training state, exposed as
    `state` for `Step(state=...)` (empty without `adaptive`).
    """

    def __init__(
        self, threshold: float, *, adaptive: bool, n_unlabeled: int, device: torch.device
    ) -> None:
        self.threshold = threshold
        self.state: dict[str, torch.Tensor] = {}
        if adaptive:
            self.state["confident_class"] = torch.full(
                (n_unlabeled,), -1, dtype=torch.long, device=device
            )

    def __call__(
        self, logits_weak: torch.Tensor, logits_strong: torch.Tensor, image_idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.state:
            return pseudo_label_loss(logits_weak, logits_strong, self.threshold)
        memory = self.state["confident_class"]
        confidence, predicted = logits_weak.detach().softmax(1).max(1)
        bars = flexmatch_thresholds(self.threshold, memory, predicted, logits_weak.shape[1])
        sure = confidence >= self.threshold
        # amax: an image drawn twice in one batch gets one class, the same on every run (a
        # plain indexed write leaves the order of duplicates undefined).
        memory.scatter_reduce_(
            0, image_idx[sure], predicted[sure], reduce="amax", include_self=False
        )
        return pseudo_label_loss(logits_weak, logits_strong, bars)
