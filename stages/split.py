"""Stage split: seeded, class-balanced labeled / validation / unlabeled training indices."""

from __future__ import annotations

import numpy as np

from fewlabels.config import load_params, run_stage
from fewlabels.data import class_balanced_split
from fewlabels.io import load_arrays, save_arrays, write_json
from fewlabels.paths import METRICS_DIR, SPLIT_FILE, raw_file


def main() -> None:
    params = load_params()
    y_train = load_arrays(raw_file(params["dataset"]), producer="download")["y_train"]
    split = class_balanced_split(
        y_train,
        n_labeled=params["labels"],
        n_val=params["split"]["val_size"],
        seed=params["seed"],
        pool_size=params["split"]["pool_size"],
    )
    save_arrays(SPLIT_FILE, **split)
    n_classes = len(np.unique(y_train))
    summary = {
        "n_labeled": len(split["labeled_idx"]),
        "n_val": len(split["val_idx"]),
        "n_unlabeled": len(split["unlabeled_idx"]),
        "labeled_per_class": {
            str(c): int(n)
            for c, n in enumerate(np.bincount(y_train[split["labeled_idx"]], minlength=n_classes))
        },
    }
    write_json(METRICS_DIR / "split.json", summary)
    print(summary)


if __name__ == "__main__":
    run_stage(main)
