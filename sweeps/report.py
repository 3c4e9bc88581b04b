"""The ablation report: the paper's Table 3 shape — factor, value, metric mean ± spread over seeds, Δ vs the centre
run, and whether Δ stands clear of the seed-to-seed noise — as CSV and markdown, one plot per factor, and the
attention of λ = 0 beside the best λ."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any

from .grid import Grid

Z = 2.0  # a difference "stands clear" when |Δ| > Z · its standard error


def _stats(values: list[float]) -> tuple[float, float, int]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan), len(values)


def seed_noise(rows: list[dict[str, Any]]) -> float:
    """Seed-to-seed standard deviation, pooled over every cell that ran more than one seed (NaN if none did)."""
    cells: dict[str, list[float]] = {}
    for r in rows:
        if r.get("metric_value") is not None:
            cells.setdefault(r["cell"], []).append(float(r["metric_value"]))
    num, den = 0.0, 0
    for values in cells.values():
        if len(values) > 1:
            num += statistics.variance(values) * (len(values) - 1)
            den += len(values) - 1
    return math.sqrt(num / den) if den else math.nan


def ablation_table(rows: list[dict[str, Any]], grid: Grid) -> list[dict[str, Any]]:
    """One row per (factor, value), the centre value included in every factor's block."""
    by_cell: dict[str, list[dict]] = {}
    for r in rows:
        by_cell.setdefault(r["cell"], []).append(r)
    centre_mean, centre_std, centre_n = _stats([r["metric_value"] for r in by_cell.get("centre", [])])
    sigma = seed_noise(rows)
    table = []
    factors = list(grid.factors) if grid.design == "one_at_a_time" else ["factorial"]
    for factor in factors:
        if grid.design == "one_at_a_time":
            values = grid.factors[factor]
            cells = [("centre" if v == grid.centre.get(factor) else f"{factor}={v}", v) for v in values]
        else:
            cells = sorted({(r["cell"], r["cell"]) for r in rows})
        for cell, value in cells:
            members = by_cell.get(cell, [])
            mean, std, n = _stats([r["metric_value"] for r in members])
            is_centre = cell == "centre"
            delta = mean - centre_mean if not is_centre else 0.0
            se = sigma * math.sqrt(1 / max(n, 1) + 1 / max(centre_n, 1)) if math.isfinite(sigma) else math.nan
            clear = None if is_centre or not math.isfinite(se) or n == 0 else abs(delta) > Z * se
            table.append({"factor": factor, "value": value, "cell": cell, "metric": grid.metric, "mean": mean,
                          "std": std, "n": n, "delta": delta, "se_delta": se if not is_centre else math.nan,
                          "clear_of_noise": clear, "centre": is_centre,
                          "errors": sum(1 for r in members if r.get("error"))})
    return table


def _fmt(x: float, digits: int = 3) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def markdown(table: list[dict[str, Any]], grid: Grid, noise: float) -> str:
    lines = [f"# Ablation report: {grid.name}", "",
             f"Metric: `{grid.metric}` ({grid.evaluation['kind']}); mean ± standard deviation over seeds (n); "
             f"Δ vs the centre run; *clear* when |Δ| > {Z:g} standard errors of the difference, with the "
             f"seed-to-seed noise σ = {_fmt(noise)} pooled over the cells that ran several seeds.", "",
             "| factor | value | " + grid.metric + " | n | Δ vs centre | clear of noise |",
             "|---|---|---|---|---|---|"]
    for row in table:
        spread = f" ± {_fmt(row['std'])}" if math.isfinite(row["std"]) else ""
        clear = "centre" if row["centre"] else {True: "yes", False: "no", None: "—"}[row["clear_of_noise"]]
        delta = "" if row["centre"] else f"{row['delta']:+.3f}" if math.isfinite(row["delta"]) else "—"
        errors = f" ({row['errors']} failed)" if row["errors"] else ""
        lines.append(f"| {row['factor']} | {row['value']} | {_fmt(row['mean'])}{spread} | {row['n']}{errors} | "
                     f"{delta} | {clear} |")
    return "\n".join(lines) + "\n"


def factor_plots(table: list[dict[str, Any]], grid: Grid, folder: Path) -> list[Path]:
    from pipelines.plotting import plt

    paths = []
    for factor in dict.fromkeys(r["factor"] for r in table):
        rows = [r for r in table if r["factor"] == factor]
        fig, ax = plt.subplots(figsize=(max(3.5, 1.1 * len(rows) + 1.5), 3.2))
        x = range(len(rows))
        means = [r["mean"] for r in rows]
        errs = [r["std"] if math.isfinite(r["std"]) else 0.0 for r in rows]
        colours = ["tab:orange" if r["centre"] else "tab:blue" for r in rows]
        ax.bar(x, means, yerr=errs, color=colours, capsize=4, alpha=0.85)
        ax.set_xticks(list(x), [str(r["value"]) for r in rows], rotation=30 if factor == "factorial" else 0,
                      fontsize=7 if factor == "factorial" else 9)
        ax.set_xlabel(factor)
        ax.set_ylabel(grid.metric)
        finite = [m for m in means if math.isfinite(m)]
        if finite:
            low, high = min(finite), max(finite)
            pad = max(0.02, (high - low) * 0.5 + max(errs))
            ax.set_ylim(max(0.0, low - pad), min(1.0, high + pad) if high <= 1 else high + pad)
        ax.set_title(f"{grid.name}: {factor} (orange = centre; bars ± seed std)", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = folder / f"factor_{factor}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def lambda_attention_figure(rows: list[dict[str, Any]], table: list[dict[str, Any]], grid: Grid, data: str,
                            folder: Path) -> Path | None:
    """The last layer's utterance-query attention (A1 − λA2) for λ = 0 beside the best λ, on the same clips."""
    if "diff_lambda" not in grid.factors:
        return None
    lam_rows = [r for r in table if r["factor"] == "diff_lambda" and math.isfinite(r["mean"])]
    zero = next((r for r in lam_rows if float(r["value"]) == 0.0), None)
    best = max((r for r in lam_rows if float(r["value"]) != 0.0), key=lambda r: r["mean"], default=None)
    if zero is None or best is None:
        return None

    def checkpoint(cell: str) -> str | None:
        found = sorted((r for r in rows if r["cell"] == cell and r.get("checkpoint")), key=lambda r: r["seed"])
        return found[0]["checkpoint"] if found else None

    paths = {"λ = 0": checkpoint(zero["cell"]), f"λ = {best['value']} (best)": checkpoint(best["cell"])}
    if not all(paths.values()) or not all(Path(p).is_file() for p in paths.values()):
        return None
    import torch

    from model import load_encoder
    from pipelines.analysis import attention_summary, event_patch_mask, event_shares, figure_clips
    from pipelines.plotting import plt

    encoders = {label: load_encoder(path).eval() for label, path in paths.items()}
    config = next(iter(encoders.values())).config
    clips = figure_clips(data, None, 4, config.target_length)
    fbank = torch.as_tensor(clips["fbank"])
    T, F = config.target_length // config.patch_size, config.num_mel_bins // config.patch_size
    mask = event_patch_mask(clips["event"], (T, F), config.patch_size)
    fig, axes = plt.subplots(len(fbank), 1 + len(encoders), figsize=(10, 2.1 * len(fbank)), squeeze=False)
    for c, (label, encoder) in enumerate(encoders.items(), start=1):
        layers = attention_summary(encoder, fbank)
        share = event_shares(layers, mask).get("attn_event_share", math.nan)
        for r in range(len(fbank)):
            grid_map = layers[-1]["effective"][r].view(T, F).T.numpy()
            vmax = float(abs(grid_map).max()) or 1.0
            axes[r, c].imshow(grid_map, origin="lower", aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(f"{label}\nattention on the event: {share:.0%}", fontsize=8)
    for r in range(len(fbank)):
        axes[r, 0].imshow(fbank[r].T.numpy(), origin="lower", aspect="auto", cmap="magma")
        ev = clips["event"][r]
        if all(math.isfinite(float(v)) for v in ev):
            axes[r, 0].axvspan(ev[0] * 100, ev[1] * 100, color="cyan", alpha=0.25)
        axes[r, 0].set_xticks([])
        axes[r, 0].set_yticks([])
    axes[0, 0].set_title("log-mel (event shaded)", fontsize=8)
    fig.suptitle("utterance-query attention A1 − λ·A2, last layer", fontsize=9)
    fig.tight_layout()
    path = folder / "attention_lambda.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def build_report(rows: list[dict[str, Any]], grid: Grid, folder: Path, *, parent_run_id: str | None = None,
                 data: str | None = None) -> dict[str, Any]:
    """Write report.csv, report.md, one PNG per factor and the λ attention figure; log them to the parent run."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = ablation_table(rows, grid)
    noise = seed_noise(rows)
    with open(folder / "report.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    text = markdown(table, grid, noise)
    (folder / "report.md").write_text(text)
    figures = factor_plots(table, grid, folder)
    attention = lambda_attention_figure(rows, table, grid, data, folder) if data else None
    if attention:
        figures.append(attention)
    if parent_run_id:
        from mlflow import MlflowClient

        client = MlflowClient()
        for path in [folder / "report.csv", folder / "report.md", *figures]:
            client.log_artifact(parent_run_id, str(path), "report")
        client.log_metric(parent_run_id, "seed_noise", noise if math.isfinite(noise) else -1.0)
        centre = next((r for r in table if r["centre"]), None)
        if centre and math.isfinite(centre["mean"]):
            client.log_metric(parent_run_id, f"centre_{grid.metric}", centre["mean"])
    return {"table": table, "markdown": text, "noise": noise, "folder": str(folder),
            "figures": [str(p) for p in figures]}


def print_report(report: dict[str, Any]) -> None:
    print()
    print(report["markdown"])

