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
    """One panel per factor: the metric against the SNR (clean at the right), a line per value, ± std over seeds."""
    if not entries:
        return None
    from pipelines.plotting import plt

    found = list(dict.fromkeys(e["snr"] for e in entries))
    order = list(reversed(found[1:])) + [CLEAN]  # loudest noise left, clean right
    factors = list(dict.fromkeys(e["factor"] for e in entries))
    fig, axes = plt.subplots(1, len(factors), figsize=(3.6 * len(factors), 3.0), squeeze=False)
    for ax, factor in zip(axes[0], factors, strict=True):
        for value in dict.fromkeys(str(e["value"]) for e in entries if e["factor"] == factor):
            line = [next(e for e in entries if e["factor"] == factor and str(e["value"]) == value and e["snr"] == s)
                    for s in order]
            centre = line[0]["centre"]
            ax.errorbar(range(len(order)), [e["mean"] for e in line],
                        yerr=[e["std"] if math.isfinite(e["std"]) else 0.0 for e in line],
                        label=f"{value}{' (centre)' if centre else ''}", marker="o", markersize=3, capsize=2,
                        linewidth=2 if centre else 1)
        ax.set_xticks(range(len(order)), [s if s == CLEAN else f"{s} dB" for s in order], fontsize=7)
        ax.set_title(factor, fontsize=9)
        ax.set_ylabel(grid.metric, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("noise robustness: the metric against the SNR of added white noise (mean ± std over seeds)",
                 fontsize=9)
    fig.tight_layout()
    path = folder / "robustness.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
