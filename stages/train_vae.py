"""Stage train_vae: the M1 VAE (Kingma et al.) on every training image of vae_svm.dataset.

No labels enter here: the VAE learns from the images alone, and `vae_svm@<labels>` then
fits an SVM on the latent means of each labeled set. Resumable like train_baseline
(models/vae/checkpoint.pt after every epoch). Also draws plots/vae/reconstructions.png
and plots/vae/latent_pca.png (latent means of training images, coloured by class: a
picture only, no model is fitted to those labels).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display: figures go straight to files
import matplotlib.pyplot as plt
import numpy as np
import torch

from fewlabels.config import load_params, run_stage
from fewlabels.data import class_balanced_split, to_input
from fewlabels.io import save_figure
from fewlabels.methods import parse_method_config, vae
from fewlabels.models.vae import VAE
from fewlabels.paths import METRICS_DIR, PLOTS_DIR, load_raw, model_file
from fewlabels.resume import RunRecord, fit_and_save, start_run
from fewlabels.svm import encode_means

N_SHOWN = 12  # images in the reconstruction plot
N_PROJECTED = 5000  # training images in the latent plot


def training_pool(y_train: torch.Tensor, seed: int, pool_size: int) -> torch.Tensor:
    """Indices of the training images to use: all, or a seeded subset of `pool_size`.

    The subset `class_balanced_split` draws for the same seed (its labeled and unlabeled
    sets together), so the labeled sets of vae_svm@<labels> lie inside it.
    """
    n_classes = len(torch.unique(y_train))
    split = class_balanced_split(y_train.numpy(), n_classes, 0, seed, pool_size)
    return torch.from_numpy(np.sort(np.concatenate(list(split.values()))))


def plot_reconstructions(model: VAE, images: torch.Tensor) -> plt.Figure:
    with torch.no_grad():
        x = to_input(images)
        recon = torch.sigmoid(model.decode(model.encode(x)[0]))
    fig, axes = plt.subplots(2, len(images), figsize=(len(images), 2.3))
    for col, (original, decoded) in enumerate(zip(x, recon, strict=True)):
        for row, picture in enumerate((original, decoded)):
            axes[row, col].imshow(picture[0], cmap="gray", vmin=0, vmax=1)
            axes[row, col].axis("off")
    fig.suptitle("training images (top) and reconstructions from the latent mean (bottom)")
    return fig


def plot_latent_pca(means: torch.Tensor, labels: torch.Tensor) -> plt.Figure:
    centred = means - means.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    xy = (centred @ v[:2].T).numpy()
    fig, ax = plt.subplots(figsize=(6, 5))
    scatter = ax.scatter(xy[:, 0], xy[:, 1], c=labels.numpy(), cmap="tab10", s=3, alpha=0.6)
    ax.legend(*scatter.legend_elements(), title="class", fontsize=7, loc="best")
    ax.set(xlabel="PC 1", ylabel="PC 2", title="VAE latent means, first two principal axes")
    return fig


def main() -> None:
    params = load_params()
    cfg = parse_method_config("vae", params)
    run = start_run(params)
    device = run.device
    data = load_raw(cfg.dataset)
    pool = training_pool(data["y_train"], params["seed"], cfg.pool_size)
    images = data["x_train"][pool].to(device)
    model, parts = vae.build(cfg, n_classes=0)
    model.to(device)
    record = RunRecord(
        config={"seed": params["seed"], "dataset": cfg.dataset, "vae": cfg.training()},
        indices=[pool],
        meta={"dataset": cfg.dataset, "n_images": len(pool)},
        model_dir=model_file("vae").parent,
        live_dir=METRICS_DIR / "train_vae",
    )
    print(f"vae: {len(pool)} unlabeled {cfg.dataset} images, {cfg.epochs} epochs on {device}")
    fit_and_save(lambda run: vae.train(model, images, cfg, run), run, model, parts, record)

    model.cpu().eval()
    x_train, y_train = data["x_train"], data["y_train"]
    figure = plot_reconstructions(model, x_train[pool[:N_SHOWN]])
    save_figure(PLOTS_DIR / "vae" / "reconstructions.png", figure)
    # The pool is in index order, and the training set in no particular class order.
    projected = pool[:N_PROJECTED]
    means = encode_means(model, x_train[projected], 1000, torch.device("cpu"))
    save_figure(PLOTS_DIR / "vae" / "latent_pca.png", plot_latent_pca(means, y_train[projected]))


if __name__ == "__main__":
    run_stage(main)
