"""The ablation report: the paper's Table 3 shape — factor, value, metric mean ± spread over seeds, Δ vs the centre
run paired by seed, whether Δ stands clear of the seed-to-seed noise, and the share of attention on the labelled
event — read against a randomly initialised encoder scored the same way (the random-init baseline). Written as
CSV, markdown and summary.json, with one dot-and-whisker figure per factor and the attention of λ = 0 beside another
λ (called best only where the report finds it clearly so), each a PNG and a vector copy (``pipelines.plotting``)."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import statistics
from pathlib import Path
from typing import Any

from pipelines import tracking
from pipelines.runtime import SWEEP_BASELINE_FILE, SWEEP_STATE_FILE, SWEEP_TRIALS_FILE

from .grid import Grid
from .robustness import CENTRE_COLOUR, robustness_figure, robustness_markdown, robustness_table
from .significance import LEVEL, holm, paired_delta, seeds_for, sign_flip_floor, sign_flip_p, t_p_value

Z = 2.0  # a difference "stands clear" when |Δ| > Z · its standard error
HOMOGENEITY_LEVEL = 0.05  # Cochran's test: a cell whose seed spread stands out at this level is "unstable"
BASELINE = "baseline"  # cell and factor of the random-init rows
BASELINE_VALUE = "random-init"
BASELINE_FILE, STATE_FILE, TRIALS_FILE = SWEEP_BASELINE_FILE, SWEEP_STATE_FILE, SWEEP_TRIALS_FILE  # the folder's
SUMMARY_FILE = "summary.json"
REPRODUCE_HEADING = "## Reproducing a trial"  # report.md's last section: a command per trial (not printed)


def _finite(x: Any) -> float:
    """``x`` as a float, NaN when missing or not finite."""
    try:
        value = float(x)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def _stats(values: list[Any]) -> tuple[float, float, int]:
    """Mean, standard deviation (NaN below two values: one run has no spread) and count of the finite values."""
    values = [v for v in map(_finite, values) if math.isfinite(v)]
    if not values:
        return math.nan, math.nan, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan), len(values)


def _by_seed(rows: list[dict[str, Any]]) -> dict[int, float]:
    """seed -> metric, for the rows with a finite metric."""
    values = {r["seed"]: _finite(r.get("metric_value")) for r in rows}
    return {seed: v for seed, v in values.items() if math.isfinite(v)}


def judge(delta: float, pairs: int, sigma_diff: float, sigma: float) -> tuple[bool | None, float]:
    """(|Δ| > Z·SE, the SE used). SE = σ_diff / √pairs, with σ_diff the spread of a paired difference pooled over
    every stable cell (``difference_noise``): two pairs alone give a spread of one degree of freedom, which can be tiny
    by chance and would call noise "clear". Without a pooled σ_diff (no cell with two pairs), a difference of two
    runs is judged against √2·σ_seed (a shared seed can only bring two runs closer, so this errs towards "no").
    None when there is nothing to judge against."""
    if pairs == 0:
        return None, math.nan
    spread = sigma_diff if math.isfinite(sigma_diff) else math.sqrt(2) * sigma
    used = spread / math.sqrt(pairs)
    if not (math.isfinite(used) and math.isfinite(delta)):
        return None, used
    return abs(delta) > Z * used, used


def difference_noise(cells: list[dict[int, float]], centre: dict[int, float]) -> float:
    """σ_diff: the standard deviation of (cell − centre) at one seed, pooled over the cells with two pairs or more
    (NaN if none has)."""
    return _pooled([[cell[s] - centre[s] for s in cell.keys() & centre.keys()] for cell in cells])


def _pooled(groups: list[list[float]]) -> float:
    """The standard deviation pooled over the groups of two values or more (NaN if none has)."""
    num, den = 0.0, 0
    for values in groups:
        if len(values) > 1:
            num += statistics.variance(values) * (len(values) - 1)
            den += len(values) - 1
    return math.sqrt(num / den) if den else math.nan


def _pooled_df(groups: list[list[float]]) -> int:
    """The degrees of freedom of ``_pooled`` over the same groups."""
    return sum(len(values) - 1 for values in groups if len(values) > 1)


def collapsed(row: dict[str, Any]) -> bool:
    """Whether the trial's collapse guard tripped during its pretraining (``model.health``)."""
    return bool(row.get("collapse"))


def _seed_values(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """cell -> the finite metrics of its pretrained trials that did not collapse (the random-init baseline and
    collapsed seeds left out: a broken encoder's score says nothing of the seed-to-seed noise)."""
    cells: dict[str, list[float]] = {}
    for r in rows:
        if r["cell"] != BASELINE and not collapsed(r) and math.isfinite(_finite(r.get("metric_value"))):
            cells.setdefault(r["cell"], []).append(float(r["metric_value"]))
    return cells


def cochran_limit(cells: int, runs: int, level: float = HOMOGENEITY_LEVEL) -> float:
    """The upper critical value of Cochran's C (largest variance / sum of variances) for ``cells`` variances of
    ``runs`` runs each, at ``level``: 1 / (1 + (k − 1) / F), F the 1 − level/k quantile of F(n − 1, (k − 1)(n − 1))."""
    from scipy.stats import f

    quantile = f.ppf(1 - level / cells, runs - 1, (cells - 1) * (runs - 1))
    return 1.0 / (1.0 + (cells - 1) / quantile)


def unstable_cells(rows: list[dict[str, Any]], level: float = HOMOGENEITY_LEVEL) -> list[str]:
    """The cells whose seeds disagree far beyond every other cell's: Cochran's test for one outlying variance, as
    ISO 5725-2 applies it before pooling a repeatability spread, repeated on the remaining cells until none stands
    out (three cells or more, each with the same number of seeds, two or more; otherwise none is tested).

    A cell that collapses on one seed and not the other measures its own instability, not the instrument's noise:
    pooled in, it would inflate σ_seed and σ_diff for every other cell."""
    return _outlying_cells(_seed_values(rows), level)


def _outlying_cells(values: dict[str, list[float]], level: float = HOMOGENEITY_LEVEL) -> list[str]:
    """``unstable_cells`` of cell -> metrics."""
    cells = {c: v for c, v in values.items() if len(v) > 1}
    if len({len(v) for v in cells.values()}) != 1:
        return []
    runs = len(next(iter(cells.values()))) if cells else 0
    flagged: list[str] = []
    while len(cells) >= 3:
        variances = {c: statistics.variance(v) for c, v in cells.items()}
        total = sum(variances.values())
        worst = max(variances, key=variances.get)
        if total <= 0 or variances[worst] / total <= cochran_limit(len(cells), runs, level):
            break
        flagged.append(worst)
        del cells[worst]
    return sorted(flagged)


def seed_noise(rows: list[dict[str, Any]], exclude: set[str] | list[str] = ()) -> float:
    """σ_seed: the pretrained trials' seed-to-seed standard deviation, pooled over every cell that ran more than one
    seed (NaN if none did), less the cells in ``exclude`` (``unstable_cells``). The random-init baseline is no
    pretrained cell and stays out."""
    return _pooled([v for c, v in _seed_values(rows).items() if c not in exclude])


@dataclasses.dataclass(frozen=True)
class Noise:
    """What a Δ is judged against: σ_diff and σ_seed pooled over the stable cells, the cells left out as unstable
    (``unstable_cells``), σ_seed with them pooled in, and the collapsed trials left out of all of it
    ("cell seed N")."""
    sigma_diff: float
    sigma_seed: float
    unstable: tuple[str, ...] = ()
    sigma_seed_all: float = math.nan
    collapsed: tuple[str, ...] = ()
    df_diff: int = 0  # degrees of freedom of sigma_diff and sigma_seed
    df_seed: int = 0


def table_row(factor: str, value: Any, cell: str, members: list[dict[str, Any]], centre: dict[int, float],
              noise: Noise, metric: str) -> dict[str, Any]:
    """One line of the table: the cell's runs (``members``) against the centre's metric per seed. A Δ is judged
    against the pooled noise (``judge``); an unstable cell's against its own paired spread, which is what its
    seeds showed (two pairs that disagree make it wide, and the verdict errs towards "no")."""
    mean, std, n = _stats([r.get("metric_value") for r in members])
    is_centre = cell == "centre"
    unstable = cell in noise.unstable
    own = _by_seed(members)
    if is_centre:
        delta, pairs, z_rule, se, df = 0.0, n, None, math.nan, 0
    elif unstable or shares_pretraining(members):
        delta, se, pairs = paired_delta(own, centre)
        z_rule = bool(abs(delta) > Z * se) if math.isfinite(se) and math.isfinite(delta) else None
        df = pairs - 1
    else:
        delta, _, pairs = paired_delta(own, centre)
        z_rule, se = judge(delta, pairs, noise.sigma_diff, noise.sigma_seed)
        df = noise.df_diff if math.isfinite(noise.sigma_diff) else noise.df_seed
    p = math.nan if is_centre else t_p_value(delta, se, df)
    flips = [own[s] - centre[s] for s in sorted(own.keys() & centre.keys())]
    return {"factor": factor, "value": value, "cell": cell, "metric": metric, "mean": mean, "std": std, "n": n,
            "delta": delta, "se_delta": se, "pairs": pairs, "df": df, "p": p, "p_holm": p, "z_rule": z_rule,
            "clear": None if not math.isfinite(p) else p < LEVEL,
            "p_sign_flip": math.nan if is_centre else sign_flip_p(flips), "unstable": unstable,
            **attention_stats(members), "cost": cost_stats(members), "centre": is_centre,
            "errors": sum(1 for r in members if r.get("error")),
            "collapsed": sum(1 for r in members if collapsed(r)),
            "alpha": _stats([r.get("alpha") for r in members])[0],
            "alpha_effective": _stats([r.get("alpha_effective") for r in members])[0],
            "shares_pretraining": shares_pretraining(members)}


def _attention(row: dict[str, Any], key: str) -> Any:
    return (row.get("attention") or {}).get(key, row.get(key))


def attention_stats(members: list[dict[str, Any]]) -> dict[str, Any]:
    """A cell's attention evidence over its runs (``pipelines.analysis.attention_evidence``): mean and std over
    seeds of the event share and of the negative mass off the event (last layer), the fewest clips a run measured
    them on, and the per-layer means."""
    out: dict[str, Any] = {}
    for key in ("attn_event_share", "attn_event_share_a1", "attn_negative_off_event"):
        mean, std, _ = _stats([_attention(r, key) for r in members])
        out[key], out[f"{key}_std"] = mean, std
    clips = [c for c in (_finite(_attention(r, "attn_clips")) for r in members) if math.isfinite(c)]
    out["attn_clips"] = int(min(clips)) if clips else None
    layers = []
    for i in itertools.count():
        if not any(_attention(r, f"attn_event_share_layer{i}") is not None for r in members):
            break
        layers.append({"layer": i, **{name: _stats([_attention(r, f"{key}_layer{i}") for r in members])[0]
                                      for name, key in (("event_share", "attn_event_share"),
                                                        ("event_share_a1", "attn_event_share_a1"),
                                                        ("negative_off_event", "attn_negative_off_event"))}})
    out["attn_layers"] = layers
    return out


COSTS = ("clips_per_s", "loop_rss_mb", "peak_rss_mb", "peak_gpu_mb", "params", "gflops_per_update")


def cost_stats(members: list[dict[str, Any]]) -> dict[str, float]:
    """A cell's cost (the trials' ``cost``): mean over its runs of each of COSTS, and the std of the clips per
    second (the one that varies from run to run); NaN where not measured."""
    out: dict[str, float] = {}
    for key in COSTS:
        mean, std, _ = _stats([(r.get("cost") or {}).get(key) for r in members])
        out[key] = mean
        if key == "clips_per_s":
            out["clips_per_s_std"] = std
    return out


def ablation_table(rows: list[dict[str, Any]], grid: Grid, noise: Noise | None = None) -> list[dict[str, Any]]:
    """One row per (factor, value), the centre value included in every factor's block. ``noise``: the rows'
    ``noises``, when the caller has them."""
    by_cell = _cells(rows)
    centre = _by_seed(by_cell.get("centre", []))
    noise = noise or noises(rows)
    table = []
    factors = list(grid.factors) if grid.design == "one_at_a_time" else ["factorial"]
    centre_values = {**grid.centre, **grid.centre_evaluation}
    for factor in factors:
        if grid.design == "one_at_a_time":
            values = grid.factors[factor]
            cells = [("centre" if v == centre_values.get(factor) else f"{factor}={v}", v) for v in values]
        else:
            cells = sorted({(cell, cell) for cell in by_cell})
        table += [table_row(factor, value, cell, by_cell.get(cell, []), centre, noise, grid.metric)
                  for cell, value in cells]
    return holm_corrected(table)


def holm_corrected(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``table`` with each comparison's p Holm-adjusted across the grid's comparisons (every cell but the centre,
    each once), and ``clear`` the adjusted verdict at LEVEL (``sweeps.significance``)."""
    comparisons = list({r["cell"]: r for r in table if not r["centre"]}.values())
    for row, adjusted in zip(comparisons, holm([r["p"] for r in comparisons]), strict=True):
        row["p_holm"] = adjusted
        row["clear"] = None if not math.isfinite(adjusted) else adjusted < LEVEL
    return table


def baseline_row(baseline: list[dict[str, Any]], rows: list[dict[str, Any]], metric: str,
                 noise: Noise | None = None) -> dict[str, Any] | None:
    """The random-init encoder's line, its Δ paired by seed with the centre's (None when no baseline ran)."""
    if not baseline:
        return None
    centre = _by_seed([r for r in rows if r["cell"] == "centre"])
    return table_row(BASELINE, BASELINE_VALUE, BASELINE, baseline, centre, noise or noises(rows), metric)


def _cells(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """cell -> its trial rows, the random-init baseline left out."""
    by_cell: dict[str, list[dict]] = {}
    for r in rows:
        if r["cell"] != BASELINE:
            by_cell.setdefault(r["cell"], []).append(r)
    return by_cell


def shares_pretraining(members: list[dict[str, Any]]) -> bool:
    """Whether a cell's runs are another cell's pretrainings evaluated another way (an evaluation factor such as
    readout): its Δ pairs two evaluations of one encoder, so the pretraining's seed noise is not its noise; it is
    judged against its own paired spread and kept out of the pooled σ."""
    return any(r.get("shares_pretraining_of") for r in members)


def noises(rows: list[dict[str, Any]]) -> Noise:
    """σ_diff and σ_seed of the pretrained trials, both pooled over the cells that are not unstable, collapsed
    trials and evaluation-factor cells (``shares_pretraining``) left out."""
    fallen = tuple(f"{r['cell']} seed {r['seed']}" for r in rows if r["cell"] != BASELINE and collapsed(r)
                   and not r.get("shares_pretraining_of"))
    rows = [r for r in rows if not collapsed(r) and not r.get("shares_pretraining_of")]
    values = _seed_values(rows)
    unstable = _outlying_cells(values)
    by_cell = _cells(rows)
    centre = _by_seed(by_cell.pop("centre", []))
    stable = [_by_seed(m) for cell, m in by_cell.items() if cell not in unstable]
    diffs = [[cell[s] - centre[s] for s in cell.keys() & centre.keys()] for cell in stable]
    seeds = [v for c, v in values.items() if c not in unstable]
    return Noise(difference_noise(stable, centre), _pooled(seeds), tuple(unstable), _pooled(list(values.values())),
                 fallen, df_diff=_pooled_df(diffs), df_seed=_pooled_df(seeds))


def _fmt(x: Any, digits: int = 3) -> str:
    x = _finite(x)
    return "—" if not math.isfinite(x) else f"{x:.{digits}f}"


def _line(row: dict[str, Any], alpha_column: bool = False) -> str:
    """A markdown table line: no ± where one run gives no spread (n = 1), Δ ± SE only where the SE was measured
    from paired differences; a cell with collapsed seeds says how many; ``alpha_column``: the effective alpha."""
    spread = f" ± {_fmt(row['std'])}" if math.isfinite(row["std"]) else ""
    if row["centre"]:
        delta, p, clear, flips = "", "", "centre", ""
    else:
        p, flips = _p(row.get("p_holm")), _p(row.get("p_sign_flip"))
        delta = f"{row['delta']:+.3f}" if math.isfinite(row["delta"]) else "—"
        if row["pairs"] >= 2 and math.isfinite(row["se_delta"]):
            delta += f" ± {row['se_delta']:.3f}"
        clear = {True: "yes", False: "no", None: "—"}[row["clear"]]
        if row.get("unstable"):
            clear += " (unstable: seeds disagree)"
    errors = f" ({row['errors']} failed)" if row["errors"] else ""
    errors += f" (**{row['collapsed']} collapsed**)" if row.get("collapsed") else ""
    alpha = f" {_fmt(row.get('alpha_effective'), 3)} |" if alpha_column else ""
    return (f"| {row['factor']} | {row['value']} | {_fmt(row['mean'])}{spread} | {row['n']}{errors} | {delta} | "
            f"{p} | {clear} | {flips} | {_spread(row, 'attn_event_share')} | "
            f"{_spread(row, 'attn_negative_off_event')} | {_cost_cells(row.get('cost') or {})} |{alpha}")


def _cost_cells(cost: dict[str, Any]) -> str:
    """clips/s (± std over seeds), peak memory in MB (the GPU's where measured, else the process's) and GFLOPs
    per update, as three table cells."""
    rate, std = _finite(cost.get("clips_per_s")), _finite(cost.get("clips_per_s_std"))
    shown = "—" if not math.isfinite(rate) else f"{rate:.0f}" + (f" ± {std:.0f}" if math.isfinite(std) else "")
    memory = _finite(cost.get("peak_gpu_mb"))
    memory = memory if math.isfinite(memory) else _finite(cost.get("loop_rss_mb"))
    flops = _finite(cost.get("gflops_per_update"))
    return (f"{shown} | {'—' if not math.isfinite(memory) else f'{memory:.0f}'} | "
            f"{'—' if not math.isfinite(flops) else f'{flops:.3g}'}")


def _spread(row: dict[str, Any], key: str) -> str:
    """``key``'s mean ± its std over seeds (no ± for one run), two decimals; — when not measured."""
    std = _finite(row.get(f"{key}_std"))
    return _fmt(row.get(key), 2) + (f" ± {std:.2f}" if math.isfinite(std) and math.isfinite(_finite(row.get(key)))
                                    else "")


def significance_text(table: list[dict[str, Any]]) -> str:
    """How *clear* is decided, and what the seed count allows the exact test to show."""
    comparisons = len({r["cell"] for r in table if not r["centre"] and math.isfinite(_finite(r.get("p")))})
    pairs = max((r["pairs"] for r in table if not r["centre"]), default=0)
    floor = sign_flip_floor(pairs)
    text = (f"*clear*: Holm-corrected p < {LEVEL:g} across the grid's {comparisons} comparisons (p (Holm)), p from "
            f"Student's t of Δ / its standard error with that error's degrees of freedom (the pooled σ_diff's, or "
            f"pairs − 1 where a cell is judged by its own pairs); the uncorrected rule |Δ| > {Z:g} standard errors "
            f"is `z_rule` in report.csv. Sign-flip p: the exact paired test over seeds, which assumes nothing of "
            f"the noise's shape")
    if floor > LEVEL:
        text += (f"; with {pairs} pairs it cannot go below {floor:.3g}, so no comparison can be significant by it: "
                 f"a grid needs {seeds_for(LEVEL)} seeds or more for that")
    return text + "."


COST_TEXT = ("Cost: clips per second over the training loop (mean ± std over seeds), the memory the loop needed "
             "(the GPU's peak allocation where it trained on one; on a CPU the growth of the training process's "
             "resident memory over the loop, from where it stood once freed heap was handed back) and the FLOPs of "
             "one pretraining update at the frames fed (torch's counter); the encoder's parameters and the "
             "process's whole peak resident memory are in summary.json.")


def attention_text(table: list[dict[str, Any]], chance: str) -> str:
    """What the attention columns measure, and on how many clips."""
    clips = [r["attn_clips"] for r in table if r.get("attn_clips")]
    over = f"over {min(clips)} held-out clips per run" if clips else "not measured: the data has no events"
    return (f"Attention on event ({over}, padded patches left out): the share of the positive mass of the last "
            f"layer's utterance-query map A1 − λ·A2 (A for standard attention) that lies on the labelled event's "
            f"patches{chance}; negative off event: the mass the subtraction takes from the other patches (what it "
            f"cancels; 0 for standard attention). Mean ± std over the cell's seeds; every layer, and A1 alone, in "
            f"summary.json (attn_layers); — where the data has no events.")


def _p(value: Any) -> str:
    value = _finite(value)
    return "—" if not math.isfinite(value) else "<0.001" if value < 0.001 else f"{value:.3f}"


def markdown(table: list[dict[str, Any]], grid: Grid, noise: Noise, baseline: dict[str, Any] | None = None,
             uniform_share: float = math.nan) -> str:
    sigma = noise.sigma_seed
    how = (f"σ_seed = {_fmt(sigma)}, pooled over the cells that ran several seeds" if math.isfinite(sigma) else
           "σ_seed unknown (no cell ran two seeds), so a one-seed Δ cannot be judged: give the grid two seeds or more")
    if noise.unstable:
        how += (f", less the cells whose seeds disagree far beyond the others' ({', '.join(noise.unstable)}: "
                f"Cochran's test at {HOMOGENEITY_LEVEL:g}); each of those is judged against its own paired spread, "
                f"and σ_seed with them is {_fmt(noise.sigma_seed_all)}")
    if noise.collapsed:
        how += (f"; collapsed trials (their collapse guard tripped: the encoder gave nearly one output for every "
                f"clip) are marked in n and left out of σ_seed and σ_diff: {', '.join(noise.collapsed)}")
    shared = sorted({str(r["factor"]) for r in table if r.get("shares_pretraining")})
    if shared:
        how += (f"; the cells of {', '.join(shared)} are evaluations of the centre's own pretrainings (one encoder "
                f"per seed, evaluated each way): their Δ pairs two evaluations of one encoder, is judged against "
                f"its own paired spread and is left out of σ_seed and σ_diff")
    chance = f" (a uniform map gives {_fmt(uniform_share, 2)})" if math.isfinite(_finite(uniform_share)) else ""
    lines = [f"# Ablation report: {grid.name}", "",
             f"Metric: `{grid.metric}` ({grid.evaluation['kind']}); mean ± standard deviation over seeds (n; no ± "
             f"for one seed). Δ vs centre: the mean over seeds of (cell − centre) at the same seed, ± its standard "
             f"error σ_diff/√pairs, with σ_diff the spread of one paired difference pooled over every stable cell (or, "
             f"where no cell has two seeds, √2·σ_seed). {how}.", "", significance_text(table), "",
             attention_text(table, chance), "", COST_TEXT, "",
             f"**Baseline (random-init encoder): {_summary_value(baseline)}; σ_seed = {_fmt(sigma)}.**", "",
             *table_lines(table, grid.metric, baseline)]
    if alpha_moves(table):
        lines[2:2] = ["α effective: the utterance term's weight per element relative to the frame term (under the "
                      "release's sums α × clips × clones per device); it differs between cells here, so a cell "
                      "that changes the student count or the batch also changes it.", ""]
    return "\n".join(lines) + "\n"


def table_lines(table: list[dict[str, Any]], metric: str, baseline: dict[str, Any] | None = None) -> list[str]:
    """The main table in markdown: its header, then the random-init baseline's line and one line per row."""
    alpha_column = alpha_moves(table)
    return [f"| factor | value | {metric} | n | Δ vs centre | p (Holm) | clear | sign-flip p | attention on "
            f"event | negative off event | clips/s | peak MB | GFLOPs/update |" + (" α effective |" if alpha_column
                                                                                 else ""),
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if alpha_column else ""),
            *(_line(row, alpha_column) for row in ([baseline] if baseline else []) + table)]


def evaluation_pairs(rows: list[dict[str, Any]], grid: Grid) -> list[dict[str, Any]]:
    """Every two values of each evaluation factor (one-at-a-time designs), compared on the same encoders: Δ = the
    mean over seeds of (a − b) at the same seed, ± the standard error of those differences."""
    from .grid import EVAL_FACTORS

    if grid.design != "one_at_a_time":
        return []
    by_cell = _cells(rows)
    centre = {**grid.centre, **grid.centre_evaluation}
    pairs = []
    for factor in (f for f in grid.factors if f in EVAL_FACTORS):
        cells = {v: _by_seed(by_cell.get("centre" if v == centre.get(factor) else f"{factor}={v}", []))
                 for v in grid.factors[factor]}
        for a, b in itertools.combinations(grid.factors[factor], 2):
            delta, se, n = paired_delta(cells[a], cells[b])
            pairs.append({"factor": factor, "a": a, "b": b, "delta": delta, "se_delta": se, "pairs": n})
    return pairs


def pairs_markdown(pairs: list[dict[str, Any]], metric: str) -> list[str]:
    """The evaluation factors' pairwise comparisons as markdown lines (none when the grid has none)."""
    if not pairs:
        return []
    lines = ["", f"Evaluation factors compared pairwise on the same encoders ({metric}; Δ = a − b, the mean over "
                 f"seeds of the paired difference ± its standard error):", "", "| factor | a | b | Δ | pairs |",
             "|---|---|---|---|---|"]
    for p in pairs:
        se = f" ± {p['se_delta']:.3f}" if math.isfinite(p["se_delta"]) else ""
        delta = f"{p['delta']:+.3f}" if math.isfinite(_finite(p["delta"])) else "—"
        lines.append(f"| {p['factor']} | {p['a']} | {p['b']} | {delta}{se} | {p['pairs']} |")
    return lines


def task_reports(rows: list[dict[str, Any]], baseline: list[dict[str, Any]], grid: Grid) -> dict[str, Any]:
    """Each of the grid's tasks (``Grid.tasks``) as a table of its own: the trials' scores on the task read as
    their metric (read-out cells have none), with the task's random-init baseline, judged as the main table."""
    out = {}
    for task in grid.tasks:
        name = task["name"]
        scored = [{**r, "metric_value": (r.get("tasks") or {}).get(name), "robustness": {}} for r in rows
                  if name in (r.get("tasks") or {})]
        base = [{**r, "metric_value": (r.get("tasks") or {}).get(name)} for r in baseline]
        noise = noises(scored)
        table = [r for r in ablation_table(scored, grid, noise) if r["n"] or r["centre"]]
        out[name] = {"metric": task["metric"], "table": table, "noise": noise,
                     "baseline": baseline_row(base, scored, task["metric"], noise)}
    return out


def best_by_task(reports: dict[str, Any], main: list[dict[str, Any]], grid: Grid) -> list[dict[str, Any]]:
    """Which value of each factor scores best on which task (the main evaluation first): its mean, and its Δ vs
    the centre paired by seed ± SE with the Holm-corrected p of that task's table."""
    found = []
    for task, table in [("main", main), *((n, r["table"]) for n, r in reports.items())]:
        for factor in dict.fromkeys(r["factor"] for r in table):
            cells = [r for r in table if r["factor"] == factor and math.isfinite(_finite(r["mean"]))]
            if not cells:
                continue
            best = max(cells, key=lambda r: r["mean"])
            found.append({"task": task, "factor": factor, "best": best["value"], "mean": best["mean"],
                          "delta": best["delta"], "se_delta": best["se_delta"], "p_holm": best.get("p_holm"),
                          "is_centre": best["centre"]})
    return found


def tasks_markdown(reports: dict[str, Any], best: list[dict[str, Any]], grid: Grid) -> list[str]:
    """One table per task, then the task × factor summary; nothing for a grid without tasks."""
    if not reports:
        return []
    lines = []
    for name, report in reports.items():
        metric, sigma = report["metric"], report["noise"].sigma_seed
        lines += ["", f"## Task {name}: `{metric}` (probe of every trial's encoder on its own data)", "",
                  f"**Baseline (random-init encoder): {_summary_value(report['baseline'])}; σ_seed = "
                  f"{_fmt(sigma)}.**", "", f"| factor | value | {metric} | n | Δ vs centre | p (Holm) | clear |",
                  "|---|---|---|---|---|---|---|"]
        lines += [_seven(_line(r))  # the main table's first seven columns
                  for r in ([report["baseline"]] if report["baseline"] else []) + report["table"]]
    lines += ["", "## Best value of each factor on each task", "", "Δ vs the centre on that task, paired by seed, ± "
              "its standard error, and its Holm-corrected p (the centre itself when no other value beats it).", "",
              "| factor | " + " | ".join(["main", *reports]) + " |", "|---|" + "---|" * (1 + len(reports))]
    for factor in dict.fromkeys(b["factor"] for b in best):
        cells = []
        for task in ["main", *reports]:
            b = next((x for x in best if x["task"] == task and x["factor"] == factor), None)
            if b is None:
                cells.append("—")
                continue
            delta = "centre" if b["is_centre"] else (f"{b['delta']:+.3f}" + (
                f" ± {b['se_delta']:.3f}" if math.isfinite(_finite(b["se_delta"])) else "") + f", p {_p(b['p_holm'])}")
            cells.append(f"{b['best']} ({_fmt(b['mean'])}; {delta})")
        lines.append(f"| {factor} | " + " | ".join(cells) + " |")
    return lines


def alpha_moves(table: list[dict[str, Any]]) -> bool:
    """Whether the utterance term's effective weight moves with something other than α between the cells (under
    the release's sums: the student count, the batch per device): its ratio to α differs between cells."""
    ratios = {round(_finite(r.get("alpha_effective")) / a, 9) for r in table
              if math.isfinite(a := _finite(r.get("alpha"))) and a > 0
              and math.isfinite(_finite(r.get("alpha_effective")))}
    return len(ratios) > 1


def _summary_value(row: dict[str, Any] | None) -> str:
    if row is None:
        return "not run"
    spread = f" ± {_fmt(row['std'])}" if math.isfinite(row["std"]) else ""
    return f"{_fmt(row['mean'])}{spread} (n = {row['n']})"


VALUE_COLOUR, BASELINE_COLOUR = "tab:blue", "0.35"  # the centre's colour is CENTRE_COLOUR, as on robustness.png


def factor_panel(ax, rows: list[dict[str, Any]], metric: str, baseline: dict[str, Any] | None = None) -> None:
    """One factor's dot-and-whisker panel: each value's mean over seeds (the centre an orange diamond), a whisker of
    ± one std over seeds only where a value ran two seeds or more (one run has no spread to show), a star over a
    value whose Δ vs the centre is clear (Holm-corrected), and the random-init baseline as a dashed line in a band
    of ± its std; the legend beside the axes, off the data. Dots, not bars: a bar's length reads as the quantity,
    true only from zero, where the differences the seeds allow would be too small to see."""
    spread = [(i, r["mean"], r["std"]) for i, r in enumerate(rows) if math.isfinite(_finite(r["std"]))]
    legend = []
    if spread:
        xs, ys, errs = zip(*spread, strict=True)
        legend.append((ax.errorbar(xs, ys, yerr=errs, fmt="none", ecolor="black", elinewidth=1.2, capsize=4,
                                   zorder=2), "± 1 std over seeds"))
    for centre, colour, marker, label in ((False, VALUE_COLOUR, "o", "mean over seeds"),
                                          (True, CENTRE_COLOUR, "D", "centre (mean)")):
        points = [(i, r["mean"]) for i, r in enumerate(rows) if bool(r["centre"]) == centre]
        if points:
            legend.append((ax.plot(*zip(*points, strict=True), linestyle="none", marker=marker, markersize=7,
                                   color=colour, markeredgecolor="black", zorder=3)[0], label))
    for i, r in enumerate(rows):
        if r.get("clear") and not r["centre"]:
            ax.annotate("*", (i, r["mean"] + _or_zero(r["std"])), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=12)
    levels = [r["mean"] + k * _or_zero(r["std"]) for r in rows for k in (-1, 1)]
    if baseline is not None and math.isfinite(_finite(baseline["mean"])):
        legend.append((_baseline_reference(ax, baseline), f"{BASELINE_VALUE} encoder (± 1 std)"))
        levels += [baseline["mean"] + k * _or_zero(baseline.get("std")) for k in (-1, 1)]
    finite = [v for v in levels if math.isfinite(v)]
    if finite:
        low, high = min(finite), max(finite)
        pad = max(0.01, (high - low) * 0.12)
        ax.set_ylim(low - pad, high + 2 * pad)
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.set_ylabel(metric)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(*zip(*legend, strict=True), loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)


def _or_zero(x: Any) -> float:
    """``x`` as a float, 0 when missing or not finite: a spread that was not measured draws no whisker."""
    value = _finite(x)
    return value if math.isfinite(value) else 0.0


def _baseline_reference(ax, baseline: dict[str, Any]):
    """The random-init baseline across the panel: its mean as a dashed line in a band of ± its std over seeds
    (no band for one seed); returns the legend's handle: a tuple of both draws one over the other."""
    mean, std = baseline["mean"], _finite(baseline.get("std"))
    line = ax.axhline(mean, color=BASELINE_COLOUR, linestyle="--", linewidth=1.2, zorder=1)
    if not math.isfinite(std):
        return line
    band = ax.axhspan(mean - std, mean + std, color=BASELINE_COLOUR, alpha=0.18, linewidth=0, zorder=0)
    return (band, line)


def _value_label(row: dict[str, Any]) -> str:
    return f"{row['value']}\n(centre)" if row["centre"] else str(row["value"])


def factor_caption(rows: list[dict[str, Any]], baseline: dict[str, Any] | None) -> str:
    """What a factor figure shows, in words: what the dot and the whisker are, over how many seeds, the centre, the
    baseline and what a star means."""
    seeds = sorted({r["n"] for r in rows})
    n = f"n = {seeds[0]}" if len(seeds) == 1 else f"n = {seeds[0]} to {seeds[-1]}"
    base = "" if baseline is None else (
        f" Dashed line and grey band: a randomly initialised encoder scored the same way, mean ± 1 std over its "
        f"{baseline['n']} seeds.")
    return (f"Dot: the mean over seeds; whisker: ± 1 standard deviation over seeds ({n} seeds per value; no "
            f"whisker where a value ran one seed). Orange diamond: the centre, the configuration every other value "
            f"is compared with.{base} *: the difference from the centre, paired by seed, is clear (Student's t, "
            f"Holm-corrected across the grid's comparisons, p < {LEVEL:g}).")


def factor_figure(rows: list[dict[str, Any]], factor: str, grid: Grid, baseline: dict[str, Any] | None = None):
    """One factor's figure (``factor_panel``), its axis named by the factor's symbol (``factor_label``), a title
    and a caption saying what is drawn; returned, not saved."""
    from pipelines.plotting import add_caption, factor_label, plt

    factorial = factor == "factorial"
    fig, ax = plt.subplots(figsize=(max(2.6, 0.9 * len(rows) + 1.0) + 2.2, 3.2), layout="constrained")
    factor_panel(ax, rows, f"{grid.metric} ({grid.evaluation['kind']})", baseline)
    ax.set_xticks(list(range(len(rows))), [_value_label(r) for r in rows], rotation=30 if factorial else 0,
                  fontsize=7 if factorial else 9)
    ax.set_xlabel(factor_label(factor))
    ax.set_title(f"{grid.name}: {grid.metric} by {factor_label(factor)}", fontsize=10)
    add_caption(fig, factor_caption(rows, baseline))
    return fig


def factor_plots(table: list[dict[str, Any]], grid: Grid, folder: Path,
                 baseline: dict[str, Any] | None = None) -> list[Path]:
    """factor_<name>.png (at ``plotting.DPI``) and its vector copy for each factor of the table; the PNGs' paths."""
    from pipelines.plotting import save_figure

    return [save_figure(factor_figure([r for r in table if r["factor"] == factor], factor, grid, baseline),
                        folder / f"factor_{factor}.png")
            for factor in dict.fromkeys(r["factor"] for r in table)]


def with_vector_copies(figures: list[Path]) -> list[Path]:
    """The figures' PNGs and, after them, the vector copy written beside each (``plotting.save_figure``), so that
    the run's artifacts hold both."""
    from pipelines.plotting import VECTOR_SUFFIX

    return [*figures, *(v for p in figures if (v := Path(p).with_suffix(VECTOR_SUFFIX)).is_file())]


def lambda_panels(table: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The two λ cells the attention figure draws, with their labels: λ = 0, and beside it the λ of the highest
    mean where its Δ vs the centre is positive and clear (Holm-corrected): it alone is called "best"; else the
    centre's λ; else the other λ of the highest mean, called nothing. [] without λ = 0 or another λ. A highest
    mean that the seeds do not separate from the centre is no finding, and the figure does not name one."""
    lam = [r for r in table if r["factor"] == "diff_lambda" and math.isfinite(_finite(r["mean"]))]
    zero = next((r for r in lam if float(r["value"]) == 0.0), None)
    others = [r for r in lam if float(r["value"]) != 0.0]
    if zero is None or not others:
        return []
    top = max(lam, key=lambda r: r["mean"])
    best = top if top.get("clear") is True and not top["centre"] and _finite(top["delta"]) > 0 else None
    if best is not None and best is not zero:
        other = best
    else:
        other = next((r for r in others if r["centre"]), None) or max(others, key=lambda r: r["mean"])
    return [(_lambda_label(r, r is best), r) for r in (zero, other)]


def _lambda_label(row: dict[str, Any], best: bool) -> str:
    """"λ = 0.3", with "(centre)" for the centre and "(best: Δ ..., p ...)" for the clear best."""
    tags = ["centre"] if row["centre"] else []
    if best:
        tags.append(f"best: Δ {row['delta']:+.3f} vs centre, Holm p {_p(row.get('p_holm'))}")
    return f"λ = {float(row['value']):g}" + (f" ({'; '.join(tags)})" if tags else "")


def _lambda_checkpoints(rows: list[dict[str, Any]], table: list[dict[str, Any]],
                        grid: Grid) -> dict[str, tuple[str, dict[str, Any]]]:
    """{panel label: (checkpoint, table row)} for the cells of ``lambda_panels`` (each cell's lowest seed's
    checkpoint), or {} if one lacks one."""
    if "diff_lambda" not in grid.factors:
        return {}

    def checkpoint(cell: str) -> str | None:
        found = sorted((r for r in rows if r["cell"] == cell and r.get("checkpoint")), key=lambda r: r["seed"])
        return found[0]["checkpoint"] if found else None

    paths = {label: (checkpoint(row["cell"]), row) for label, row in lambda_panels(table)}
    return paths if paths and all(p and Path(p).is_file() for p, _ in paths.values()) else {}


def lambda_attention_figure(rows: list[dict[str, Any]], table: list[dict[str, Any]], grid: Grid, data: str,
                            folder: Path) -> Path | None:
    """attention_lambda.png (and its vector copy): the last layer's utterance-query attention (A1 − λA2) of λ = 0
    beside another λ (``lambda_panels``) on the same clips at the data set's own length, each map on the axes of
    the clip's log-mel, all on one colour scale (``analysis.attention_grid``)."""
    paths = _lambda_checkpoints(rows, table, grid)
    if not paths:
        return None
    import torch

    from model import load_encoder
    from pipelines import analysis
    from pipelines.plotting import save_figure

    encoders = {label: load_encoder(path).eval() for label, (path, _) in paths.items()}
    config = next(iter(encoders.values())).config
    # A fixed sincos table serves any length; a learned table only the one it was trained with.
    clips = analysis.figure_clips(data, None, 4, None if config.pos_embed == "sincos2d" else config.target_length)
    fbank = torch.as_tensor(clips["fbank"])
    patches = (fbank.shape[1] // config.patch_size, config.num_mel_bins // config.patch_size)
    panels = [(f"{label}\non event {_spread(paths[label][1], 'attn_event_share')}; negative off it "
               f"{_spread(paths[label][1], 'attn_negative_off_event')}",
               analysis.attention_summary(encoder, fbank)[-1]["effective"]) for label, encoder in encoders.items()]
    fig = analysis.attention_grid(clips, panels, patches, config.patch_size)
    fig.suptitle(f"{grid.name}: utterance-query attention A1 − λ·A2, last layer", fontsize=10)
    seeds = sorted({min(r["seed"] for r in rows if r["cell"] == row["cell"]) for _, row in paths.values()})
    _lambda_caption(fig, [row for _, row in paths.values()], seeds, config.patch_size)
    return save_figure(fig, folder / "attention_lambda.png")


def _lambda_caption(fig, shown: list[dict[str, Any]], seeds: list[int], patch_size: int) -> None:
    """The λ attention figure's caption: what each panel is, what the numbers above a column measure, whose
    encoder is drawn and when a λ is called best."""
    from pipelines.plotting import add_caption

    clips = next((r["attn_clips"] for r in shown if r.get("attn_clips")), None)
    add_caption(fig, f"Rows: four held-out clips; left, the clip's log-mel. Each map: the last layer's attention "
                     f"of the utterance query, averaged over heads, one cell per patch of {patch_size} frames × "
                     f"{patch_size} mel bins on the log-mel's axes; one colour scale for every map (red positive, "
                     f"blue negative). White lines outlined in black: the start and end of the clip's labelled event. Maps of each "
                     f"cell's seed-{'/'.join(map(str, seeds))} encoder. Above a column, the cell's measurements, "
                     f"mean ± std over its seeds, each over {clips or '—'} clips (padding left out): the share of "
                     f"the map's positive mass on the event's patches, and the negative mass off the event. A λ is "
                     f"called best only where its mean is the highest and its difference from the centre is clear "
                     f"(Holm-corrected p < {LEVEL:g}).")


def reproduce_command(folder: str | Path, cell: str, seed: int) -> str:
    """The command that reruns one trial of the sweep in ``folder`` standalone (``sweeps.reproduce``)."""
    return f"asda reproduce --sweep {folder} --trial '{cell}/{seed}'"


def reproduce_markdown(rows: list[dict[str, Any]], sweep: Path) -> list[str]:
    """The command that reruns each trial standalone and compares it with this sweep to the bit."""
    trials = sorted({(r["cell"], r["seed"]) for r in rows if not r.get("shares_pretraining_of")},
                    key=lambda t: (t[0] != "centre", t))
    return ["", REPRODUCE_HEADING, "",
            "Each trial's pretraining and evaluation again, as a standalone run, compared with this sweep's numbers "
            "to the bit (a read-out cell is its centre trial's):", "", "```bash",
            *(reproduce_command(sweep, cell, seed) for cell, seed in trials), "```"]


def _json_safe(value: Any) -> Any:
    """NaN and infinities as null, so the file is valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def summary(table: list[dict[str, Any]], grid: Grid, noise: Noise, baseline: dict[str, Any] | None) -> dict:
    """summary.json: the metric, the centre, σ_seed, the random-init baseline and one entry per (factor, value)."""
    centre = next((r for r in table if r["centre"]), None)
    keys = ("factor", "value", "mean", "std", "n", "delta", "se_delta", "pairs", "df", "p", "p_holm", "clear",
            "z_rule", "p_sign_flip", "unstable", "attn_event_share", "attn_event_share_std", "attn_event_share_a1",
            "attn_negative_off_event", "attn_negative_off_event_std", "attn_clips", "attn_layers", "cost", "centre",
            "collapsed", "alpha",
            "alpha_effective", "shares_pretraining")
    return _json_safe({
        "metric": grid.metric, "grid": grid.name, "z": Z,
        "centre_mean": centre["mean"] if centre else math.nan, "centre_std": centre["std"] if centre else math.nan,
        "centre_n": centre["n"] if centre else 0, "sigma_seed": noise.sigma_seed,
        "sigma_seed_all_cells": noise.sigma_seed_all, "sigma_diff": noise.sigma_diff,
        "unstable_cells": list(noise.unstable), "homogeneity_level": HOMOGENEITY_LEVEL,
        "collapsed_trials": list(noise.collapsed),
        "baseline_random_init": None if baseline is None else {k: baseline[k] for k in
                                                              ("mean", "std", "n", "delta", "se_delta", "clear", "p",
                                                               "p_sign_flip")},
        "significance": {"level": LEVEL, "correction": "holm", "test": "student_t",
                         "comparisons": len({r["cell"] for r in table if not r["centre"]}),
                         "sign_flip_floor": sign_flip_floor(max((r["pairs"] for r in table if not r["centre"]),
                                                                default=0)),
                         "seeds_for_sign_flip": seeds_for(LEVEL)},
        "cells": [{k: row[k] for k in keys} for row in table]})


def _baseline_rows(folder: Path, baseline: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The random-init rows given, else those cached in the sweep's folder (the report folder's parent)."""
    if baseline is not None:
        return baseline
    cached = folder.parent / BASELINE_FILE
    return json.loads(cached.read_text()) if cached.is_file() else []


def build_report(rows: list[dict[str, Any]], grid: Grid, folder: Path, *, baseline: list[dict[str, Any]] | None = None,
                 parent_run_id: str | None = None, cell_runs: dict[str, str] | None = None,
                 data: str | None = None) -> dict[str, Any]:
    """Write report.csv, report.md, summary.json, a figure per factor and the λ attention figure (each a PNG and a
    vector copy); log them to the parent run and each cell's numbers to its cell run (``cell_runs``: cell -> run
    id). ``baseline``: the random-init rows (default: the sweep folder's baseline.json). Without run ids, those of
    the finished sweep whose folder holds ``folder`` (its sweep.json), so that rebuilding a report refreshes its
    runs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    noise = noises(rows)
    table = ablation_table(rows, grid, noise)
    base = baseline_row(_baseline_rows(folder, baseline), rows, grid.metric, noise)
    with open(folder / "report.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[k for k in table[0] if k != "attn_layers"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(([base] if base else []) + table)
    uniform = _stats([r.get("attn_event_share_uniform") for r in rows])[0]
    pairs = evaluation_pairs(rows, grid)
    noisy = robustness_table(rows, table)
    tasks = task_reports(rows, _baseline_rows(folder, baseline), grid)
    best = best_by_task(tasks, table, grid) if tasks else []
    text = markdown(table, grid, noise, base, uniform) + "\n".join(
        pairs_markdown(pairs, grid.metric) + robustness_markdown(noisy, grid.metric)
        + tasks_markdown(tasks, best, grid) + reproduce_markdown(rows, folder.parent) + [""])
    (folder / "report.md").write_text(text)
    result = {**summary(table, grid, noise, base), "evaluation_pairs": _json_safe(pairs),
              "robustness": _json_safe(noisy), "best_by_task": _json_safe(best),
              "tasks": {n: summary(r["table"], grid, r["noise"], r["baseline"]) | {"metric": r["metric"]}
                        for n, r in tasks.items()}}
    (folder / SUMMARY_FILE).write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    figures = factor_plots(table, grid, folder, base)
    robust = robustness_figure(noisy, grid, folder)
    if robust:
        figures.append(robust)
    attention = lambda_attention_figure(rows, table, grid, data, folder) if data else None
    if attention:
        figures.append(attention)
    report = {"table": table, "baseline": base, "markdown": text, "noise": noise.sigma_seed, "summary": result,
              "folder": str(folder), "figures": [str(p) for p in with_vector_copies(figures)]}
    if parent_run_id is None and cell_runs is None:
        parent_run_id, cell_runs = _sweep_runs(folder)
    if parent_run_id or cell_runs:
        _log_runs(report, tasks, rows + _baseline_rows(folder, baseline), grid, parent_run_id, cell_runs or {})
    return report


def rebuild_report(sweep: str | Path, data: str | Path | None = None) -> dict[str, Any]:
    """``build_report`` again for the finished sweep in the folder ``sweep`` (``asda report``), from its trials and
    grid, refreshing its MLflow runs; ``data``: a prepared folder for the attention figure."""
    from .grid import load_grid

    folder = Path(sweep).resolve()
    if not (folder / TRIALS_FILE).is_file():
        raise ValueError(f"{folder} holds no finished sweep ({TRIALS_FILE} missing); run asda sweep first")
    state = json.loads((folder / STATE_FILE).read_text())
    rows = json.loads((folder / TRIALS_FILE).read_text())
    return build_report(rows, load_grid(state["grid"]), folder / "report",
                        data=str(Path(data).resolve()) if data else None)


def _sweep_runs(folder: Path) -> tuple[str | None, dict[str, str]]:
    """The parent and cell runs of the finished sweep whose report folder is ``folder``, as its sweep.json names
    them; none for a folder of no sweep, an unfinished sweep (its runs are KILLED, its report partial) or a local
    tracking store that has no database (the runs cannot be there)."""
    path = folder.parent / STATE_FILE
    state = json.loads(path.read_text()) if path.is_file() else {}
    no_store = tracking.is_local_store(tracking.tracking_uri()) and not (tracking.LOCAL_STORE / "mlflow.db").is_file()
    if not state.get("finished") or no_store:
        return None, {}
    return state.get("parent_run_id"), state.get("cell_runs") or {}


def _log_runs(report: dict[str, Any], tasks: dict[str, Any], rows: list[dict[str, Any]], grid: Grid,
              parent_run_id: str | None, cell_runs: dict[str, str]) -> None:
    """The report into MLflow: its files, headline numbers and main table (as the run's description) into the
    parent run; each cell's numbers, line and status into its cell run (``log_cells``). MLflow refusing any of it
    is a warning, not an error: the report's files and the sweep's results stand, and rebuilding the report
    (``asda report --sweep``) logs them again."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking.tracking_uri())
    doing = "the parent run"
    try:
        if parent_run_id:
            _log_report(client, parent_run_id, Path(report["folder"]), report["figures"], report["summary"])
            client.set_tag(parent_run_id, tracking.TAG_NOTE, parent_note(report, grid))
        doing = "the cell runs"
        numbers = cell_metrics(report["table"], report["baseline"], tasks, grid.metric)
        log_cells(client, cell_runs, numbers, cell_notes(report, grid.metric), rows, grid.metric)
    except Exception as exc:  # a tracking-server fault: the sweep's results are on disk
        reason = (f"{type(exc).__name__}: {exc}".splitlines() or ["?"])[0][:300]
        print(f"warning: MLflow refused the report for {doing} ({reason}); the report in {report['folder']} and "
              f"the sweep's results stand: `asda report --sweep {Path(report['folder']).parent}` logs it again",
              flush=True)


def _log_report(client, run_id: str, folder: Path, figures: list[str], result: dict[str, Any]) -> None:
    """The report's files into the sweep's parent run, and its headline numbers as metrics (none for an unknown
    value: a placeholder number would read as a measurement)."""
    for path in [folder / "report.csv", folder / "report.md", folder / SUMMARY_FILE, *figures]:
        client.log_artifact(run_id, str(path), "report")
    baseline = result["baseline_random_init"] or {}
    headline = {"seed_noise": result["sigma_seed"], f"centre_{result['metric']}": result["centre_mean"],
                f"baseline_random_init_{result['metric']}": baseline.get("mean")}
    for key, value in headline.items():
        if value is not None:
            client.log_metric(run_id, key, value)


def parent_note(report: dict[str, Any], grid: Grid) -> str:
    """The parent run's description: what the table measures, then the main table's first seven columns (factor,
    value, metric, n, Δ vs centre, p, clear), cut to whole lines that fit ``tracking.NOTE_LIMIT``; report.md has
    the rest."""
    head = [f"**Ablation {grid.name}**: `{grid.metric}` ({grid.evaluation['kind']}), mean ± std over seeds; Δ vs "
            f"the centre paired by seed ± its standard error; random-init baseline "
            f"{_summary_value(report['baseline'])}; σ_seed = {_fmt(report['noise'])}. Each cell's run below carries "
            f"its numbers; the whole report (report.md), its figures and summary.json are in the artifacts "
            f"(report/).", ""]
    lines = _short_table(report["table"], grid.metric, report["baseline"])
    kept = len(lines)
    while kept > 2 and len("\n".join(head + lines[:kept])) > tracking.NOTE_LIMIT - 80:
        kept -= 1
    rest = ["", f"… {len(lines) - kept} more rows in report/report.md"] if kept < len(lines) else []
    return "\n".join(head + lines[:kept] + rest)


def cell_notes(report: dict[str, Any], metric: str) -> dict[str, str]:
    """cell -> its cell run's description: its line of the main table (first seven columns) under the header."""
    rows = {}
    for row in ([report["baseline"]] if report["baseline"] else []) + report["table"]:
        rows.setdefault(row["cell"], row)  # the centre's line is the same in every factor's block
    return {cell: "\n".join(_short_table([row], metric)) for cell, row in rows.items()}


def _short_table(table: list[dict[str, Any]], metric: str, baseline: dict[str, Any] | None = None) -> list[str]:
    """``table_lines`` cut to their first seven columns, short enough for a run's description."""
    header, _, *rows = table_lines(table, metric, baseline)
    return [_seven(header), "|---|---|---|---|---|---|---|", *map(_seven, rows)]


def _seven(line: str) -> str:
    return " | ".join(line.split(" | ")[:7]) + " |"


def cell_metrics(table: list[dict[str, Any]], baseline: dict[str, Any] | None, tasks: dict[str, Any],
                 metric: str) -> dict[str, dict[str, float]]:
    """cell -> the report's numbers of it as cell-run metrics: ``<metric>_mean``, ``_std`` (over seeds), ``_n``,
    ``_delta_vs_centre`` (0 for the centre), its ``_se`` and ``_p_holm``; the same for each task
    (``task_<name>/<metric>_mean``...). The random-init baseline's under BASELINE. Unknown values are left out."""
    out: dict[str, dict[str, float]] = {}
    for name, rows in [(metric, [baseline] if baseline else []), (metric, table),
                       *((f"{tracking.METRIC_TASK}{t}/{r['metric']}", ([r["baseline"]] if r["baseline"] else [])
                          + r["table"]) for t, r in tasks.items())]:
        for row in rows:
            values = {tracking.METRIC_MEAN: row["mean"], tracking.METRIC_STD: row["std"], tracking.METRIC_N: row["n"],
                      tracking.METRIC_DELTA: row["delta"], tracking.METRIC_DELTA_SE: row["se_delta"],
                      tracking.METRIC_P: row["p_holm"]}
            out.setdefault(row["cell"], {}).update({name + k: float(v) for k, v in values.items()
                                                    if math.isfinite(_finite(v))})
    return out


def seed_metrics(client, rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean, standard deviation and count over a cell's seeds (``rows``) of every eval_* metric its seeds' runs
    logged: a trial's own, or for a read-out cell (an evaluation of another cell's pretraining, whose run it
    shares) that run's readout_<r>/eval_* ones. A failed seed's run is left out, as the report leaves it out."""
    values: dict[str, list[float]] = {}
    for row in (r for r in rows if r.get("run_id") and not r.get("error")):
        readout = (row.get("evaluation") or {}).get("readout")
        prefix = f"readout_{readout}/" if row.get("shares_pretraining_of") else ""
        for key, value in client.get_run(row["run_id"]).data.metrics.items():
            if key.startswith(prefix + "eval_"):
                values.setdefault(key[len(prefix):], []).append(value)
    out = {}
    for key, found in values.items():
        stats = zip((tracking.METRIC_MEAN, tracking.METRIC_STD, tracking.METRIC_N), _stats(found), strict=True)
        out |= {key + suffix: float(v) for suffix, v in stats if math.isfinite(_finite(v))}
    return out


def log_cells(client, cell_runs: dict[str, str], numbers: dict[str, dict[str, float]], notes: dict[str, str],
              rows: list[dict[str, Any]], metric: str) -> None:
    """Each cell run gets its seeds' eval_* metrics (``seed_metrics``) and the report's numbers (``cell_metrics``,
    the only ones for the grid's ``metric``), its line of the table as its description (``notes``), and ends FAILED
    when one of its seeds failed, else FINISHED. A cell without rows (its seeds never ran) keeps its status."""
    reported = {metric + s for s in (tracking.METRIC_MEAN, tracking.METRIC_STD, tracking.METRIC_N)}
    for cell, run_id in cell_runs.items():
        members = [r for r in rows if r["cell"] == cell]
        scores = {k: v for k, v in seed_metrics(client, members).items() if k not in reported}
        tracking.log_metrics(client, run_id, {**scores, **numbers.get(cell, {})})
        if cell in notes:
            client.set_tag(run_id, tracking.TAG_NOTE, notes[cell])
        if members:
            failed = any(r.get("error") for r in members)
            client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def print_report(report: dict[str, Any]) -> None:
    """The report as report.md has it, but for its list of commands, one per trial (the file keeps them)."""
    text, _, commands = report["markdown"].partition(REPRODUCE_HEADING)
    print()
    print(text.rstrip())
    if commands:
        print(f"\nThe command that reruns each trial standalone (asda reproduce): {report['folder']}/report.md")
