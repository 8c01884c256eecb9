"""Semi-supervised losses and the consistency trainer (the Waterloo report, plus FixMatch).

Every loss takes logits or features of a batch and returns a scalar to minimise. The
trainer combines them with weights from params.yaml; a weight of 0 switches a loss off (and
skips its compute), so the ablation table is a sweep over weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import random_affine, random_cutout, random_thicken, to_input
from .evaluation import map_batches
from .train import CheckpointCallback, EpochCallback, Step, TrainResult, fit_steps


def cluster_loss(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Mean Euclidean distance from each feature vector to its nearest class centroid."""
    return torch.cdist(features, centroids).min(dim=1).values.mean()


def consistency_loss(logits: torch.Tensor, logits_augmented: torch.Tensor) -> torch.Tensor:
    """MSE between the class probabilities of an image and of an augmented view of it."""
    return F.mse_loss(logits.softmax(1), logits_augmented.softmax(1))


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


def class_centroids(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, n_classes: int, batch_size: int = 1000
) -> torch.Tensor:
    """Mean feature vector (`model.features`) of the labeled images of each class."""
    feats = map_batches(model.features, x, batch_size, x.device)
    sums = torch.zeros(n_classes, feats.shape[1], device=feats.device).index_add_(0, y, feats)
    return sums / torch.bincount(y, minlength=n_classes).clamp(min=1).unsqueeze(1).to(feats)


# The train_consistency params that shape one step (`consistency_step`'s options).
STEP_KEYS = (
    "batch_size",
    "unlabeled_ratio",
    "weights",
    "threshold",
    "weak_augment",
    "strong_augment",
    "cutout",
    "adaptive_threshold",
    "labeled_thicken",
)


def consistency_step(
    model: nn.Module,
    x_labeled: torch.Tensor,
    y_labeled: torch.Tensor,
    x_unlabeled: torch.Tensor,
    *,
    batch_size: int,
    unlabeled_ratio: int,
    weights: dict[str, float],
    threshold: float,
    weak_augment: dict[str, float],
    strong_augment: dict[str, float],
    cutout: int,
    generator: torch.Generator,
    teacher: nn.Module | None = None,
    centroids: list[torch.Tensor] | None = None,
    adaptive_threshold: bool = False,
    labeled_thicken: float = 0.0,
) -> Step:
    """One consistency step: `batch_size` labeled images (weakly augmented) and
    `unlabeled_ratio * batch_size` unlabeled ones, each in a weak and a strong view (a
    larger random affine plus cutout); one forward pass over the concatenated batch feeds
    every loss of non-zero weight (see `train_consistency`).

    Pseudo-labels come from `teacher` (e.g. a moving average of `model`) when given, else
    from the model itself. `centroids` is a holder whose first item is the current class
    centroids of the labeled images, kept up to date by the caller; the cluster loss
    (`weights["cluster"]` > 0) reads it. With `adaptive_threshold` the pseudo-labels use
    FlexMatch's per-class thresholds (`PseudoLabelLoss`; its per-image memory is
    `Step.state`, part of the training state). A `labeled_thicken` fraction of the labeled
    images has its strokes thickened (`random_thicken`).
    """
    device = next(model.parameters()).device
    x_labeled, y_labeled = x_labeled.to(device), y_labeled.long().to(device)
    x_unlabeled = x_unlabeled.to(device)
    n_unlabeled = unlabeled_ratio * batch_size
    weak_needs_grad = any(weights[k] > 0 for k in ("cluster", "consistency", "entropy"))
    loss_pseudo_label = PseudoLabelLoss(
        threshold, adaptive=adaptive_threshold, n_unlabeled=len(x_unlabeled), device=device
    )

    def draw() -> tuple[torch.Tensor, ...]:
        idx = torch.randint(len(x_labeled), (batch_size,), generator=generator).to(device)
        uidx = torch.randint(len(x_unlabeled), (n_unlabeled,), generator=generator).to(device)
        x_l = random_affine(to_input(x_labeled[idx]), **weak_augment, generator=generator)
        x_l = random_thicken(x_l, labeled_thicken, generator)
        x_u = to_input(x_unlabeled[uidx])
        x_weak = random_affine(x_u, **weak_augment, generator=generator)
        x_strong = random_cutout(
            random_affine(x_u, **strong_augment, generator=generator), cutout, generator
        )
        return x_l, y_labeled[idx], x_weak, x_strong, uidx

    def loss(
        x_l: torch.Tensor,
        y_l: torch.Tensor,
        x_weak: torch.Tensor,
        x_strong: torch.Tensor,
        uidx: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if weak_needs_grad:
            feats = model.features(torch.cat([x_l, x_weak, x_strong]))
            logits = model.classifier(feats)
            logits_l, logits_weak, logits_strong = logits.split(
                [batch_size, n_unlabeled, n_unlabeled]
            )
            feats_weak = feats[batch_size : batch_size + n_unlabeled]
        else:
            logits_l, logits_strong = model(torch.cat([x_l, x_strong])).split(
                [batch_size, n_unlabeled]
            )
            logits_weak = None
        if teacher is not None:
            with torch.no_grad():
                logits_target = teacher(x_weak)
        elif logits_weak is None:
            with torch.no_grad():
                logits_target = model(x_weak)
        else:
            logits_target = logits_weak
        loss_ce = F.cross_entropy(logits_l, y_l)
        total = loss_ce
        stats = {"train/ce": loss_ce.item()}
        if weights["cluster"] > 0:
            loss_cluster = cluster_loss(feats_weak, centroids[0])
            total = total + weights["cluster"] * loss_cluster
            stats["train/cluster"] = loss_cluster.item()
        if weights["consistency"] > 0:
            loss_consistency = consistency_loss(logits_weak, logits_strong)
            total = total + weights["consistency"] * loss_consistency
            stats["train/consistency"] = loss_consistency.item()
        if weights["entropy"] > 0:
            loss_entropy = entropy_loss(logits_weak)
            total = total + weights["entropy"] * loss_entropy
            stats["train/entropy"] = loss_entropy.item()
        if weights["pseudo_label"] > 0:
            loss_pl, mask_rate = loss_pseudo_label(logits_target, logits_strong, uidx)
            total = total + weights["pseudo_label"] * loss_pl
            stats["train/pseudo_label"] = loss_pl.item()
            stats["train/confident_fraction"] = mask_rate.item()
        stats["train/loss"] = total.item()
        stats["train/accuracy"] = (logits_l.argmax(1) == y_l).float().mean().item()
        return total, stats

    return Step(draw, loss, images=batch_size + 2 * n_unlabeled, state=loss_pseudo_label.state)


def train_consistency(
    model: nn.Module,
    x_labeled: torch.Tensor,
    y_labeled: torch.Tensor,
    x_unlabeled: torch.Tensor,
    *,
    epochs: int,
    steps_per_epoch: int,
    batch_size: int,
    unlabeled_ratio: int,
    lr: float,
    lr_schedule: str,
    weight_decay: float,
    weights: dict[str, float],
    threshold: float,
    weak_augment: dict[str, float],
    strong_augment: dict[str, float],
    cutout: int,
    ema_decay: float,
    device: torch.device,
    teacher: str = "student",
    generator: torch.Generator,
    x_val: torch.Tensor | None = None,
    y_val: torch.Tensor | None = None,
    on_epoch: EpochCallback | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    resume: dict[str, Any] | None = None,
    adaptive_threshold: bool = False,
    labeled_thicken: float = 0.0,
) -> TrainResult:
    """Cross-entropy on labeled images plus weighted unlabeled losses (`consistency_step`).

    Each step draws `batch_size` labeled images (weakly augmented, a `labeled_thicken`
    fraction of them with thickened strokes) and
    `unlabeled_ratio * batch_size` unlabeled images, each seen in a weak and a strong view
    (a larger random affine plus cutout). One forward pass over the concatenated batch
    feeds every loss:
    - `cluster`: weak-view features to their nearest labeled-class centroid, centroids
      recomputed from the labeled images at the start of every epoch (the report);
    - `consistency`: MSE between weak- and strong-view probabilities (the report used the
      plain image and one fixed affine);
    - `entropy`: entropy of weak-view predictions (the report's term, with the sign fixed);
    - `pseudo_label`: FixMatch's thresholded pseudo-label cross-entropy on the strong view,
      with FlexMatch's per-class thresholds when `adaptive_threshold`.
    A loss with weight 0 is not computed; when the weak view feeds no gradient-carrying
    loss it is forwarded without autograd, which saves about a third of the step.
    """
    model.to(device)
    x_labeled, y_labeled = x_labeled.to(device), y_labeled.long().to(device)
    n_classes = int(model.classifier[-1].out_features)
    # The pseudo-label teacher: the trained weights themselves (FixMatch) or their moving
    # average (a mean teacher: steadier targets).
    ema = copy.deepcopy(model) if teacher == "ema" else None
    centroids: list[torch.Tensor] = []

    def refresh_centroids(epoch: int) -> None:
        if weights["cluster"] > 0:
            centroids[:] = [class_centroids(model, x_labeled, y_labeled, n_classes)]

    step = consistency_step(
        model, x_labeled, y_labeled, x_unlabeled,
        batch_size=batch_size, unlabeled_ratio=unlabeled_ratio, weights=weights,
        threshold=threshold, weak_augment=weak_augment, strong_augment=strong_augment,
        cutout=cutout, generator=generator, teacher=ema, centroids=centroids,
        adaptive_threshold=adaptive_threshold, labeled_thicken=labeled_thicken,
    )  # fmt: skip
    return fit_steps(
        model,
        step,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        lr=lr,
        weight_decay=weight_decay,
        device=device,
        generator=generator,
        lr_schedule=lr_schedule,
        ema_decay=ema_decay,
        ema=ema,
        x_val=x_val,
        y_val=y_val,
        on_epoch_start=refresh_centroids,
        on_epoch=on_epoch,
        on_checkpoint=on_checkpoint,
        resume=resume,
    )
