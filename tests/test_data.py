"""IDX parsing, source fallback and verification, on tiny files the tests write."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import threading

import numpy as np
import pytest

from fewlabels import data as data_lib
from fewlabels.config import PipelineError
from fewlabels.data import fetch_dataset, parse_idx
from tests.conftest import idx_bytes

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


def test_parse_idx_round_trips_images_and_labels():
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    np.testing.assert_array_equal(parse_idx(idx_bytes(images), "img", IMAGES_MAGIC), images)
    np.testing.assert_array_equal(parse_idx(idx_bytes(labels), "lbl", LABELS_MAGIC), labels)


@pytest.mark.parametrize("cut", [2, 10, 100])
def test_parse_idx_rejects_truncated_file(cut):
    raw = idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))
    with pytest.raises(PipelineError, match="train-images.*truncated"):
        parse_idx(raw[:cut], "train-images", IMAGES_MAGIC)


def test_parse_idx_rejects_trailing_garbage():
    raw = idx_bytes(np.zeros((3,), dtype=np.uint8)) + b"extra"
    with pytest.raises(PipelineError, match="garbled"):
        parse_idx(raw, "labels", LABELS_MAGIC)


def test_parse_idx_rejects_wrong_magic():
    labels_file = idx_bytes(np.zeros((3,), dtype=np.uint8))
    with pytest.raises(PipelineError, match="wrong magic number 0x00000801"):
        parse_idx(labels_file, "train-images", IMAGES_MAGIC)


def test_fetch_skips_sources_without_the_files(tiny_source, tmp_path):
    folder, arrays = tiny_source
    missing = tmp_path / "does-not-exist"
    fetched, origins = fetch_dataset("mnist", [str(missing), str(folder)], timeout_s=1)
    for key, value in arrays.items():
        np.testing.assert_array_equal(fetched[key], value)
        assert origins[key].startswith(str(folder))


def test_fetch_reads_uncompressed_files_too(tiny_source):
    folder, arrays = tiny_source
    for gz in folder.glob("*.gz"):
        gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    fetched, _ = fetch_dataset("mnist", [str(folder)], timeout_s=1)
    np.testing.assert_array_equal(fetched["x_test"], arrays["x_test"])


def test_fetch_stops_on_wrong_checksum_naming_the_file(tiny_source):
    folder, arrays = tiny_source
    tampered = arrays["y_train"].copy()
    tampered[0] = (tampered[0] + 1) % 10
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(tampered)))
    with pytest.raises(PipelineError, match="train-labels-idx1-ubyte.gz: wrong checksum"):
        fetch_dataset("mnist", [str(folder)], timeout_s=1)


def test_fetch_stops_on_truncated_gzip(tiny_source):
    folder, _ = tiny_source
    path = folder / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(PipelineError, match="t10k-images-idx3-ubyte.gz: corrupt or truncated"):
        fetch_dataset("mnist", [str(folder)], timeout_s=1)


def test_fetch_reports_image_label_count_mismatch(tiny_source, monkeypatch):
    folder, arrays = tiny_source
    short = idx_bytes(arrays["y_test"][:-1])
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(short))
    checksums = dict(data_lib.CHECKSUMS["mnist"])
    checksums["t10k-labels-idx1-ubyte"] = (
        hashlib.md5(short).hexdigest(),
        hashlib.sha256(short).hexdigest(),
    )
    monkeypatch.setitem(data_lib.CHECKSUMS, "mnist", checksums)
    with pytest.raises(PipelineError, match="50 test images but 49 test labels"):
        fetch_dataset("mnist", [str(folder)], timeout_s=1)


def test_fetch_names_every_source_when_none_has_the_file(tmp_path):
    with pytest.raises(PipelineError, match="not found in any of download.sources.mnist"):
        fetch_dataset("mnist", [str(tmp_path)], timeout_s=1)


@pytest.fixture
def http_server(tiny_source):
    """Serve the tiny source folder on loopback, as a mirror would."""
    folder, arrays = tiny_source
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", arrays
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_fetch_falls_back_to_a_mirror_url(http_server, tmp_path):
    url, arrays = http_server
    closed_port = "http://127.0.0.1:9"  # nothing listens: skipped like a missing folder
    sources = [str(tmp_path / "no-vendored-copy"), closed_port, url]
    fetched, origins = fetch_dataset("mnist", sources, timeout_s=5)
    np.testing.assert_array_equal(fetched["x_train"], arrays["x_train"])
    assert origins["y_test"] == f"{url}/t10k-labels-idx1-ubyte.gz"
