"""Build the offline page template of `dvc plots show` (.dvc/plots_offline/page.html).

dvc_render's own page loads vega, vega-lite and vega-embed from a CDN, so without a
network it shows no chart. This template inlines the same three libraries, at the versions
dvc_render 1.0's page names, and has no `{scripts}` placeholder, so no remote script tag
gets into the page. `.dvc/config` points `plots.html_template` at it. Run this only to
change the library versions:

    python -m tools.plots_template              # `npm pack` the pinned versions
    python -m tools.plots_template --from DIR   # tarballs already in DIR

Each tarball must match its pinned npm integrity hash before anything is written.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import NamedTuple

from fewlabels.config import PipelineError, run_stage
from fewlabels.io import write_text

TEMPLATE_DIR = Path(".dvc/plots_offline")
TEMPLATE = TEMPLATE_DIR / "page.html"
# What dvc_render replaces in a template. PAGE leaves "{scripts}" out on purpose: dvc_render
# puts the CDN <script> tags there.
PLACEHOLDERS = ("{plot_divs}", "{refresh_tag}", "{scripts}")
SOURCE_MAP = re.compile(r"^//# sourceMappingURL=.*$", re.MULTILINE)


class Library(NamedTuple):
    name: str
    version: str
    bundle: str  # browser build inside the npm tarball
    integrity: str  # npm's dist.integrity of the tarball


LIBRARIES = (
    Library(
        "vega", "5.20.2", "build/vega.min.js",
        "sha512-qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw==",
    ),
    Library(
        "vega-lite", "5.2.0", "build/vega-lite.min.js",
        "sha512-Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw==",
    ),
    Library(
        "vega-embed", "6.18.2", "build/vega-embed.min.js",
        "sha512-wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg==",
    ),
)  # fmt: skip

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC plots</title>
    <!-- Written by `python -m tools.plots_template`: %CREDITS%, inlined so that the
         page needs no network (BSD-3-Clause: see the LICENSE files beside this file). -->
%SCRIPTS%
    <style>
        body { font-family: sans-serif; }
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def page(bundles: dict[Library, str]) -> str:
    """The template: every bundle in an inline <script>, dvc_render's placeholders kept."""
    for lib, js in bundles.items():
        # A bundle must not end its <script> early or hold text that dvc_render replaces.
        for bad in ("</script", *PLACEHOLDERS):
            if bad in js.lower():
                raise PipelineError(f"{lib.name} {lib.version} contains {bad!r}: cannot inline")
    scripts = "\n".join(
        # Without the source-map comment: browser tools would look for the .map beside the page.
        f"    <!-- {lib.name} {lib.version} -->\n    <script>\n"
        f"{SOURCE_MAP.sub('', js).strip()}\n    </script>"
        for lib, js in bundles.items()
    )
    credits = ", ".join(f"{lib.name} {lib.version}" for lib in bundles)
    return PAGE.replace("%CREDITS%", credits).replace("%SCRIPTS%", scripts)


def npm_integrity(blob: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(blob).digest()).decode()


def read_tarball(lib: Library, tarball: Path) -> tuple[str, str]:
    """The browser bundle and LICENSE text of a verified npm tarball."""
    blob = tarball.read_bytes()
    if npm_integrity(blob) != lib.integrity:
        raise PipelineError(f"{tarball}: integrity does not match {lib.name}@{lib.version}")
    with tarfile.open(tarball) as archive:

        def member(name: str) -> str:
            handle = archive.extractfile(f"package/{name}")
            if handle is None:
                raise PipelineError(f"{tarball} has no package/{name}")
            return handle.read().decode("utf-8")

        return member(lib.bundle), member("LICENSE")


def npm_pack(lib: Library, folder: Path) -> Path:
    cmd = ["npm", "pack", f"{lib.name}@{lib.version}", "--pack-destination", str(folder)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise PipelineError(f"`{' '.join(cmd)}` failed ({err}); use --from DIR") from None
    return folder / f"{lib.name}-{lib.version}.tgz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", type=Path, help="folder of npm tarballs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundles, licenses = {}, {}
        for lib in LIBRARIES:
            tarball = (
                args.source / f"{lib.name}-{lib.version}.tgz"
                if args.source
                else npm_pack(lib, Path(tmp))
            )
            bundles[lib], licenses[lib] = read_tarball(lib, tarball)
    for lib, text in licenses.items():
        write_text(TEMPLATE_DIR / f"LICENSE-{lib.name}", text)
    write_text(TEMPLATE, page(bundles))
    print(f"wrote {TEMPLATE} ({TEMPLATE.stat().st_size:,} bytes)")


if __name__ == "__main__":
    run_stage(main)
