"""Noise robustness per cell: each trial's probe scored on its eval split with seeded white noise at several SNRs
(``ProbeSettings.noise_snrs``; the classifier is the one fitted on clean features), read here into Δ vs the
centre at each SNR, paired by seed, and drawn as the metric against the SNR for every value of each factor."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from .grid import Grid
from .significance import paired_delta

CLEAN = "clean"
CENTRE_COLOUR = "tab:orange"  # as on the factor figures (``sweeps.report.factor_panel``)


def levels(rows: list[dict[str, Any]]) -> list[str]:
    """The SNRs the rows were scored at, loudest noise last ("10", "5", "0", "-5"), "clean" first; [] if none."""
    found = {snr for r in rows for snr in (r.get("robustness") or {})}
    return [CLEAN, *sorted(found, key=float, reverse=True)] if found else []


def _value(row: dict[str, Any], level: str) -> float:
    value = row.get("metric_value") if level == CLEAN else (row.get("robustness") or {}).get(level)
    try:
        return float(value) if value is not None and math.isfinite(float(value)) else math.nan
    except (TypeError, ValueError):
        return math.nan


def robustness_table(rows: list[dict[str, Any]], table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (cell of the ablation ``table``, SNR level): the metric's mean and std over seeds, and Δ vs
    the centre at that level paired by seed ± the standard error of the paired differences."""
    found = levels(rows)
    if not found:
        return []
    by_cell: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_cell.setdefault(r["cell"], []).append(r)
    out = []
    for cell in table:
        members = by_cell.get(cell["cell"], [])
        for level in found:
            per_seed = {r["seed"]: v for r in members if math.isfinite(v := _value(r, level))}
            centre = {r["seed"]: v for r in by_cell.get("centre", []) if math.isfinite(v := _value(r, level))}
            values = list(per_seed.values())
            mean = statistics.fmean(values) if values else math.nan
            std, n = statistics.stdev(values) if len(values) > 1 else math.nan, len(values)
            delta, se, pairs = (0.0, math.nan, n) if cell["centre"] else paired_delta(per_seed, centre)
            out.append({"factor": cell["factor"], "value": cell["value"], "cell": cell["cell"], "snr": level,
                        "mean": mean, "std": std, "n": n, "delta": delta, "se_delta": se, "pairs": pairs,
                        "centre": cell["centre"]})
    return out


def robustness_markdown(entries: list[dict[str, Any]], metric: str) -> list[str]:
    """A table of the cells against the SNR levels: the metric's mean, and Δ vs the centre ± its paired SE."""
    if not entries:
        return []
    found = list(dict.fromkeys(e["snr"] for e in entries))
    header = " | ".join(level if level == CLEAN else f"{level} dB" for level in found)
    lines = ["", f"Noise robustness: {metric} on the eval split with seeded white noise added at each SNR (the "
                 f"probe fitted on clean features); mean over seeds, then Δ vs the centre at the same SNR, paired "
                 f"by seed, ± its standard error.", "", f"| factor | value | {header} |",
             "|---|---|" + "---|" * len(found)]
    cells = list(dict.fromkeys((e["factor"], str(e["value"]), e["cell"]) for e in entries))
    for factor, value, cell in cells:
        shown = []
        for level in found:
            e = next(x for x in entries if x["cell"] == cell and x["snr"] == level and x["factor"] == factor)
            text = "—" if not math.isfinite(e["mean"]) else f"{e['mean']:.3f}"
            if not e["centre"] and math.isfinite(e["delta"]):
                text += f" ({e['delta']:+.3f}" + (f" ± {e['se_delta']:.3f})" if math.isfinite(e["se_delta"]) else ")")
            shown.append(text)
        lines.append(f"| {factor} | {value} | " + " | ".join(shown) + " |")
    return lines


def robustness_figure(entries: list[dict[str, Any]], grid: Grid, folder: Path) -> Path | None:
    """robustness.png (at ``plotting.DPI``) and its vector copy (``robustness_plot``); None without entries."""
    if not entries:
        return None
    from pipelines.plotting import save_figure

    return save_figure(robustness_plot(entries, grid), folder / "robustness.png")


def robustness_plot(entries: list[dict[str, Any]], grid: Grid):
    """One panel per factor, on one shared y-axis: the metric against the SNR of the added noise (loudest noise
    left, clean right), a line per value of the factor, dots at the mean over seeds with ± 1 std whiskers; the
    factor named by its symbol (``factor_label``), the legend under its panel; a caption saying what is drawn.
    Returned, not saved."""
    from pipelines.plotting import add_caption, plt

    found = list(dict.fromkeys(e["snr"] for e in entries))
    order = list(reversed(found[1:])) + [CLEAN]
    factors = list(dict.fromkeys(e["factor"] for e in entries))
    fig, axes = plt.subplots(1, len(factors), figsize=(2.9 * len(factors) + 0.6, 3.6), sharey=True, squeeze=False,
                             layout="constrained")
    for ax, factor in zip(axes[0], factors, strict=True):
        _robustness_panel(ax, entries, factor, order)
    axes[0, 0].set_ylabel(f"{grid.metric} ({grid.evaluation['kind']})")
    fig.suptitle(f"{grid.name}: {grid.metric} under added white noise, one panel per factor", fontsize=10)
    seeds = sorted({e["n"] for e in entries if e["snr"] == CLEAN})
    n = f"n = {seeds[0]}" if len(seeds) == 1 else f"n = {seeds[0]} to {seeds[-1]}"
    add_caption(fig, f"{grid.metric} of each cell's probe on its eval split with seeded white noise added at each "
                     f"signal-to-noise ratio (the classifier the one fitted on clean features); clean: no noise "
                     f"added. Dot: the mean over seeds; whisker: ± 1 standard deviation over seeds ({n} seeds per "
                     f"value; none for one seed). Thick orange line with diamonds: the centre. The values of a factor are "
                     f"drawn side by side at each SNR so that their whiskers do not overlap.")
    return fig


def _robustness_panel(ax, entries: list[dict[str, Any]], factor: str, order: list[str]) -> None:
    """One factor's lines of ``robustness_plot``: a line per value over the SNR levels in ``order``."""
    from pipelines.plotting import factor_label

    values = list(dict.fromkeys(str(e["value"]) for e in entries if e["factor"] == factor))
    colours = iter(["tab:blue", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"] * 4)
    for k, value in enumerate(values):
        line = [next(e for e in entries if e["factor"] == factor and str(e["value"]) == value and e["snr"] == s)
                for s in order]
        centre = line[0]["centre"]
        shift = (k - (len(values) - 1) / 2) * 0.08
        ax.errorbar([i + shift for i in range(len(order))], [e["mean"] for e in line],
                    yerr=[e["std"] if math.isfinite(e["std"]) else 0.0 for e in line],
                    label=f"{value} (centre)" if centre else value, marker="D" if centre else "o",
                    color=CENTRE_COLOUR if centre else next(colours),
                    markersize=5 if centre else 4, capsize=2, linewidth=2.2 if centre else 1.2)
    ax.set_xticks(range(len(order)), [s if s == CLEAN else s.replace("-", "−") for s in order], fontsize=8)
    ax.set_xlabel("SNR of added noise (dB)", fontsize=9)
    ax.set_title(factor_label(factor), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(title=factor_label(factor), fontsize=7, title_fontsize=8, loc="upper center",
              bbox_to_anchor=(0.5, -0.22), frameon=False, ncol=min(3, len(values)))
