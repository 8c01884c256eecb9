"""Stage download: verified raw arrays of every dataset in params.download.datasets.

Sources are tried in order (the vendored copy in data/external/ first, then the official
mirrors). All files are read and verified before anything is written, so a bad file
leaves data/raw/ as it was.
"""

from __future__ import annotations

from fewlabels.config import load_params, run_stage
from fewlabels.data import fetch_dataset
from fewlabels.io import save_arrays
from fewlabels.paths import raw_file


def main() -> None:
    cfg = load_params()["download"]
    fetched = {}
    for dataset in cfg["datasets"]:
        arrays, origins = fetch_dataset(dataset, cfg["sources"][dataset], cfg["timeout_s"])
        fetched[dataset] = arrays
        for key, where in origins.items():
            print(f"{dataset}: {key} {tuple(arrays[key].shape)} verified, from {where}")
    for dataset, arrays in fetched.items():
        save_arrays(raw_file(dataset), **arrays)
        print(f"wrote {raw_file(dataset)}")


if __name__ == "__main__":
    run_stage(main)
