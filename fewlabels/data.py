"""Datasets: IDX parsing and verification, labeled/unlabeled splits, batched augmentation.

Images stay uint8 tensors (N, 28, 28) in memory; `to_input` turns a batch into floats in
[0, 1] with a channel axis only when it is fed to a model.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import struct
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import Affine, PipelineError, check_budget

# The four IDX files of a dataset: array name -> (file name, IDX magic number).
IDX_FILES = {
    "x_train": ("train-images-idx3-ubyte", 2051),
    "y_train": ("train-labels-idx1-ubyte", 2049),
    "x_test": ("t10k-images-idx3-ubyte", 2051),
    "y_test": ("t10k-labels-idx1-ubyte", 2049),
}

# (md5, sha256) of the *decompressed* published files.
CHECKSUMS = {
    "mnist": {
        "train-images-idx3-ubyte": (
            "6bbc9ace898e44ae57da46a324031adb",
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        ),
        "train-labels-idx1-ubyte": (
            "a25bea736e30d166cdddb491f175f624",
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        ),
        "t10k-images-idx3-ubyte": (
            "2646ac647ad5339dbf082846283269ea",
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        ),
        "t10k-labels-idx1-ubyte": (
            "27ae3e4e09519cfbb04c329615203637",
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        ),
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": (
            "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        ),
        "train-labels-idx1-ubyte": (
            "9018921c3c673c538a1fc5bad174d6f9",
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        ),
        "t10k-images-idx3-ubyte": (
            "8181f5470baa50b63fa0f6fddb340f0a",
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        ),
        "t10k-labels-idx1-ubyte": (
            "15d484375f8d13e6eb1aabb0c3f46965",
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        ),
    },
}


# --- IDX files ----------------------------------------------------------------------


def parse_idx(raw: bytes, name: str, expected_magic: int) -> np.ndarray:
    """Parse an uncompressed IDX file of unsigned bytes, refusing anything malformed."""
    if len(raw) < 4:
        raise PipelineError(f"{name}: truncated IDX file ({len(raw)} bytes, no header)")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic != expected_magic:
        raise PipelineError(
            f"{name}: wrong magic number 0x{magic:08x} (expected 0x{expected_magic:08x}); "
            f"this is not the IDX file it is named after"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise PipelineError(f"{name}: truncated IDX file (header cut after {len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(dims)
    found = len(raw) - header
    if found != expected:
        what = "truncated" if found < expected else "garbled"
        raise PipelineError(
            f"{name}: {what} IDX file: header says {'x'.join(map(str, dims))} = {expected} "
            f"bytes of data, file has {found}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _decompress(blob: bytes, where: str) -> bytes:
    try:
        return gzip.decompress(blob)
    except (EOFError, OSError, zlib.error) as err:
        raise PipelineError(f"{where}: corrupt or truncated gzip file ({err})") from None


def read_from_source(source: str, filename: str, timeout_s: float) -> tuple[bytes, str] | None:
    """Fetch `filename` (decompressed) from a folder or URL; None if the source lacks it.

    A folder may hold `<name>.gz` or the uncompressed `<name>`. A source that does not have
    the file (missing folder, network down) is skipped; one that has a bad file is an error.
    """
    if source.startswith(("http://", "https://")):
        url = f"{source.rstrip('/')}/{filename}.gz"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                return _decompress(response.read(), url), url
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError):
            # Unreachable, missing (404) or cut-off transfer: try the next source.
            return None
    for candidate in (Path(source) / f"{filename}.gz", Path(source) / filename):
        if candidate.is_file():
            blob = candidate.read_bytes()
            if candidate.suffix == ".gz":
                blob = _decompress(blob, str(candidate))
            return blob, str(candidate)
    return None


def verify_checksum(raw: bytes, dataset: str, filename: str, where: str) -> None:
    md5_expected, sha_expected = CHECKSUMS[dataset][filename]
    md5, sha = hashlib.md5(raw).hexdigest(), hashlib.sha256(raw).hexdigest()
    if (md5, sha) != (md5_expected, sha_expected):
        raise PipelineError(
            f"{where}: wrong checksum (sha256 {sha}, expected {sha_expected}); the file is "
            f"corrupt or not the published {dataset} file: restore it "
            f"(e.g. `git checkout -- {where}`) or remove that source from download.sources"
        )


def fetch_dataset(
    dataset: str, sources: list[str], timeout_s: float
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read the four IDX files of `dataset` from the first source that has each one.

    Returns the arrays (x_train, y_train, x_test, y_test) and where each file came from.
    """
    arrays: dict[str, np.ndarray] = {}
    origins: dict[str, str] = {}
    for key, (filename, magic) in IDX_FILES.items():
        found = next(
            (hit for source in sources if (hit := read_from_source(source, filename, timeout_s))),
            None,
        )
        if found is None:
            raise PipelineError(
                f"{dataset}/{filename}: not found in any of download.sources.{dataset} "
                f"({', '.join(sources)}); restore data/external/{dataset}/ from git or add a "
                f"folder that holds the file"
            )
        raw, where = found
        verify_checksum(raw, dataset, filename, where)
        arrays[key] = parse_idx(raw, where, magic)
        origins[key] = where
    for part in ("train", "test"):
        n_images, n_labels = len(arrays[f"x_{part}"]), len(arrays[f"y_{part}"])
        if n_images != n_labels:
            raise PipelineError(
                f"{dataset}: {n_images} {part} images but {n_labels} {part} labels; "
                f"the image and label files do not belong together ({origins[f'x_{part}']}, "
                f"{origins[f'y_{part}']})"
            )
    return arrays, origins


# --- splits ------------------------------------------------------------------------


def class_balanced_split(
    labels: np.ndarray, n_labeled: int, n_val: int, seed: int, pool_size: int = 0
) -> dict[str, np.ndarray]:
    """Seeded split of training indices into labeled, validation and unlabeled sets.

    Labeled and validation sets hold the same count of every class. Each class's images
    are shuffled once by the seed, validation takes the first `n_val / K` and the labeled
    set the next `n_labeled / K`, so budgets are nested (the 100-label set is inside the
    250-label set) and the validation set does not move when the budget changes.
    `pool_size` > 0 first restricts everything to a seeded random subset (smoke runs).
    """
    classes = np.unique(labels)
    n_classes = len(classes)
    check_budget("labels", n_labeled, n_classes)
    check_budget("split.val_size", n_val, n_classes, allow_zero=True)
    rng = np.random.default_rng(seed)
    pool = np.arange(len(labels))
    if pool_size:
        pool = np.sort(rng.permutation(len(labels))[:pool_size])
    per_class_labeled, per_class_val = n_labeled // n_classes, n_val // n_classes
    labeled, val = [], []
    for c in classes:
        members = rng.permutation(pool[labels[pool] == c])
        if len(members) < per_class_val + per_class_labeled:
            raise PipelineError(
                f"labels={n_labeled} (+ split.val_size={n_val}) asks for "
                f"{per_class_labeled + per_class_val} images of class {c}, but the training "
                f"pool has only {len(members)}; lower labels or split.val_size"
                + (" or raise split.pool_size" if pool_size else "")
            )
        val.append(members[:per_class_val])
        labeled.append(members[per_class_val : per_class_val + per_class_labeled])
    labeled_idx = np.sort(np.concatenate(labeled))
    val_idx = np.sort(np.concatenate(val))
    unlabeled_idx = np.setdiff1d(pool, np.concatenate([labeled_idx, val_idx]))
    return {"labeled_idx": labeled_idx, "val_idx": val_idx, "unlabeled_idx": unlabeled_idx}


# --- tensors and augmentation --------------------------------------------------------


def to_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, H, W) -> float (N, 1, H, W) in [0, 1]."""
    return x.unsqueeze(1).float().div_(255.0)


def random_affine(
    x: torch.Tensor, augment: Affine, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Apply an independent random rotation, scaling and shift to every image of a batch,
    and with `augment.elastic` > 0 (an `ElasticAffine`) an elastic distortion (Simard et
    al. 2003): a random displacement field smoothed by a Gaussian of `elastic_sigma`
    pixels and scaled by `elastic` (their alpha, in pixels).

    `x` is float (N, C, H, W); `translate` is a fraction of the image size and `scale` the
    largest relative zoom. One `grid_sample` call transforms the whole batch on its device.
    """
    n = x.shape[0]
    elastic = getattr(augment, "elastic", 0.0)
    if n == 0 or (augment.rotate_deg == augment.translate == augment.scale == elastic == 0):
        return x
    # Draw on the generator's device (CPU by default) so results do not depend on the
    # accelerator, then move the (N, 2, 3) matrices: a few hundred bytes per batch.
    u = torch.rand(n, 4, generator=generator, device=generator.device if generator else "cpu")
    u = (u * 2 - 1).to(x.device)
    angle = u[:, 0] * math.radians(augment.rotate_deg)
    zoom = 1 + u[:, 1] * augment.scale
    shift = u[:, 2:] * (2 * augment.translate)  # affine_grid coordinates span [-1, 1]
    displacement = None
    if elastic > 0:
        displacement = elastic_displacement(
            n, x.shape[-2], x.shape[-1], elastic, augment.elastic_sigma, generator
        ).to(x.device)
    return affine_transform(x, angle, zoom, shift, displacement)


def elastic_displacement(
    n: int, h: int, w: int, alpha: float, sigma: float, generator: torch.Generator | None
) -> torch.Tensor:
    """`n` smooth random displacement fields (N, H, W, 2) in affine_grid units: uniform
    noise in [-1, 1] per pixel and axis, blurred by a Gaussian of `sigma` pixels (one
    separable convolution for the whole batch) and scaled by `alpha` pixels."""
    device = generator.device if generator else "cpu"
    field = torch.rand(n * 2, 1, h, w, generator=generator, device=device) * 2 - 1
    field = gaussian_blur(field, sigma)
    # Pixels to affine_grid units, whose [-1, 1] spans the width (x) and height (y).
    scale = torch.tensor([2 * alpha / w, 2 * alpha / h], dtype=field.dtype, device=device)
    return field.view(n, 2, h, w).permute(0, 2, 3, 1) * scale


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of `sigma` pixels of a float batch (N, 1, H, W), zero
    beyond the edges (the kernel reaches 3 sigma)."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0)), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius)), kernel.view(1, 1, -1, 1))


def affine_transform(
    x: torch.Tensor,
    angle: torch.Tensor,
    zoom: torch.Tensor,
    shift: torch.Tensor,
    displacement: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate (radians), zoom and shift (affine_grid units, (N, 2)) each image of a float
    batch (N, C, H, W) by its own amounts, then displace every sampling point by
    `displacement` (N, H, W, 2) if given, in one `grid_sample` call."""
    angle, zoom, shift = angle.to(x.device), zoom.to(x.device), shift.to(x.device)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if displacement is not None:
        grid = grid + displacement
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_cutout(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero one `size` x `size` square at a random place in every image (batched, no loop).

    The square's centre may sit anywhere, so near edges less than the full square is cut.
    """
    if size <= 0:
        return x
    n, _, h, w = x.shape
    centre = torch.rand(n, 2, generator=generator) * torch.tensor([h, w])
    centre = centre.to(x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((rows - centre[:, 0].view(n, 1, 1)).abs() < size / 2) & (
        (cols - centre[:, 1].view(n, 1, 1)).abs() < size / 2
    )
    return x.masked_fill(inside.unsqueeze(1), 0.0)


def random_thicken(x: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Thicken the strokes of a random `fraction` of the images by a 3x3 grey-level
    dilation (a max filter: each pixel takes its brightest neighbour); the rest unchanged."""
    if fraction <= 0:
        return x
    chosen = (torch.rand(len(x), generator=generator) < fraction).to(x.device)
    return torch.where(chosen.view(-1, 1, 1, 1), F.max_pool2d(x, 3, stride=1, padding=1), x)
