"""Deep features, k-means pseudo-labels (the k-means report) and robustness test sets."""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.neighbors import KNeighborsClassifier
from torch import nn

from .config import PSEUDO_LABEL_RULES, PipelineError
from .data import affine_transform, gaussian_blur, to_input
from .evaluation import eval_mode, map_batches


def embedding_network(model: nn.Module, layer: str) -> nn.Module:
    """The part of a classifier whose output is used as the feature vector.

    `conv`: the flattened convolutional features (`model.features`); `penultimate`: the
    last hidden layer, i.e. everything but the final linear layer of `model.classifier`
    (in eval mode, so dropout is off); `probabilities`: the whole model, softmax over its
    K class logits (for the SGAN discriminator, the digits without "generated").
    """
    if layer == "probabilities":
        return nn.Sequential(model, nn.Softmax(dim=1))
    if hasattr(model, "embedding"):  # e.g. the SGAN discriminator
        return model.embedding(layer)
    if not hasattr(model, "features") or not hasattr(model, "classifier"):
        raise PipelineError(
            f"{type(model).__name__} has no features/classifier parts to extract features from"
        )
    if layer == "conv":
        return model.features
    return nn.Sequential(model.features, *list(model.classifier)[:-1])


def extract_features(
    network: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device
) -> torch.Tensor:
    """Feature vectors (N, D) float32 on CPU of uint8 images (N, H, W), in eval mode."""
    with eval_mode(network.to(device)):
        return map_batches(network, images, batch_size, device).cpu()


def _margin_confidence(distances: np.ndarray, cluster: np.ndarray, names: np.ndarray) -> np.ndarray:
    """1 - d(own centroid) / d(nearest centroid named another class): 0 on a border, 1 at
    the centre. How sure the clustering is of each image's pseudo-label.
    """
    own = distances[np.arange(len(cluster)), cluster]
    other_class = names[None, :] != names[cluster][:, None]
    rival = np.where(other_class, distances, np.inf).min(1)
    return np.where(np.isfinite(rival), 1 - own / np.maximum(rival, 1e-12), 1.0)


def kmeans_pseudo_labels(
    labeled_features: np.ndarray,
    labels: np.ndarray,
    unlabeled_features: np.ndarray,
    *,
    rule: str,
    n_clusters: int,
    n_init: int,
    n_neighbors: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """Cluster the unlabeled features with k-means and name every cluster with a class.

    Rules for naming a cluster:
    - `knn` (the report): a k-nearest-neighbour classifier fitted on the labeled features
      predicts each member; the cluster takes the most common prediction;
    - `majority`: the most common label among the labeled images k-means puts in the
      cluster (a cluster with none falls back to `knn`);
    - `nearest_centroid`: the class whose labeled-feature mean is nearest the cluster centre.
    Every member gets its cluster's name. Returns `label`, `confidence` (see
    `_margin_confidence`) and `cluster` per unlabeled image.
    """
    if rule not in PSEUDO_LABEL_RULES:
        raise PipelineError(f"unknown pseudo-label rule {rule!r}; known: {PSEUDO_LABEL_RULES}")
    classes = np.unique(labels)
    kmeans = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed)
    cluster = kmeans.fit_predict(unlabeled_features)
    centres = kmeans.cluster_centers_

    def knn_names() -> np.ndarray:
        knn = KNeighborsClassifier(n_neighbors=min(n_neighbors, len(labels)))
        knn.fit(labeled_features, labels)
        votes = np.zeros((n_clusters, len(classes)), dtype=np.int64)
        np.add.at(votes, (cluster, np.searchsorted(classes, knn.predict(unlabeled_features))), 1)
        return classes[votes.argmax(1)]

    if rule == "knn":
        names = knn_names()
    elif rule == "majority":
        votes = np.zeros((n_clusters, len(classes)), dtype=np.int64)
        np.add.at(votes, (kmeans.predict(labeled_features), np.searchsorted(classes, labels)), 1)
        names = np.where(votes.sum(1) > 0, classes[votes.argmax(1)], knn_names())
    else:
        class_means = np.stack([labeled_features[labels == c].mean(0) for c in classes])
        distance = ((centres[:, None, :] - class_means[None, :, :]) ** 2).sum(-1)
        names = classes[distance.argmin(1)]
    distances = kmeans.transform(unlabeled_features)
    return {
        "label": names[cluster],
        "confidence": _margin_confidence(distances, cluster, names).astype(np.float32),
        "cluster": cluster.astype(np.int64),
    }


# --- robustness test sets ------------------------------------------------------------


def robustness_sets(
    images: torch.Tensor, *, noise_std: float, rotate_deg: float, blur_sigma: float, seed: int
) -> dict[str, torch.Tensor]:
    """Deterministic corrupted copies of uint8 test images (N, H, W), as uint8.

    - `noise`: additive Gaussian noise of `noise_std` (in [0, 1] pixel units), clipped;
    - `rotation`: every image rotated by `rotate_deg`, alternating the sign so both
      directions are covered;
    - `blur`: separable Gaussian blur of `blur_sigma` pixels.
    The report drew these at random per image; fixed versions make runs comparable.
    """
    x = to_input(images)
    generator = torch.Generator().manual_seed(seed)
    noisy = x + noise_std * torch.randn(x.shape, generator=generator)

    sign = torch.where(torch.arange(len(x)) % 2 == 0, 1.0, -1.0)
    rotated = affine_transform(
        x,
        angle=sign * math.radians(rotate_deg),
        zoom=torch.ones(len(x)),
        shift=torch.zeros(len(x), 2),
    )

    blurred = gaussian_blur(x, blur_sigma)

    def to_uint8(t: torch.Tensor) -> torch.Tensor:
        return (t.clamp(0, 1) * 255).round().to(torch.uint8).squeeze(1)

    return {"noise": to_uint8(noisy), "rotation": to_uint8(rotated), "blur": to_uint8(blurred)}
