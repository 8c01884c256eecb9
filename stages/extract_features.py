"""Stage extract_features: deep feature vectors of every train and test image.

The backbone (`features.backbone`, a trained model) is cut at `features.layer`; its
outputs are saved as float16 (half the disk, plenty for k-means) in data/features/.
"""

from __future__ import annotations

from fewlabels.checkpoint import load_trained
from fewlabels.config import load_params, resolve_device, run_stage
from fewlabels.io import save_arrays
from fewlabels.paths import FEATURES_FILE, load_raw
from fewlabels.pseudo import embedding_network, extract_features


def main() -> None:
    params = load_params()
    cfg = params["features"]
    device = resolve_device(params["device"])
    model, _ = load_trained(cfg["backbone"], params["dataset"])
    network = embedding_network(model, cfg["layer"])
    data = load_raw(params["dataset"])
    arrays = {
        split: extract_features(network, data[f"x_{split}"], cfg["batch_size"], device)
        .half()
        .numpy()
        for split in ("train", "test")
    }
    save_arrays(FEATURES_FILE, **arrays)
    print(f"features of {cfg['backbone']} ({cfg['layer']}): {arrays['train'].shape[1]} per image")


if __name__ == "__main__":
    run_stage(main)
