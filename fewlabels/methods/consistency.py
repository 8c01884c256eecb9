"""The Waterloo report's CNN with unlabeled-image losses, plus FixMatch and FlexMatch.

Cross-entropy on the labeled images plus, on unlabeled images, the report's cluster,
consistency and entropy losses and FixMatch's confidence-thresholded pseudo-labels (each
weighted in params.yaml; weight 0 switches a loss off and skips its compute, so an
ablation is a sweep over weights). The evaluated and saved weights are a moving average
of the trained ones when `ema_decay` > 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ..config import (
    Affine,
    TrainingConfig,
    boolean,
    check_teacher,
    choice,
    integer,
    knob,
    list_of,
    number,
)
from ..data import random_affine, random_cutout, random_thicken, to_input
from ..evaluation import map_batches
from ..losses import PseudoLabelLoss, entropy_loss
from ..models import WATERLOO_SIZES, Network, classifier
from ..train import Run, SplitData, Step, TrainResult, fit_steps, loop_of, moving_average

DESCRIPTION = "Waterloo CNN + unlabeled losses (thresholded pseudo-labels, EMA)"
# The Waterloo report gives 98.28% at 6000 labels and "95% plus" below 1% of labels.
REPORTED = {("mnist", 6000): ("Waterloo report", 0.9828)}
# Where pseudo-labels come from: the trained weights (FixMatch) or their moving average.
TEACHERS = ("student", "ema")


@dataclass(frozen=True)
class LossWeights:
    """Weights of the unlabeled losses; 0 switches a loss off."""

    cluster: float = knob(number(0))
    consistency: float = knob(number(0))
    entropy: float = knob(number(0))
    pseudo_label: float = knob(number(0))


@dataclass(frozen=True, kw_only=True)
class Config(TrainingConfig):
    unlabeled_ratio: int = knob(integer(minimum=1))
    channels: list[int] = knob(list_of(integer(minimum=1), min_len=3))
    hidden: int = knob(integer(minimum=1))
    batch_norm: bool = knob(boolean)
    weights: LossWeights
    threshold: float = knob(number(0, 1))
    adaptive_threshold: bool = knob(boolean)
    ema_decay: float = knob(number(0, 1))
    teacher: str = knob(choice(TEACHERS))
    weak_augment: Affine
    strong_augment: Affine
    cutout: int = knob(integer(minimum=0))
    labeled_thicken: float = knob(number(0, 1))

    def check(self, key: str) -> None:
        check_teacher(self.teacher, self.ema_decay, key)


def build(cfg: Config, n_classes: int) -> tuple[nn.Module, dict[str, Network]]:
    return classifier("waterloo_cnn", n_classes, cfg, WATERLOO_SIZES)


def cluster_loss(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Mean Euclidean distance from each feature vector to its nearest class centroid."""
    return torch.cdist(features, centroids).min(dim=1).values.mean()


def consistency_loss(logits: torch.Tensor, logits_augmented: torch.Tensor) -> torch.Tensor:
    """MSE between the class probabilities of an image and of an augmented view of it."""
    return F.mse_loss(logits.softmax(1), logits_augmented.softmax(1))


def class_centroids(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, n_classes: int, batch_size: int = 1000
) -> torch.Tensor:
    """Mean feature vector (`model.features`) of the labeled images of each class."""
    feats = map_batches(model.features, x, batch_size, x.device)
    sums = torch.zeros(n_classes, feats.shape[1], device=feats.device).index_add_(0, y, feats)
    return sums / torch.bincount(y, minlength=n_classes).clamp(min=1).unsqueeze(1).to(feats)


def train_step(
    model: nn.Module, data: SplitData, cfg: Config, run: Run, ema: AveragedModel | None = None
) -> Step:
    """One step: `batch_size` labeled images (weakly augmented, a `labeled_thicken`
    fraction with thickened strokes) and `unlabeled_ratio * batch_size` unlabeled ones,
    each in a weak and a strong view (a larger random affine plus cutout); one forward
    pass over the concatenated batch feeds every loss of non-zero weight:
    - `cluster`: weak-view features to their nearest labeled-class centroid, centroids
      recomputed from the labeled images at the start of every epoch (the report);
    - `consistency`: MSE between weak- and strong-view probabilities (the report used the
      plain image and one fixed affine);
    - `entropy`: entropy of weak-view predictions (the report's term, with the sign fixed);
    - `pseudo_label`: FixMatch's thresholded pseudo-label cross-entropy on the strong view,
      with FlexMatch's per-class thresholds when `adaptive_threshold` (its per-image
      memory is `Step.state`, part of the training state).
    Pseudo-labels come from the moving average `ema` with `teacher: ema` (a mean
    teacher), else from the model itself. When the weak view feeds no gradient-carrying loss it is
    forwarded without autograd, which saves about a third of the step.
    """
    device, generator = run.device, run.generator
    teacher = ema.module if ema is not None and cfg.teacher == "ema" else None
    x_labeled, y_labeled, x_unlabeled = data.x_labeled, data.y_labeled.long(), data.x_unlabeled
    batch_size, n_unlabeled = cfg.batch_size, cfg.unlabeled_ratio * cfg.batch_size
    weights = cfg.weights
    weak_needs_grad = any(w > 0 for w in (weights.cluster, weights.consistency, weights.entropy))
    n_classes = int(model.classifier[-1].out_features)
    loss_pseudo_label = PseudoLabelLoss(
        cfg.threshold, adaptive=cfg.adaptive_threshold, n_unlabeled=len(x_unlabeled), device=device
    )
    centroids: list[torch.Tensor] = []

    def refresh_centroids(epoch: int) -> None:
        if weights.cluster > 0:
            centroids[:] = [class_centroids(model, x_labeled, y_labeled, n_classes)]

    def draw() -> tuple[torch.Tensor, ...]:
        idx = torch.randint(len(x_labeled), (batch_size,), generator=generator).to(device)
        uidx = torch.randint(len(x_unlabeled), (n_unlabeled,), generator=generator).to(device)
        x_l = random_affine(to_input(x_labeled[idx]), cfg.weak_augment, generator)
        x_l = random_thicken(x_l, cfg.labeled_thicken, generator)
        x_u = to_input(x_unlabeled[uidx])
        x_weak = random_affine(x_u, cfg.weak_augment, generator)
        x_strong = random_cutout(
            random_affine(x_u, cfg.strong_augment, generator), cfg.cutout, generator
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
        if weights.cluster > 0:
            loss_cluster = cluster_loss(feats_weak, centroids[0])
            total = total + weights.cluster * loss_cluster
            stats["train/cluster"] = loss_cluster.item()
        if weights.consistency > 0:
            loss_consistency = consistency_loss(logits_weak, logits_strong)
            total = total + weights.consistency * loss_consistency
            stats["train/consistency"] = loss_consistency.item()
        if weights.entropy > 0:
            loss_entropy = entropy_loss(logits_weak)
            total = total + weights.entropy * loss_entropy
            stats["train/entropy"] = loss_entropy.item()
        if weights.pseudo_label > 0:
            loss_pl, mask_rate = loss_pseudo_label(logits_target, logits_strong, uidx)
            total = total + weights.pseudo_label * loss_pl
            stats["train/pseudo_label"] = loss_pl.item()
            stats["train/confident_fraction"] = mask_rate.item()
        stats["train/loss"] = total.item()
        stats["train/accuracy"] = (logits_l.argmax(1) == y_l).float().mean().item()
        return total, stats

    return Step(
        draw,
        loss,
        images=batch_size + 2 * n_unlabeled,
        state=loss_pseudo_label.state,
        on_epoch_start=refresh_centroids,
    )


def train(model: nn.Module, data: SplitData, cfg: Config, run: Run) -> TrainResult:
    """Cross-entropy on labeled images plus weighted unlabeled losses (`train_step`).
    The pseudo-label teacher is the trained weights themselves (FixMatch) or their moving
    average (a mean teacher: steadier targets)."""
    ema = moving_average(model, cfg.ema_decay) if cfg.teacher == "ema" else None
    step = train_step(model, data, cfg, run, ema)
    return fit_steps(model, step, loop_of(cfg, ema_decay=cfg.ema_decay), run, ema=ema)
