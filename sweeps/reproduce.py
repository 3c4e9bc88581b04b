"""`asda reproduce`: one trial of a finished sweep again, as a standalone run, compared with the sweep to the bit.

    asda reproduce --sweep results/sweeps/ablation-1a2b3c4d --trial diff_lambda=0.5/1

The trial's settings are rebuilt from the grid the sweep ran (its fingerprint must still be the folder's) exactly
as the sweep built them, and the trial runs the sweep's own trial function (pretraining, then the evaluation,
``driver.trial_metrics``) in a Ray task holding the CPU a Tune trial holds, so it runs under the same torch thread
count. It is a run of its own: a new run name (a pretraining run of the same name would be resumed, not redone),
its files under ``<sweep>/reproduce/``, its MLflow runs outside the sweep's tree. The comparison covers the final
encoder weights, the pretraining loss, the grid's metric, each read-out cell scored from the same pretraining,
each task's metric, the noise levels and the attention measurements; it is written to
``<sweep>/reproduce/<trial>-<time>.json``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from .grid import Grid, Trial, load_grid
from .report import STATE_FILE, TRIALS_FILE
from .resources import TRIAL_CPU

REPRODUCE_DIR = "reproduce"


def parse_trial(text: str) -> tuple[str, int]:
    """"CELL/SEED" -> (cell, seed)."""
    cell, _, seed = text.rpartition("/")
    if not cell or not seed.lstrip("-").isdigit():
        raise ValueError(f"--trial {text!r} is not allowed: expected CELL/SEED, e.g. centre/0 or diff_lambda=0.5/1")
    return cell, int(seed)


def find_trial(folder: Path, cell: str, seed: int) -> tuple[Grid, dict, Trial, dict, list[dict]]:
    """(grid, sweep state, the trial that pretrained ``cell`` with ``seed``, its row, the rows of the cells
    scored from the same pretraining) of a finished sweep; an error naming what is wrong otherwise."""
    folder = Path(folder).resolve()
    if not (folder / STATE_FILE).is_file() or not (folder / TRIALS_FILE).is_file():
        raise ValueError(f"{folder} holds no finished sweep ({STATE_FILE} and {TRIALS_FILE} needed); run asda "
                         f"sweep first, or name its folder (results/sweeps/<grid>-<id>)")
    state = json.loads((folder / STATE_FILE).read_text())
    grid = load_grid(state["grid"])
    if not folder.name.endswith(grid.fingerprint()):
        raise ValueError(f"grid {state['grid']} has changed since sweep {folder.name} ran (its fingerprint is now "
                         f"{grid.fingerprint()}): its trials can no longer be rebuilt as they ran")
    rows = json.loads((folder / TRIALS_FILE).read_text())
    found = [r for r in rows if r["cell"] == cell and r["seed"] == seed]
    if not found:
        known = sorted({f"{r['cell']}/{r['seed']}" for r in rows})
        raise ValueError(f"sweep {folder.name} has no trial {cell}/{seed}; it has {', '.join(known)}")
    owner = found[0].get("shares_pretraining_of") or cell
    trial = next((t for t in grid.trials() if t.cell == owner and t.seed == seed), None)
    if trial is None:
        raise ValueError(f"grid {grid.name} no longer has trial {owner}/{seed}")
    own = next(r for r in rows if r["cell"] == owner and r["seed"] == seed and not r.get("shares_pretraining_of"))
    shared = [r for r in rows if r.get("shares_pretraining_of") == owner and r["seed"] == seed]
    return grid, state, trial, own, shared


def reproduce(folder: str | Path, cell: str, seed: int, experiment: str = "asda") -> dict[str, Any]:
    """Rerun one trial of the sweep in ``folder`` (see the module); returns {"trial", "matched", "compared":
    [{"what", "sweep", "rerun", "same"}], "checkpoint", "record"}."""
    import ray

    from pipelines.runtime import ensure_ray

    from .driver import _concurrency, _sweep_params, prepared_data, task_data, trial_metrics

    folder = Path(folder).resolve()
    grid, state, trial, row, shared = find_trial(folder, cell, seed)
    if row.get("error") or row.get("metric_value") is None:
        raise ValueError(f"trial {trial.cell}/{seed} did not finish in sweep {folder.name}: nothing to compare with")
    data, tasks_data = prepared_data(grid), task_data(grid)
    ensure_ray()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    where = folder / REPRODUCE_DIR / f"{trial.slug()}-{stamp}"
    rerun_state = {"sweep_id": f"{state['sweep_id']}-reproduce-{stamp}", "parent_run_id": None, "cell_runs": {}}
    _, cpus_per_worker, threads = _concurrency(grid, 1, 1)
    sweep = _sweep_params(grid, rerun_state, data, where, experiment, cpus_per_worker, threads, False, tasks_data)
    print(f"reproducing trial {trial.cell}/{seed} of sweep {folder.name} as a standalone run in {where}",
          flush=True)
    metrics = ray.get(ray.remote(num_cpus=TRIAL_CPU)(trial_metrics).remote(trial, sweep))
    compared = compare(row, shared, metrics, grid)
    result = {"trial": f"{trial.cell}/{seed}", "sweep": str(folder), "matched": all(c["same"] for c in compared),
              "compared": compared, "checkpoint": metrics["checkpoint"], "run_id": metrics["run_id"]}
    where.mkdir(parents=True, exist_ok=True)
    record = folder / REPRODUCE_DIR / f"{trial.slug()}-{stamp}.json"
    record.write_text(json.dumps(result, indent=2) + "\n")
    return {**result, "record": str(record)}


def compare(row: dict, shared: list[dict], metrics: dict[str, Any], grid: Grid) -> list[dict[str, Any]]:
    """Each number of the sweep's row (and of the rows scored from the same pretraining) beside the rerun's."""
    metric, task_metric = grid.metric, {t["name"]: t["metric"] for t in grid.tasks}
    weights = _same_weights(row["checkpoint"], metrics["checkpoint"])
    pairs = [("pretrain_loss", row.get("pretrain_loss"), metrics.get("pretrain_loss")),
             (metric, row.get("metric_value"), metrics.get(metric))]
    also = metrics.get("also") or {}
    pairs += [(f"{r['cell']}: {metric}", r.get("metric_value"), (also.get(r["cell"]) or {}).get(metric))
              for r in shared]
    pairs += [(f"task {name}: {task_metric[name]}", value,
               ((metrics.get("tasks") or {}).get(name) or {}).get(task_metric[name]))
              for name, value in (row.get("tasks") or {}).items()]
    prefix = f"{metric}_snr"
    pairs += [(f"{metric} at {snr} dB", value, metrics.get(prefix + snr))
              for snr, value in (row.get("robustness") or {}).items()]
    pairs += [(name, value, metrics.get(name)) for name, value in sorted((row.get("attention") or {}).items())]
    return [{"what": "encoder weights", "sweep": row["checkpoint"], "rerun": weights, "same": weights == "identical"},
            *({"what": what, "sweep": a, "rerun": b, "same": _equal(a, b)} for what, a, b in pairs)]


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _same_weights(original: str, rerun: str) -> str:
    """"identical" when both checkpoints hold the same tensors to the bit, else what differs."""
    import torch

    from model import read_state

    if not original or not Path(original).is_file():
        return f"sweep checkpoint {original} is gone"
    a, b = read_state(original)["model"], read_state(rerun)["model"]
    if a.keys() != b.keys():
        return "different tensors"
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    return "identical" if not differ else f"{len(differ)} of {len(a)} tensors differ (first: {differ[0]})"


def format_result(result: dict[str, Any]) -> str:
    lines = [f"trial {result['trial']}: {'MATCHED the sweep to the bit' if result['matched'] else 'DIFFERS'}"]
    for c in result["compared"]:
        lines.append(f"  {'same ' if c['same'] else 'DIFF '} {c['what']}: sweep {c['sweep']}, rerun {c['rerun']}")
    lines.append(f"record: {result['record']}")
    return "\n".join(lines)
