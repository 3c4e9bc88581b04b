"""matplotlib for every figure the platform draws: files only, no display, so the backend is Agg, chosen here once.
Here too is what makes a figure fit for a paper, shared by every figure: the resolution a PNG is written at, the
vector copy beside it, the names a factor goes by on an axis, and a caption that is never cut off.

    from pipelines.plotting import plt
"""

from __future__ import annotations

import textwrap
from pathlib import Path, PurePosixPath

import matplotlib

matplotlib.use("Agg")
# Text in a PDF kept as TrueType text (not Type 3 glyphs): a journal's checks accept it and an editor can change it.
matplotlib.rcParams["pdf.fonttype"] = 42

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

__all__ = ["DPI", "FACTOR_LABELS", "VECTOR_SUFFIX", "add_caption", "factor_label", "log_figure", "plt",
           "save_figure"]

DPI = 200  # PNGs are written at this resolution: sharp in print at a column's width
VECTOR_SUFFIX = ".pdf"  # the vector copy written beside each PNG of a report (LaTeX includes it as it is)
PAD_INCHES = 0.05  # the margin left around everything drawn when a figure is cropped to its content

# How each factor of a grid is named on a figure: its symbol in the paper, or a short phrase. One mapping for every
# figure, so that λ is λ on each of them.
FACTOR_LABELS = {"diff_lambda": "λ", "alpha": "α", "num_students": "students", "cls_position": "CLS position",
                 "readout": "read-out", "factorial": "cell"}


def factor_label(factor: str) -> str:
    """The name ``factor`` goes by on a figure (``FACTOR_LABELS``), else the factor's own name."""
    return FACTOR_LABELS.get(factor, factor)


def add_caption(fig, text: str, width_in: float | None = None, fontsize: float = 7.5) -> None:
    """``text`` under everything the figure draws, wrapped to the figure's width. It hangs below the figure's
    canvas, where no panel is; ``save_figure`` crops to what is drawn, so the saved image holds all of it."""
    width_in = width_in or fig.get_figwidth()
    chars = max(40, int(width_in * 72 / (0.55 * fontsize)))  # a character is about 0.55 em wide
    fig.text(0.0, -0.01, textwrap.fill(text, chars), ha="left", va="top", fontsize=fontsize, wrap=False)


def save_figure(fig, path: str | Path) -> Path:
    """``fig`` as a PNG at ``DPI`` at ``path`` and as a vector copy beside it (same name, ``VECTOR_SUFFIX``), each
    cropped to what is drawn (a title, legend or caption outside the axes is kept whole, not cut off). Closes the
    figure and returns the PNG's path."""
    path = Path(path).with_suffix(".png")
    for target, options in ((path, {"dpi": DPI}), (path.with_suffix(VECTOR_SUFFIX), {})):
        fig.savefig(target, bbox_inches="tight", pad_inches=PAD_INCHES, **options)
    plt.close(fig)
    return path


def log_figure(client, run_id: str, fig, artifact_file: str) -> None:
    """``fig`` into an MLflow run as ``artifact_file`` (a PNG at ``DPI``) and as an SVG beside it, each cropped to
    what is drawn; closes the figure."""
    options = {"bbox_inches": "tight", "pad_inches": PAD_INCHES}
    client.log_figure(run_id, fig, artifact_file, save_kwargs={**options, "dpi": DPI})
    client.log_figure(run_id, fig, str(PurePosixPath(artifact_file).with_suffix(".svg")), save_kwargs=options)
    plt.close(fig)
