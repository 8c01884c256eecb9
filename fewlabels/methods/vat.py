"""Virtual adversarial training (Miyato et al., 2018, "Virtual Adversarial Training: A
Regularization Method for Supervised and Semi-Supervised Learning").

Cross-entropy on the labeled images plus, on unlabeled images, the local distributional
smoothness: the KL divergence between the prediction for an image and for the image moved
by `eps` in the direction that changes the prediction most. That direction is found by one
power iteration: the gradient of the KL at a random `xi`-sized step. With `entropy_weight`
> 0 the unlabeled predictions are also sharpened (the paper's VAT + EntMin). Images are
randomly affine-augmented, and the evaluated weights are a moving average of the trained
ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ..config import Affine, TrainingConfig, boolean, integer, knob, list_of, number
from ..data import random_affine, to_input
from ..losses import entropy_loss
from ..models import WATERLOO_SIZES, Network, classifier
from ..train import Run, SplitData, Step, TrainResult, fit_steps, loop_of

DESCRIPTION = "Waterloo CNN + virtual adversarial training (VAT + entropy minimisation)"
# The VAT paper's MNIST figure at 100 labels: 1.36% test error (VAT + EntMin, conv-large).
REPORTED = {("mnist", 100): ("VAT paper", 0.9864)}


@dataclass(frozen=True, kw_only=True)
class Config(TrainingConfig):
    unlabeled_ratio: int = knob(integer(minimum=1))
    channels: list[int] = knob(list_of(integer(minimum=1), min_len=3))
    hidden: int = knob(integer(minimum=1))
    batch_norm: bool = knob(boolean)
    augment: Affine
    xi: float = knob(number(0, open_low=True))
    eps: float = knob(number(0, open_low=True))
    vat_weight: float = knob(number(0))
    entropy_weight: float = knob(number(0))
    ema_decay: float = knob(number(0, 1))


def build(cfg: Config, n_classes: int) -> tuple[nn.Module, dict[str, Network]]:
    return classifier("waterloo_cnn", n_classes, cfg, WATERLOO_SIZES)


def _unit(d: torch.Tensor) -> torch.Tensor:
    """Each image's perturbation scaled to L2 norm 1. Scaled by its largest entry first, as
    the paper's code does: the power iteration's gradient can be far below float32's
    resolution of a norm (1e-15 per image at `xi` 1e-6)."""
    d = d / d.flatten(1).abs().amax(1).clamp_min(1e-30).view(-1, 1, 1, 1)
    return d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


def _kl(logits_target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_target || p) averaged over the batch; the target is a fixed distribution."""
    return F.kl_div(logits.log_softmax(1), logits_target.log_softmax(1), log_target=True,
                    reduction="batchmean")  # fmt: skip


@contextmanager
def frozen_batch_statistics(model: nn.Module) -> Iterator[None]:
    """Batch norm still normalises with each batch's statistics, but the perturbed batches
    do not move the running statistics that evaluation uses (the paper's
    `update_batch_stats=False`)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum


def virtual_adversarial_loss(
    model: nn.Module, x: torch.Tensor, logits: torch.Tensor, xi: float, eps: float
) -> torch.Tensor:
    """The local distributional smoothness of `model` at `x` (whose logits are `logits`,
    the fixed target): KL(p(x) || p(x + r_adv)) with r_adv of norm `eps` along the
    direction one power iteration from a random `xi`-sized step finds."""
    target = logits.detach()
    d = _unit(torch.randn(x.shape, dtype=x.dtype, device=x.device)).requires_grad_()
    with frozen_batch_statistics(model):
        grad = torch.autograd.grad(_kl(target, model(x + xi * d)), d)[0]
        r_adv = eps * _unit(grad)
        return _kl(target, model(x + r_adv))


def train_step(
    model: nn.Module, data: SplitData, cfg: Config, run: Run, ema: AveragedModel | None = None
) -> Step:
    """One VAT step: `batch_size` labeled images and `unlabeled_ratio * batch_size`
    unlabeled ones, all randomly augmented; one forward pass over both feeds the
    cross-entropy and the unlabeled predictions whose smoothness and entropy are the
    unlabeled losses."""
    device, generator = run.device, run.generator
    x_labeled, y_labeled, x_unlabeled = data.x_labeled, data.y_labeled.long(), data.x_unlabeled
    batch_size, n_unlabeled = cfg.batch_size, cfg.unlabeled_ratio * cfg.batch_size

    def draw() -> tuple[torch.Tensor, ...]:
        idx = torch.randint(len(x_labeled), (batch_size,), generator=generator).to(device)
        uidx = torch.randint(len(x_unlabeled), (n_unlabeled,), generator=generator).to(device)
        x_l = random_affine(to_input(x_labeled[idx]), cfg.augment, generator)
        x_u = random_affine(to_input(x_unlabeled[uidx]), cfg.augment, generator)
        return x_l, y_labeled[idx], x_u

    def loss(
        x_l: torch.Tensor, y_l: torch.Tensor, x_u: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logits_l, logits_u = model(torch.cat([x_l, x_u])).split([batch_size, n_unlabeled])
        loss_ce = F.cross_entropy(logits_l, y_l)
        loss_vat = virtual_adversarial_loss(model, x_u, logits_u, cfg.xi, cfg.eps)
        loss_entropy = entropy_loss(logits_u)
        total = loss_ce + cfg.vat_weight * loss_vat + cfg.entropy_weight * loss_entropy
        return total, {
            "train/ce": loss_ce.item(),
            "train/vat": loss_vat.item(),
            "train/entropy": loss_entropy.item(),
            "train/loss": total.item(),
            "train/accuracy": (logits_l.argmax(1) == y_l).float().mean().item(),
        }

    return Step(draw, loss, images=batch_size + n_unlabeled)


def train(model: nn.Module, data: SplitData, cfg: Config, run: Run) -> TrainResult:
    step = train_step(model, data, cfg, run)
    return fit_steps(model, step, loop_of(cfg, ema_decay=cfg.ema_decay), run)
