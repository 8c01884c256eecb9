"""Shared fixtures: tiny IDX datasets the tests write themselves."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fewlabels import data as data_lib

REPO_ROOT = Path(__file__).resolve().parent.parent


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file (magic 0x0000080N, big-endian dims)."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def make_tiny_dataset(n_train: int = 200, n_test: int = 50, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": np.arange(n_train, dtype=np.uint8) % 10,
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": np.arange(n_test, dtype=np.uint8) % 10,
    }


@pytest.fixture
def tiny_source(tmp_path, monkeypatch):
    """A folder of gzip IDX files for a tiny 'mnist', with CHECKSUMS patched to match."""
    arrays = make_tiny_dataset()
    folder = tmp_path / "source"
    folder.mkdir()
    checksums = {}
    for key, (filename, _) in data_lib.IDX_FILES.items():
        raw = idx_bytes(arrays[key])
        (folder / f"{filename}.gz").write_bytes(gzip.compress(raw))
        checksums[filename] = (hashlib.md5(raw).hexdigest(), hashlib.sha256(raw).hexdigest())
    monkeypatch.setitem(data_lib.CHECKSUMS, "mnist", checksums)
    return folder, arrays


AUGMENT = {"rotate_deg": 12.0, "translate": 0.1, "scale": 0.1}


def synthetic_digits(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten easy classes: class c is a bright bar at row 2c + noise."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    x = torch.randint(0, 40, (n, 28, 28), generator=gen, dtype=torch.uint8)
    for i, c in enumerate(y.tolist()):
        x[i, 4 + 2 * c : 6 + 2 * c, 4:24] = 255
    return x, y
