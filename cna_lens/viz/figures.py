"""Figures: write Plotly figures to a folder as HTML, and as PNG where a renderer exists.

HTML always works offline (plotly.js is written once beside the pages). PNG needs kaleido
(``pip install cna-lens[png]``) and a Chrome/Chromium it can find (kaleido 1.x looks at
``BROWSER_PATH`` and the standard install paths; Debian's ``chromium`` package works).
When PNG export fails, the failure is logged and reported, never raised: a missing
renderer must not fail a reproduction run.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go

from cna_lens.errors import CNAError

__all__ = ["SavedFigures", "find_browser", "save_figures"]

logger = logging.getLogger(__name__)

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_browser() -> str | None:
    """A Chrome/Chromium executable for kaleido: ``BROWSER_PATH`` if set, else one on PATH."""
    env = os.environ.get("BROWSER_PATH")
    if env and Path(env).is_file():
        return env
    for name in _BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass(frozen=True)
class SavedFigures:
    """What :func:`save_figures` wrote: name -> path, and why PNG export failed (if it did)."""

    html: dict[str, Path] = field(default_factory=dict)
    png: dict[str, Path] = field(default_factory=dict)
    png_error: str | None = None


def _export_png(figures: Mapping[str, go.Figure], out: Path, scale: float) -> dict[str, Path]:
    import plotly.io as pio

    browser = find_browser()
    if browser and not os.environ.get("BROWSER_PATH"):
        os.environ["BROWSER_PATH"] = browser
    paths = {name: out / f"{name}.png" for name in figures}
    figs = list(figures.values())
    if hasattr(pio, "write_images"):  # plotly >= 6.1: one browser session for all figures
        pio.write_images(figs, [paths[n] for n in figures], scale=scale)
    else:  # pragma: no cover - older plotly
        for name, fig in figures.items():
            fig.write_image(paths[name], scale=scale)
    return paths


def save_figures(
    figures: Mapping[str, go.Figure],
    out_dir: str | os.PathLike[str],
    *,
    png: bool = True,
    scale: float = 2.0,
    plotlyjs: str = "directory",
) -> SavedFigures:
    """Write each figure as ``{name}.html`` (and ``{name}.png`` when possible) in ``out_dir``.

    Args:
        figures: Name (file stem) -> figure.
        out_dir: Folder to write (created).
        png: Also try PNG export via kaleido.
        scale: PNG resolution factor.
        plotlyjs: How the HTML pages get plotly.js: "directory" (one ``plotly.min.js``
            beside them, ~5 MB, works offline), "cdn" (small pages, need internet to view)
            or "inline" (self-contained pages).

    Returns:
        The written paths; ``png_error`` says why PNGs are missing, if they are.

    Raises:
        CNAError: a name that is not a plain file stem, or an unknown ``plotlyjs``.
    """
    if plotlyjs not in ("directory", "cdn", "inline"):
        raise CNAError(f"plotlyjs must be 'directory', 'cdn' or 'inline', got {plotlyjs!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in figures:
        if not name or Path(name).name != name or name.startswith("."):
            raise CNAError(f"figure name {name!r} must be a plain file stem like 'layers'")
    html = {}
    for name, fig in figures.items():
        path = out / f"{name}.html"
        fig.write_html(
            path, include_plotlyjs=True if plotlyjs == "inline" else plotlyjs, full_html=True
        )
        html[name] = path
    pngs: dict[str, Path] = {}
    error = None
    if png and figures:
        try:
            pngs = _export_png(figures, out, scale)
        except Exception as exc:  # noqa: BLE001 - any renderer failure must not fail the run
            error = f"{type(exc).__name__}: {exc}".strip()
            logger.warning("PNG export failed (HTML written): %s", error)
            for path in out.glob("*.png"):
                if path.stem in figures and path.stat().st_size == 0:
                    path.unlink()
            pngs = {}
    elif not png:
        error = "PNG export not requested"
    return SavedFigures(html, pngs, error)
