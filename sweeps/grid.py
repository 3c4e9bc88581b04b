"""Sweep grids: YAML files naming the data, the model, the training budget, the evaluation, the seeds and the
factors (ASDAConfig field names). A grid is validated and expanded into trials before any cluster starts."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model import ASDAConfig
from model.config import PRESETS, load_yaml

GRIDS_DIR = Path(__file__).resolve().parent / "grids"
DESIGNS = ("one_at_a_time", "factorial")
EVALUATIONS = {"probe": ("eval_accuracy", "eval_map"), "finetune": ("eval_accuracy", "eval_map")}
# Factors of the evaluation, not of the model: their cells share the pretraining of the cell they vary (pretrain once
# per seed, evaluate each value), so a cell's Δ pairs two evaluations of one encoder. readout: how the evaluation
# reads a clip's vector (the probe's pipelines.inference.ENCODER_READOUTS, fine-tuning's model.READOUTS).
EVAL_FACTORS = ("readout",)
_KEYS = {"name", "description", "design", "data", "model", "train", "evaluation", "seeds", "centre_seeds",
         "centre", "factors", "tasks"}
_TASK_KEYS = {"name", "data", "metric", "settings"}


@dataclass(frozen=True)
class Trial:
    """One pretraining + evaluation: a cell of the grid with one seed, and the cells of an evaluation factor that
    evaluate the same pretraining another way (``also``)."""

    cell: str  # e.g. "centre", "diff_lambda=0.5", or "alpha=1.0,diff_lambda=0.0" (factorial)
    factor: str  # the varied factor ("centre" for the centre run, "factorial" in a factorial design)
    value: Any
    seed: int
    overrides: dict[str, Any]  # ASDAConfig fields of this cell (centre + its change)
    evaluation: dict[str, Any] = field(default_factory=dict)  # this cell's evaluation factors (e.g. its readout)
    # further cells scored from this trial's pretraining: {"cell", "factor", "value", "evaluation"} each
    also: list[dict[str, Any]] = field(default_factory=list)

    @property
    def trial_id(self) -> str:
        return f"{self.cell}|seed={self.seed}"

    def slug(self) -> str:
        """A short name usable in run names and paths."""
        text = self.cell.replace("=", "").replace(",", "-").replace(".", "p")
        return f"{text}-s{self.seed}"


@dataclass(frozen=True)
class Grid:
    name: str
    path: str
    description: str
    design: str
    data: dict[str, Any]
    model: dict[str, Any]
    train: dict[str, Any]
    evaluation: dict[str, Any]
    seeds: list[int]  # every cell's, the centre's included: each Δ pairs runs of the same seed
    centre: dict[str, Any]
    factors: dict[str, list[Any]]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    # further evaluations of every trial's encoder: probes on other data, each {"name", "data", "metric",
    # "settings"}; the report gives one table per task and which value of each factor is best on which
    tasks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def metric(self) -> str:
        return self.evaluation["metric"]

    @property
    def trains_in_process(self) -> bool:
        """Whether a trial trains in its own process (Ray Train's local mode): one CPU worker does, unless the
        grid says (``train.in_process``)."""
        train = self.train
        return bool(train.get("in_process", int(train.get("workers", 1)) == 1 and not train.get("use_gpu", False)))

    def base_config(self) -> ASDAConfig:
        return ASDAConfig.preset(self.model.get("preset", "tiny")).with_overrides(self.model.get("overrides") or {})

    def config_for(self, trial: Trial) -> ASDAConfig:
        return self.base_config().with_overrides(trial.overrides)

    def _held(self, cell: dict[str, Any]) -> dict[str, Any]:
        """A cell's fields, its alpha scaled by (the centre's student count / the cell's) where
        ``model.hold_alpha_effective`` asks for it under the release's reduction: the utterance term's effective
        weight (``ASDAConfig.alpha_effective``, alpha x clips x clones per device) is then the same in every cell
        of a ``num_students`` ablation, as alpha alone says under per-element means."""
        if not self.model.get("hold_alpha_effective"):
            return cell
        base = self.base_config()
        config, centre = base.with_overrides(cell), base.with_overrides(self.model_centre)
        if config.loss_reduction != "release" or config.num_students == centre.num_students:
            return cell
        return {**cell, "alpha": config.alpha * centre.num_students / config.num_students}

    @property
    def centre_evaluation(self) -> dict[str, Any]:
        """The centre's evaluation factors: the centre's own, else the evaluation settings' (readout: cls)."""
        settings = self.evaluation.get("settings") or {}
        found = {"readout": settings.get("readout", "cls")}
        if "features" in settings:  # the probe's older name of its read-out
            from pipelines.inference import check_readout

            found["readout"] = check_readout(settings["features"])
        return {**found, **{k: v for k, v in self.centre.items() if k in EVAL_FACTORS}}

    @property
    def model_centre(self) -> dict[str, Any]:
        """The centre's ASDAConfig fields."""
        return {k: v for k, v in self.centre.items() if k not in EVAL_FACTORS}

    def trials(self) -> list[Trial]:
        """Every (cell, seed) of the grid that pretrains. One-at-a-time designs share the centre cell between
        factors; an evaluation factor's cells are evaluations of another trial's pretraining (``Trial.also``)."""
        model_factors = {k: v for k, v in self.factors.items() if k not in EVAL_FACTORS}
        eval_factors = {k: v for k, v in self.factors.items() if k in EVAL_FACTORS}
        centre, scored = self.model_centre, self.centre_evaluation
        if self.design == "one_at_a_time":
            also = [{"cell": f"{f}={v}", "factor": f, "value": v, "evaluation": {**scored, f: v}}
                    for f, values in eval_factors.items() for v in values if v != scored.get(f)]
            trials = [Trial("centre", "centre", None, s, dict(centre), dict(scored), also) for s in self.seeds]
            for factor, values in model_factors.items():
                for value in values:
                    if value == centre.get(factor):
                        continue
                    cell = self._held({**centre, factor: value})
                    trials += [Trial(f"{factor}={value}", factor, value, s, cell, dict(scored)) for s in self.seeds]
            return trials
        trials = []
        names, evals = list(model_factors), list(eval_factors)
        eval_combos = [dict(zip(evals, c, strict=True)) for c in itertools.product(*(eval_factors[n] for n in evals))]
        for combo in itertools.product(*(model_factors[n] for n in names)):
            cell = self._held({**centre, **dict(zip(names, combo, strict=True))})
            cells = []
            for evaluation in eval_combos:
                chosen = {**dict(zip(names, combo, strict=True)), **evaluation}
                label = ",".join(f"{n}={v}" for n, v in chosen.items())
                is_centre = all({**cell, **scored, **evaluation}.get(k) == v for k, v in {**centre, **scored}.items())
                cells.append({"cell": "centre" if is_centre else label, "factor": "centre" if is_centre else "factorial",
                              "value": None if is_centre else label, "evaluation": {**scored, **evaluation}})
            own, *also = cells
            trials += [Trial(own["cell"], own["factor"], own["value"], s, cell, own["evaluation"], also)
                       for s in self.seeds]
        return trials

    def fingerprint(self) -> str:
        """Changes whenever anything that affects results changes (a resumed sweep must be the same grid)."""
        return hashlib.sha1(json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()[:10]


def resolve_grid_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path.resolve()
    candidate = GRIDS_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in GRIDS_DIR.glob("*.yaml"))
    raise ValueError(f"no grid {str(name_or_path)!r}: give a YAML file or one of {known}")


def load_grid(name_or_path: str | Path) -> Grid:
    """Read and validate a grid; every cell's ASDAConfig is built here, so a bad value fails before Ray starts."""
    path = resolve_grid_path(name_or_path)
    where = f"grid {path}"
    raw = load_yaml(path.read_text(), where) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_KEYS)}")
    for key in ("name", "data", "train", "evaluation", "factors"):
        if key not in raw:
            raise ValueError(f"{where} lacks '{key}'")
    design = raw.get("design", "one_at_a_time")
    if design not in DESIGNS:
        raise ValueError(f"{where}: design={design!r} is not allowed: expected one of {DESIGNS}")
    evaluation = dict(raw["evaluation"])
    kind = evaluation.get("kind", "probe")
    if kind not in EVALUATIONS:
        raise ValueError(f"{where}: evaluation.kind={kind!r} is not allowed: expected one of {sorted(EVALUATIONS)}")
    evaluation["kind"] = kind
    metric = evaluation.setdefault("metric", EVALUATIONS[kind][0])
    if metric not in EVALUATIONS[kind]:
        raise ValueError(f"{where}: evaluation.metric={metric!r} is not allowed: expected one of {EVALUATIONS[kind]}")
    factors = raw["factors"]
    if not isinstance(factors, dict) or not factors or not all(isinstance(v, list) and v for v in factors.values()):
        raise ValueError(f"{where}: factors must map ASDAConfig fields to non-empty lists of values")
    fields = {f.name for f in dataclasses.fields(ASDAConfig)}
    centre = dict(raw.get("centre") or {})
    for name in list(factors) + list(centre):
        if name not in fields and name not in EVAL_FACTORS:
            raise ValueError(f"{where}: {name!r} is not an ASDAConfig field or an evaluation factor "
                             f"({', '.join(EVAL_FACTORS)}); allowed: {sorted(fields)}")
    grid = Grid(name=str(raw["name"]), path=str(path), description=str(raw.get("description", "")), design=design,
                data=dict(raw["data"]), model=dict(raw.get("model") or {}), train=dict(raw["train"]),
                evaluation=evaluation, seeds=_paired_seeds(raw, where), centre=centre, factors=factors, raw=raw,
                tasks=_tasks(raw, where))
    unknown = sorted(set(grid.model) - {"preset", "overrides", "hold_alpha_effective"})
    if unknown:
        raise ValueError(f"{where}: unknown model key(s) {unknown}; allowed: hold_alpha_effective, overrides, preset")
    if not isinstance(grid.model.get("hold_alpha_effective", False), bool):
        raise ValueError(f"{where}: model.hold_alpha_effective={grid.model['hold_alpha_effective']!r} is not "
                         f"allowed: expected true or false")
    if grid.model.get("preset", "tiny") not in PRESETS:
        raise ValueError(f"{where}: model.preset={grid.model.get('preset')!r} is not allowed: expected one of "
                         f"{PRESETS}")
    configs = {}
    for trial in grid.trials():
        try:
            configs.setdefault(trial.cell, grid.config_for(trial))
        except ValueError as exc:
            raise ValueError(f"{where}, cell {trial.cell}: {exc}") from None
    _check_distinct_cells(grid, configs, where)
    _check_train_keys(grid, where)
    _check_readouts(grid, where)
    return grid


def _tasks(raw: dict, where: str) -> list[dict[str, Any]]:
    """The grid's ``tasks``: a list of {name, data, metric (eval_accuracy or eval_map), settings (the probe's)},
    names distinct and usable in metric names; each checked before any cluster starts."""
    from pipelines.probe import ProbeSettings

    tasks = raw.get("tasks") or []
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise ValueError(f"{where}: tasks must be a list of mappings with {sorted(_TASK_KEYS)}")
    found = []
    for i, task in enumerate(tasks):
        unknown = sorted(set(task) - _TASK_KEYS)
        name = str(task.get("name", ""))
        if unknown or not name.replace("-", "").replace("_", "").isalnum() or not isinstance(task.get("data"), dict):
            raise ValueError(f"{where}: tasks[{i}] needs a name (letters, digits, - and _) and a data mapping, and "
                             f"takes only {sorted(_TASK_KEYS)}; it has {sorted(task)}")
        metric = task.get("metric", "eval_accuracy")
        if metric not in EVALUATIONS["probe"]:
            raise ValueError(f"{where}: tasks[{i}].metric={metric!r} is not allowed: expected one of "
                             f"{EVALUATIONS['probe']}")
        settings = dict(task.get("settings") or {})
        reserved = sorted(set(settings) & {"data", "checkpoint", "name", "experiment", "run_id", "parent_run_id",
                                           "seed", "task"})
        if reserved:
            raise ValueError(f"{where}: tasks[{i}].settings {reserved} are set by the sweep")
        try:
            ProbeSettings(data="-", **settings)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: tasks[{i}].settings: {exc}") from None
        found.append({"name": name, "data": dict(task["data"]), "metric": metric, "settings": settings})
    names = [t["name"] for t in found]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: task names repeat: {names}")
    return found


def _paired_seeds(raw: dict, where: str) -> list[int]:
    """The one list of seeds every cell runs. A cell's Δ is the mean over seeds of (cell − centre) at the same seed,
    so data order and initialisation cancel; that needs every cell to run exactly the centre's seeds. An older grid
    may still name ``centre_seeds``: read when it equals ``seeds`` (or stands alone), refused when it differs."""
    if "centre_seeds" not in raw:
        return _seeds(raw, "seeds", [0], where)
    centre = _seeds(raw, "centre_seeds", [0], where)
    seeds = _seeds(raw, "seeds", centre, where)
    if sorted(seeds) != sorted(centre):
        raise ValueError(f"{where}: seeds={seeds} and centre_seeds={centre} differ: every cell now runs the centre's "
                         f"seeds, so that each Δ pairs a cell's run with the centre's run of the same seed; write one "
                         f"list, e.g. seeds: {centre}, and drop centre_seeds")
    return seeds


def _seeds(raw: dict, key: str, default: list[int], where: str) -> list[int]:
    """A non-empty list of distinct integer seeds: a seed given twice would be a fake replicate."""
    seeds = raw.get(key, default)
    if not isinstance(seeds, list) or not seeds:
        raise ValueError(f"{where}: {key}={seeds!r} is not allowed: expected a non-empty list of integers")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int)]
    if bad:
        raise ValueError(f"{where}: {key} holds {bad!r}: expected integers")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"{where}: {key} repeats {repeated}: each seed is one replicate, so give it once")
    return list(seeds)


def _check_readouts(grid: Grid, where: str) -> None:
    """The read-outs a grid names are ones its evaluation has (the probe: cls, mean, cls+mean; fine-tuning: cls,
    mean), each listed once."""
    from model import READOUTS
    from pipelines.inference import ENCODER_READOUTS

    allowed = ENCODER_READOUTS if grid.evaluation["kind"] == "probe" else READOUTS
    values = list(grid.factors.get("readout", [])) + [grid.centre_evaluation["readout"]]
    for value in values:
        if value not in allowed:
            raise ValueError(f"{where}: readout={value!r} is not allowed for evaluation.kind "
                             f"{grid.evaluation['kind']}: expected one of {list(allowed)}")
    listed = grid.factors.get("readout", [])
    repeated = sorted({v for v in listed if listed.count(v) > 1})
    if repeated:
        raise ValueError(f"{where}: factor readout lists {repeated} more than once: each value is one cell")


def _check_distinct_cells(grid: Grid, configs: dict[str, ASDAConfig], where: str) -> None:
    """Two cells that build the same model (a factor value listed twice, or written twice as 0 and 0.0) would
    make one pretraining look like two results."""
    base = grid.base_config().to_dict()
    for factor, values in grid.factors.items():
        if factor in EVAL_FACTORS:
            continue
        resolved = [ASDAConfig.from_dict({**base, factor: v}).to_dict()[factor] for v in values]
        repeated = sorted({str(v) for v in resolved if resolved.count(v) > 1})
        if repeated:
            raise ValueError(f"{where}: factor {factor} lists {repeated} more than once: each value is one cell")
    seen: dict[str, str] = {}
    for cell, config in configs.items():
        key = config.to_yaml()
        if key in seen:
            raise ValueError(f"{where}: cells {seen[key]} and {cell} build the same model")
        seen[key] = cell


def _check_train_keys(grid: Grid, where: str) -> None:
    from pipelines.finetune import FinetuneSettings
    from pipelines.pretrain import PretrainSettings
    from pipelines.probe import ProbeSettings

    allowed = {f.name for f in dataclasses.fields(PretrainSettings)} - {"data", "name", "storage", "experiment",
                                                                         "parent_run_id", "seed"}
    unknown = sorted(set(grid.train) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown train setting(s) {unknown}; allowed: {sorted(allowed)}")
    try:
        PretrainSettings(data="-", **grid.train)  # value checks (e.g. train.compile must be true or false)
    except ValueError as exc:
        raise ValueError(f"{where}: train.{exc}") from None
    tuned = grid.evaluation.get("settings") or {}
    settings = FinetuneSettings if grid.evaluation["kind"] == "finetune" else ProbeSettings
    set_by_the_sweep = {"data", "checkpoint", "name", "storage", "experiment", "run_id", "parent_run_id", "seed"}
    allowed = {f.name for f in dataclasses.fields(settings)} - set_by_the_sweep
    unknown = sorted(set(tuned) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown evaluation setting(s) {unknown}; allowed: {sorted(allowed)}")
    try:
        settings(data="-", **tuned)
    except ValueError as exc:
        raise ValueError(f"{where}: evaluation.settings: {exc}") from None


def prepared_path(section: dict[str, Any] | str) -> Path | str:
    """Where a grid's data section (or an evaluation's ``data`` path) is prepared: the folder the sweep driver
    reads or prepares into (``driver._prepared``) and the estimate reads the card of, without preparing anything."""
    from pipelines import runtime
    from pipelines.data.storage import normalise

    if isinstance(section, str | Path):
        return normalise(section)
    if "prepared" in section:
        return normalise(section["prepared"])
    dataset, options = section.get("dataset", "synthetic"), section.get("options") or {}
    suffix = "" if not options else "-" + "-".join(f"{k}{v}" for k, v in sorted(options.items()))
    return runtime.DATA_ROOT / "prepared" / f"{dataset}{suffix}"
