"""The report's and the pretraining run's figures are fit for a paper: PNGs at 200 dpi or more with a vector copy
that parses, factors named by their symbol, dots and whiskers rather than bars cut off at the data, nothing cut off
the saved image, the legend off the data, the attention maps on labelled axes with one colour scale and its colour
bar, and "best" only where the report's verdict is clear. Hand-made rows and a tiny encoder; no Ray."""

import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from pipelines import plotting
from sweeps import report as rp
from sweeps.grid import load_grid
from sweeps.report import BASELINE, build_report


def _rows(cells):
    """[(cell, factor, value, {seed: metric})] -> trial rows, each scored with noise at two SNRs too."""
    return [{"cell": cell, "factor": factor, "value": value, "seed": seed, "metric_value": metric, "error": None,
             "checkpoint": None, "robustness": {"10": metric - 0.1, "0": metric - 0.3}}
            for cell, factor, value, by_seed in cells for seed, metric in by_seed.items()]


CELLS = [("centre", "centre", None, {0: 0.72, 1: 0.73}), ("diff_lambda=0.0", "diff_lambda", 0.0, {0: 0.70, 1: 0.70}),
         ("diff_lambda=0.5", "diff_lambda", 0.5, {0: 0.72, 1: 0.74})]
BASELINE_ROWS = [{"cell": BASELINE, "factor": BASELINE, "value": "random-init", "seed": s, "metric_value": v,
                  "error": None} for s, v in {0: 0.47, 1: 0.49}.items()]


def _table_row(value, mean, *, centre=False, clear=None, delta=0.0, std=0.01, n=2):
    return {"factor": "diff_lambda", "value": value, "cell": "centre" if centre else f"diff_lambda={value}",
            "mean": mean, "std": std, "n": n, "centre": centre, "clear": None if centre else clear,
            "delta": 0.0 if centre else delta, "p_holm": math.nan if centre else (0.01 if clear else 0.6)}


def _dpi(png) -> float:
    """The resolution a PNG says it is printed at (its pHYs chunk, whole pixels per metre), in dots per inch to
    0.1."""
    return round(min(Image.open(png).info["dpi"]), 1)


def _factor_figure(factor="diff_lambda"):
    grid = load_grid("ablation")
    rows = [_table_row(0.0, 0.70, clear=True, delta=-0.02), _table_row(0.3, 0.72, centre=True),
            _table_row(0.5, 0.73, clear=False, delta=0.01)]
    rows = [{**r, "factor": factor} for r in rows]
    return rp.factor_figure(rows, factor, grid, {"mean": 0.48, "std": 0.01, "n": 2})


def test_every_report_figure_is_a_png_of_at_least_200_dpi_with_a_vector_copy_that_parses(tmp_path):
    report = build_report(_rows(CELLS), load_grid("smoke"), tmp_path / "report", baseline=BASELINE_ROWS)
    pngs = [p for p in map(str, report["figures"]) if p.endswith(".png")]
    assert {"factor_diff_lambda.png", "robustness.png"} <= {p.rsplit("/", 1)[1] for p in pngs}
    for png in pngs:
        assert _dpi(png) >= 200, png
        vector = png[:-4] + plotting.VECTOR_SUFFIX
        assert vector in map(str, report["figures"])  # logged beside the PNG
        data = open(vector, "rb").read()
        assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF") and b"/Type /Page" in data, vector


@pytest.mark.parametrize("factor", sorted(plotting.FACTOR_LABELS))
def test_a_factor_figure_names_the_factor_by_its_symbol(factor):
    fig = _factor_figure(factor)
    ax = fig.axes[0]
    assert ax.get_xlabel() == plotting.FACTOR_LABELS[factor]
    assert plotting.FACTOR_LABELS[factor] in ax.get_title() and factor not in ax.get_title()
    plotting.plt.close(fig)
    assert plotting.factor_label("diff_lambda") == "λ" and plotting.factor_label("alpha") == "α"


def test_a_factor_figure_is_dot_and_whisker_with_the_baseline_band_and_the_centre_marked():
    """No bars (a bar not starting at zero misreads a difference as a ratio); the random-init baseline a dashed
    line at its mean in a band of ± its std; the centre's marker distinct; a star only over the clear value."""
    fig = _factor_figure()
    ax = fig.axes[0]
    assert not [c for c in ax.containers if type(c).__name__ == "BarContainer"]
    assert any(line.get_linestyle() == "--" and line.get_ydata()[0] == pytest.approx(0.48) for line in ax.lines)
    to_data = ax.transData.inverted()
    bands = [to_data.transform([[0, b.y0], [0, b.y1]])[:, 1] for b in (p.get_window_extent() for p in ax.patches)]
    assert any(low == pytest.approx(0.47, abs=1e-3) and high == pytest.approx(0.49, abs=1e-3) for low, high in bands)
    markers = {m: list(line.get_xdata()) for line in ax.lines if (m := line.get_marker()) in ("o", "D")}
    assert markers == {"o": [0, 2], "D": [1]}  # the centre (value 0.3) a diamond
    stars = [t for t in ax.texts if t.get_text() == "*"]
    assert [t.xy[0] for t in stars] == [0]  # λ = 0 is the only clear one
    assert "(centre)" in ax.get_xticklabels()[1].get_text()
    plotting.plt.close(fig)


def _inside(inner, outer, slack=1.0) -> bool:
    return (inner.x0 >= outer.x0 - slack and inner.x1 <= outer.x1 + slack and inner.y0 >= outer.y0 - slack
            and inner.y1 <= outer.y1 + slack)


def test_nothing_drawn_is_cut_off_the_saved_image_and_the_legend_is_off_the_data(tmp_path):
    """The title and the caption under the axes are whole in the saved PNG: it is cropped to what is drawn (its
    size is the figure's tight box), not to the figure's canvas, which the caption hangs below."""
    fig = _factor_figure()
    fig.set_dpi(plotting.DPI)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    tight = fig.get_tightbbox(renderer)  # inches
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    assert legend.x0 >= ax.get_window_extent(renderer).x1  # beside the axes, not over a point
    caption = fig.texts[0]
    assert "standard deviation over seeds" in caption.get_text()
    assert caption.get_window_extent(renderer).y1 < fig.bbox.y0 + 1  # below the canvas
    texts = {t.get_text(): t.get_window_extent(renderer).transformed(fig.dpi_scale_trans.inverted())  # inches
             for t in [ax.title, ax.xaxis.label, ax.yaxis.label, caption, *ax.get_xticklabels(),
                       *ax.get_legend().get_texts()]}
    saved = tight.padded(plotting.PAD_INCHES)
    assert all(_inside(box, saved, slack=0.02) for box in texts.values())
    png = plotting.save_figure(fig, tmp_path / "factor.png")
    width, height = Image.open(png).size
    assert width == pytest.approx(saved.width * plotting.DPI, abs=8)
    assert height == pytest.approx(saved.height * plotting.DPI, abs=8)


def test_best_is_called_only_for_a_clear_verdict():
    """λ = 0.5 has the highest mean: named best where its Δ vs the centre is positive and clear after Holm's
    correction; otherwise the figure shows the centre's λ and calls nothing best."""
    zero = _table_row(0.0, 0.70, clear=True, delta=-0.03)
    centre = _table_row(0.3, 0.72, centre=True)
    noisy = rp.lambda_panels([zero, centre, _table_row(0.5, 0.73, clear=False, delta=0.01)])
    assert [label for label, _ in noisy] == ["λ = 0", "λ = 0.3 (centre)"]
    clear = rp.lambda_panels([zero, centre, _table_row(0.5, 0.75, clear=True, delta=0.03)])
    assert clear[0][0] == "λ = 0" and clear[1][0].startswith("λ = 0.5 (best: Δ +0.030 vs centre, Holm p 0.010")
    # clear but below the centre: not best; the centre stays unlabelled as best too (it has no verdict of its own)
    below = rp.lambda_panels([zero, centre, _table_row(0.5, 0.69, clear=True, delta=-0.03)])
    assert not any("best" in label for label, _ in below)
    # λ = 0 as the centre: the other λ is shown, called best only when clear
    zero_centre = {**_table_row(0.0, 0.70, centre=True)}
    assert rp.lambda_panels([zero_centre, _table_row(0.5, 0.71, clear=None, delta=0.01)])[1][0] == "λ = 0.5"
    assert rp.lambda_panels([centre]) == []


def _encoder():
    from model import ASDAConfig, ASDAEncoder

    return ASDAEncoder(ASDAConfig.tiny(embed_dim=32, depth=1, num_heads=2, average_top_k_layers=1))


CLIPS = {"fbank": np.random.default_rng(0).standard_normal((2, 96, 128)).astype(np.float32),
         "event": np.array([[0.2, 0.5], [np.nan, np.nan]]), "frames": np.array([96, 96])}


def _check_attention_axes(fig, maps: int):
    """Time and mel-bin axes with ticks, one colour scale for every map, a colour bar with its label for the maps
    (and one for the log-mel), and the legend naming the event marks."""
    from pipelines import analysis

    bars = [ax for ax in fig.axes if hasattr(ax, "_colorbar")]
    panels = [ax for ax in fig.axes if ax not in bars]
    assert len(bars) == 2 and len(panels) == 2 * (1 + maps)
    labels = {ax._colorbar.ax.get_xlabel() or ax._colorbar.ax.get_ylabel() for ax in bars}
    assert labels == {analysis.ATTENTION_LABEL, analysis.LOGMEL_LABEL}
    grid = np.array(panels).reshape(2, 1 + maps)
    assert all(ax.get_xlabel() == "time (s)" for ax in grid[-1]) and "mel bin" in grid[0, 0].get_ylabel()
    assert len(grid[-1, 0].get_xticks()) > 1 and len(grid[0, 0].get_yticks()) > 1
    limits = {ax.get_images()[0].get_clim() for ax in grid[:, 1:].flat}
    assert len(limits) == 1 and next(iter(limits))[0] == -next(iter(limits))[1]  # one scale, symmetric about 0
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [analysis.EVENT_LABEL]
    assert all(im.get_extent() == [0, 0.96, 0, 128] for ax in grid.flat for im in ax.get_images())
    marks = [line.get_xdata()[0] for line in grid[0, 1].lines]
    assert marks == [0.2, 0.5]  # the event's start and end, in seconds


def test_the_pretraining_attention_figure_has_labelled_axes_one_colour_scale_and_a_colour_bar():
    from pipelines.analysis import attention_figure

    fig = attention_figure(_encoder(), CLIPS)
    maps = len(fig.axes) - 2 - 2  # two log-mel panels and two colour bars
    _check_attention_axes(fig, maps // 2)
    plotting.plt.close(fig)


def test_the_lambda_attention_figure_shares_one_scale_says_best_only_when_clear_and_saves_both(tmp_path,
                                                                                            monkeypatch):
    """End to end from checkpoints: the saved figure is a 200 dpi PNG with a PDF beside it, on one colour scale
    with its colour bar, and with λ = 0.5's noisy lead it shows the centre's λ, not a "best" one."""
    from model import save_checkpoint
    from pipelines import analysis

    rows = []
    for cell in ("centre", "diff_lambda=0.0", "diff_lambda=0.5"):
        encoder = _encoder()
        path = save_checkpoint(tmp_path / cell / "final.pt", encoder, encoder.config)
        rows += [{"cell": cell, "seed": s, "checkpoint": str(path)} for s in (0, 1)]
    table = [_table_row(0.0, 0.70, clear=False, delta=-0.02), _table_row(0.3, 0.72, centre=True),
             _table_row(0.5, 0.73, clear=False, delta=0.01)]
    monkeypatch.setattr(analysis, "figure_clips", lambda *a, **k: CLIPS)
    drawn = []
    real_save = plotting.save_figure
    monkeypatch.setattr(plotting, "save_figure", lambda fig, p: drawn.append(fig) or real_save(fig, p))
    png = rp.lambda_attention_figure(rows, table, load_grid("ablation"), "unused", tmp_path)
    assert png.name == "attention_lambda.png" and _dpi(png) >= 200
    assert png.with_suffix(plotting.VECTOR_SUFFIX).read_bytes().startswith(b"%PDF-")
    _check_attention_axes(drawn[0], 2)
    titles = [ax.get_title() for ax in drawn[0].axes if ax.get_title()]
    assert titles[1].startswith("λ = 0\n") and titles[2].startswith("λ = 0.3 (centre)\n")
    assert not any("best" in t for t in titles)


class _Client:
    """Stands in for MlflowClient.log_figure: writes each figure where the artifact would go."""

    def __init__(self, folder):
        self.folder, self.logged = folder, []

    def log_figure(self, run_id, figure, artifact_file, *, save_kwargs=None):
        target = self.folder / artifact_file
        target.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(target, **(save_kwargs or {}))
        self.logged.append(artifact_file)


def test_run_figures_are_logged_as_a_200_dpi_png_and_an_svg_with_the_losses_named(tmp_path):
    from pipelines.analysis import LOSS_LABELS, loss_curve_figure

    history = {"loss": [(1, 2.0), (2, 1.0)], "loss_frame": [(1, 1.5), (2, 0.8)], "loss_utterance": [(1, 1.0), (2, 0.4)]}
    fig = loss_curve_figure(history)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "update" and "loss" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(LOSS_LABELS.values())
    fig.canvas.draw()
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1  # off the curves
    client = _Client(tmp_path)
    plotting.log_figure(client, "run", fig, "figures/loss_curves.png")
    assert client.logged == ["figures/loss_curves.png", "figures/loss_curves.svg"]
    assert _dpi(tmp_path / "figures/loss_curves.png") >= 200
    assert ET.parse(tmp_path / "figures/loss_curves.svg").getroot().tag.endswith("svg")


def test_the_robustness_figure_names_factors_by_symbol_and_keeps_each_legend_under_its_panel():
    from sweeps.robustness import robustness_plot, robustness_table

    rows = _rows(CELLS)
    table = rp.ablation_table(rows, load_grid("smoke"))
    fig = robustness_plot(robustness_table(rows, table), load_grid("smoke"))
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.get_title() == "λ" and ax.get_legend().get_title().get_text() == "λ"
    assert "SNR" in ax.get_xlabel() and "dB" in ax.get_xlabel() and ax.get_ylabel().startswith("eval_accuracy")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "10", "clean"]
    assert ax.get_legend().get_window_extent().y1 <= ax.get_window_extent().y0  # under the axes, off the data
    plotting.plt.close(fig)
