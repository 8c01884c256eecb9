"""Feature extraction, k-means pseudo-labels and robustness sets (fewlabels/pseudo.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewlabels.config import PipelineError
from fewlabels.data import to_input
from fewlabels.models import build_model
from fewlabels.pseudo import (
    embedding_network,
    extract_features,
    kmeans_pseudo_labels,
    robustness_sets,
)
from tests.conftest import synthetic_digits


def blobs(n_per_class: int, seed: int = 0, spread: float = 0.3):
    """Three well separated Gaussian blobs in 5-D, labelled 0, 1, 2."""
    rng = np.random.default_rng(seed)
    centres = np.eye(3, 5) * 10
    y = np.repeat(np.arange(3), n_per_class)
    x = centres[y] + spread * rng.standard_normal((len(y), 5))
    return x.astype(np.float32), y


@pytest.mark.parametrize("rule", ["knn", "majority", "nearest_centroid"])
def test_every_rule_recovers_well_separated_classes(rule):
    x_labeled, y_labeled = blobs(2, seed=1)
    x_unlabeled, y_hidden = blobs(50, seed=2)
    out = kmeans_pseudo_labels(
        x_labeled, y_labeled, x_unlabeled,
        rule=rule, n_clusters=6, n_init=2, n_neighbors=3, seed=0,
    )  # fmt: skip
    assert (out["label"] == y_hidden).all()
    assert out["label"].shape == out["confidence"].shape == out["cluster"].shape == (150,)
    assert ((out["confidence"] >= 0) & (out["confidence"] <= 1)).all()


def test_members_of_one_cluster_share_its_label_and_border_points_are_less_confident():
    x_labeled, y_labeled = blobs(3, seed=1)
    x_unlabeled, _ = blobs(40, seed=2)
    # One point exactly between the blobs of class 0 and class 1.
    midpoint = ((np.eye(3, 5)[0] + np.eye(3, 5)[1]) * 5).astype(np.float32)
    x_unlabeled = np.vstack([x_unlabeled, midpoint])
    out = kmeans_pseudo_labels(
        x_labeled, y_labeled, x_unlabeled,
        rule="knn", n_clusters=3, n_init=2, n_neighbors=1, seed=0,
    )  # fmt: skip
    for c in np.unique(out["cluster"]):
        assert len(np.unique(out["label"][out["cluster"] == c])) == 1
    assert out["confidence"][-1] < 0.2 < np.median(out["confidence"][:-1])


def test_pseudo_labels_are_seeded():
    x_labeled, y_labeled = blobs(2, seed=1)
    x_unlabeled, _ = blobs(30, seed=2, spread=4.0)  # overlapping: k-means depends on the seed
    kwargs = {"rule": "majority", "n_clusters": 5, "n_init": 1, "n_neighbors": 3}
    a = kmeans_pseudo_labels(x_labeled, y_labeled, x_unlabeled, seed=3, **kwargs)
    b = kmeans_pseudo_labels(x_labeled, y_labeled, x_unlabeled, seed=3, **kwargs)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_embedding_network_cuts_the_model_at_the_requested_layer():
    model = build_model("waterloo_cnn", channels=[4, 8, 8], hidden=16)
    x, _ = synthetic_digits(5)
    device = torch.device("cpu")
    penultimate = extract_features(embedding_network(model, "penultimate"), x, 2, device)
    conv = extract_features(embedding_network(model, "conv"), x, 2, device)
    assert penultimate.shape == (5, 16) and conv.shape == (5, 8 * 3 * 3)
    assert (penultimate >= 0).all()  # after the hidden ReLU
    # The classifier's last layer applied to the penultimate features gives the logits.
    logits = model.eval()(to_input(x))
    assert torch.allclose(model.classifier[-1](penultimate), logits, atol=1e-5)
    probabilities = extract_features(embedding_network(model, "probabilities"), x, 2, device)
    assert torch.allclose(probabilities, logits.softmax(1), atol=1e-6)


def test_a_model_without_feature_parts_is_refused():
    with pytest.raises(PipelineError, match="no features/classifier"):
        embedding_network(build_model("mlp", hidden=[8]), "penultimate")


def test_robustness_sets_are_deterministic_uint8_and_changed_as_asked():
    x, _ = synthetic_digits(6)
    kwargs = {"noise_std": 0.3, "rotate_deg": 90, "blur_sigma": 1.0, "seed": 0}
    sets = robustness_sets(x, **kwargs)
    again = robustness_sets(x, **kwargs)
    for name, images in sets.items():
        assert images.dtype == torch.uint8 and images.shape == x.shape
        assert torch.equal(images, again[name])
        assert not torch.equal(images, x)
    # A 90 degree turn makes the horizontal bar of image 0 vertical.
    bar_rows = (x[0] == 255).any(1).sum()
    assert (sets["rotation"][0] > 200).any(0).sum() <= bar_rows + 1
    # Blur keeps the total brightness (up to the edges) and lowers the peak.
    assert sets["blur"].max() < 255
    assert sets["blur"].float().sum().item() == pytest.approx(x.float().sum().item(), rel=0.05)
