"""`dvc plots show` renders offline: the configured page template inlines vega."""

from __future__ import annotations

import configparser
import io
import re
import tarfile
from pathlib import Path

import pytest
from dvc_render import render_html
from dvc_render.vega import VegaRenderer

from fewlabels.config import PipelineError
from tests.conftest import REPO_ROOT
from tools.plots_template import LIBRARIES, TEMPLATE, Library, page, read_tarball

# Any <script ...> tag that loads a file (inline scripts have no src).
REMOTE_SCRIPT = re.compile(r"<script\b[^>]*\bsrc\s*=", re.IGNORECASE)


def configured_template() -> Path:
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / ".dvc/config")
    # DVC resolves a relative html_template against the .dvc folder.
    return REPO_ROOT / ".dvc" / config["plots"]["html_template"]


def test_dvc_config_uses_the_offline_template_with_its_licenses():
    assert configured_template() == REPO_ROOT / TEMPLATE
    for lib in LIBRARIES:
        license_text = (REPO_ROOT / TEMPLATE.parent / f"LICENSE-{lib.name}").read_text()
        assert "Redistribution and use in source and binary forms" in license_text


def test_template_inlines_the_versions_dvc_render_would_load_from_its_cdn():
    cdn = set(re.findall(r"npm/(vega[a-z-]*)@([\d.]+)", VegaRenderer.SCRIPTS))
    assert {(lib.name, lib.version) for lib in LIBRARIES} == cdn
    text = configured_template().read_text()
    for lib in LIBRARIES:
        assert f"<!-- {lib.name} {lib.version} -->" in text
    assert "{plot_divs}" in text and "{scripts}" not in text
    assert not REMOTE_SCRIPT.search(text)


def test_rendered_page_has_every_chart_and_no_remote_script(tmp_path):
    points = [{"step": s, "loss": 1 / (s + 1), "rev": "workspace"} for s in range(3)]
    renderer = VegaRenderer(points, "loss.tsv", x="step", y="loss")
    render_html([renderer], tmp_path / "index.html", html_template=configured_template())
    text = (tmp_path / "index.html").read_text()
    assert not REMOTE_SCRIPT.search(text)
    assert "vegaEmbed('#loss_tsv', spec);" in text
    assert text.count("<script") == len(LIBRARIES) + 1  # the libraries and one chart


FAKE = Library("fake", "1.0.0", "build/fake.min.js", "sha512-none")


@pytest.mark.parametrize("js", ["var a = '</script>';", "var a = '{plot_divs}';"])
def test_a_bundle_that_would_break_the_page_is_refused(js):
    with pytest.raises(PipelineError, match="fake 1.0.0 contains .*cannot inline"):
        page({FAKE: js})


def test_page_drops_source_map_comments():
    text = page({FAKE: "var a = 1;\n//# sourceMappingURL=fake.min.js.map\n"})
    assert "var a = 1;" in text and "sourceMappingURL" not in text


def test_a_tarball_that_does_not_match_its_pinned_hash_is_refused(tmp_path):
    blob = io.BytesIO()
    with tarfile.open(fileobj=blob, mode="w:gz") as archive:
        data = b"var vega = {};"
        info = tarfile.TarInfo("package/build/vega.min.js")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    tarball = tmp_path / "vega-5.20.2.tgz"
    tarball.write_bytes(blob.getvalue())
    with pytest.raises(PipelineError, match="integrity does not match vega@5.20.2"):
        read_tarball(LIBRARIES[0], tarball)
