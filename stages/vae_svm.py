"""Stage vae_svm@<labels>: an RBF SVM on the VAE's latent means of the labeled images.

The labeled set is the split stage's for the same seed (class-balanced, nested across
budgets) drawn from vae_svm.dataset; C and gamma come from cross-validation on those
labeled images alone. Writes models/vae_svm_<labels>/model.pkl (the scaler + SVM, the
VAE stays in models/vae/) and metrics/vae_svm/<labels>.json (what the search chose).

    python -m stages.vae_svm 100
"""

from __future__ import annotations

import sys
import time

from fewlabels.checkpoint import load_trained
from fewlabels.config import (
    DATASET_CLASSES,
    PipelineError,
    check_budget,
    load_params,
    resolve_device,
    run_stage,
)
from fewlabels.data import class_balanced_split
from fewlabels.io import write_json
from fewlabels.methods import parse_method_config, vae
from fewlabels.paths import METRICS_DIR, load_raw, svm_file
from fewlabels.svm import encode_means, fit_rbf_svm, save_svm


def main() -> None:
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        raise PipelineError("usage: python -m stages.vae_svm <labels>, e.g. 100")
    n_labeled = int(sys.argv[1])
    params = load_params()
    cfg: vae.Config = parse_method_config("vae", params)
    check_budget("labels", n_labeled, DATASET_CLASSES[cfg.dataset])
    device = resolve_device(params["device"])

    encoder, _ = load_trained("vae", cfg.dataset)
    data = load_raw(cfg.dataset)
    labeled = class_balanced_split(
        data["y_train"].numpy(), n_labeled, 0, params["seed"], cfg.pool_size
    )["labeled_idx"]
    start = time.perf_counter()
    features = encode_means(encoder.to(device), data["x_train"][labeled], 1000, device).numpy()
    svm, chosen = fit_rbf_svm(
        features,
        data["y_train"][labeled].numpy(),
        c_grid=cfg.svm_c,
        gamma_grid=cfg.svm_gamma,
        standardize=cfg.standardize,
        max_folds=cfg.cv_folds,
        seed=params["seed"],
    )
    meta = {"dataset": cfg.dataset, "n_labeled": len(labeled), "n_val": 0}
    save_svm(svm_file(n_labeled), svm, meta)
    seconds = time.perf_counter() - start
    # No timings in the file: the same params and seed must give the same metrics.
    write_json(METRICS_DIR / "vae_svm" / f"{n_labeled}.json", {**meta, **chosen})
    shown = ", ".join(f"{k}={v:.4g}" for k, v in chosen.items())
    print(f"vae_svm@{n_labeled}: {len(labeled)} {cfg.dataset} labels; {shown}; {seconds:.1f}s")


if __name__ == "__main__":
    run_stage(main)
