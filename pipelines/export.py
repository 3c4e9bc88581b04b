"""`asda export`: a checkpoint as portable weights (``model.pretrained``'s folder) with its model card.

    export("results/pretrain-default/final.pt", "exports/default")  # or: asda export CHECKPOINT --out DIR

The folder holds ``model.safetensors`` and ``config.json`` (what ``model.load_pretrained`` reads, with torch and
safetensors alone), ``card.json`` and ``README.md``: the data set (its name and its card's fingerprint), the recipe,
the seeds, the updates, the evaluation with its spread over seeds, the code version and the source checkpoint's
sha256. The facts come from what the run left behind, never from guesses:

- the checkpoint itself (config, step, an import's record, a training checkpoint's settings);
- a pretraining run's Ray Train checkpoints beside ``final.pt``, which hold the run's settings (its data, seed);
- the sweep folder the checkpoint lies in (or ``--sweep``): its row in ``trials.json`` (cell, seed, metric) and
  the rows of the same cell (the spread over seeds);
- the training run in MLflow, where the store can be reached (code version, the frames fed, a fine-tuning's
  recipe and scores);
- the prepared data's card (``dataset.json``): the normalisation the encoder was trained with.

What none of them says is written as "unknown"; where the normalisation is unknown the SPEC's defaults are
written, and the card says so.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model import ASDAConfig, ASDAEncoder, load_checkpoint
from model.features import DATASET_STATS, FEATURE_SETTINGS, SAMPLE_RATE
from model.pretrained import CARD_FILE, CONFIG_FILE, README_FILE, WEIGHTS_FILE, file_sha256, write_pretrained
from model.pretrained import FORMAT as EXPORT_FORMAT

from . import tracking
from .worker import CHECKPOINT_FILE, CHECKPOINT_PREFIX, resolve_checkpoint

UNKNOWN = "unknown"
WEIGHTS_NAMES = ", ".join((WEIGHTS_FILE, CONFIG_FILE, CARD_FILE, README_FILE))  # what an export folder holds
WHICH = ("student", "teacher")
CARD_FORMAT = "asda-model-card"
SIMPLE_HEAD = {"norm.weight", "norm.bias", "linear.weight", "linear.bias"}  # model.head.ClassificationHead
SPEC_MEAN, SPEC_STD = DATASET_STATS["audioset"]  # model.fbank's defaults (SPEC §9)
# The training settings a card repeats as the recipe (the rest: paths, resources, logging).
RECIPE_FIELDS = ("steps", "batch_size", "workers", "lr", "warmup_steps", "min_lr_ratio", "weight_decay", "beta1",
                 "beta2", "grad_clip", "precision", "split", "target_length", "recipe", "mixup", "loss")
OBJECTIVE_FIELDS = ("loss_reduction", "alpha", "num_students", "mask_ratio", "ema_decay_start", "ema_decay_end",
                    "ema_anneal_steps")


@dataclass
class Weights:
    """The tensors an export takes from a checkpoint and what they are."""

    encoder: dict[str, torch.Tensor]
    kind: str  # "pretraining", "fine-tuned classifier", "imported release" or "encoder"
    which: str  # the encoder taken, in words
    head: dict[str, Any] | None = None  # {"num_classes", "readout"} of a fine-tuned classifier's head
    head_state: dict[str, torch.Tensor] | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Facts:
    """What is known of how a checkpoint was made; None where nothing says."""

    settings: dict[str, Any] | None = None  # the training run's settings
    sweep: dict[str, Any] | None = None  # {"folder", "state", "rows", "matches"}
    run: dict[str, Any] | None = None  # the MLflow run: {"run_id", "params", "tags", "metrics"}
    data: dict[str, Any] | None = None  # the prepared data's card
    data_path: str | None = None
    feeding: dict[str, Any] | None = None  # what a pretraining run's final.pt records of its input
    notes: list[str] = field(default_factory=list)


def export(checkpoint: str | Path, out: str | Path, *, which: str | None = None, sweep: str | Path | None = None,
           force: bool = False) -> dict[str, Any]:
    """Export ``checkpoint`` into the folder ``out``; returns the card (card.json's contents) with "out".

    ``which``: "student" (the default) or "teacher" (the EMA teacher) of a pretraining checkpoint; a classifier's
    or an imported checkpoint's one encoder otherwise. ``sweep``: the sweep folder the checkpoint belongs to
    (default: the one it lies in, if any). ``out`` must not exist or be empty unless ``force``; the folder appears
    whole or not at all."""
    out = Path(out)
    _check_out(out, force)
    path = Path(resolve_checkpoint(_existing(checkpoint)))
    if out.resolve() in path.resolve().parents:
        raise ValueError(f"--out {out} holds the checkpoint being exported ({path}); name another folder")
    state, config = _read_checkpoint(path)
    weights = select_weights(state, which, path, config)
    facts = gather_facts(path, state, config, weights, sweep)
    features = feature_facts(config, weights, facts)
    card = model_card(path, state, config, weights, facts, features)

    def write(folder: Path) -> None:
        write_pretrained(folder, weights.encoder, config, features, weights.head, weights.head_state)
        (folder / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
        (folder / README_FILE).write_text(render_readme(card, config))

    write_atomically(out, force, write)
    return {**card, "out": str(out)}


# --------------------------------------------------------------------------------------------- checks, reading


def _existing(checkpoint: str | Path) -> Path:
    path = Path(checkpoint)
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist: asda export takes a checkpoint file (a pretraining "
                         f"run's final.pt, a checkpoint folder's model.pt, what asda import wrote) or a folder "
                         f"holding one")
    return path


def _check_out(out: Path, force: bool) -> None:
    """``out`` may be new or empty; with ``force`` also an earlier export, which is replaced. Any other folder is
    refused even with ``force``: replacing it would delete files that are not an export's (a run, a results
    folder)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; name a folder (it will hold {WEIGHTS_NAMES})")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise ValueError(f"--out {out} exists and is not empty; pass --force to replace an earlier export, or name "
                         f"a new folder")
    if not _is_export(out):
        raise ValueError(f"--out {out} is not an earlier export (no asda export {CONFIG_FILE}); --force replaces only "
                         f"an export's folder, so name a new folder or empty this one yourself")


def _is_export(folder: Path) -> bool:
    try:
        return json.loads((folder / CONFIG_FILE).read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], ASDAConfig]:
    """The verified checkpoint (its sha256 sidecar, weights only), or a ValueError that says what export takes."""
    try:
        return load_checkpoint(path)
    except ValueError as exc:
        raise ValueError(f"{exc}. asda export takes this project's checkpoints (final.pt, a checkpoint folder's "
                         f"model.pt, or what asda import wrote: import a released fairseq checkpoint first)") from None


def _strip(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def select_weights(state: dict[str, Any], which: str | None, path: Path, config: ASDAConfig) -> Weights:
    """The encoder (and a classifier's simple head) of the checkpoint, checked to fill ``ASDAEncoder(config)``;
    the tensors are that encoder's state dict, so they load as ``model.load_encoder`` loads them."""
    if which is not None and which not in WHICH:
        raise ValueError(f"which={which!r} is not allowed: expected one of {list(WHICH)}")
    weights = state["model"]
    imported = state.get("imported_from") if isinstance(state.get("imported_from"), dict) else None
    if any(k.startswith("student.") for k in weights):
        chosen = which or "student"
        if not any(k.startswith(f"{chosen}.") for k in weights):
            raise ValueError(f"checkpoint {path} has no {chosen} encoder; it holds the student only")
        found = Weights(_strip(weights, f"{chosen}."), "pretraining",
                        "EMA teacher" if chosen == "teacher" else "student")
    elif any(k.startswith("encoder.") for k in weights):
        _only_encoder(which, path, "a fine-tuned classifier checkpoint")
        found = Weights(_strip(weights, "encoder."), "fine-tuned classifier", "encoder of the fine-tuned classifier")
        _take_head(found, state, _strip(weights, "head."))
    elif imported:
        if which not in (None, imported.get("which")):
            raise ValueError(f"which={which!r} is not allowed for {path}: it holds the {imported.get('which')} of "
                             f"the {imported.get('release')} release alone (asda import --which {which} imports "
                             f"the other)")
        found = Weights(dict(weights), "imported release",
                        f"{imported.get('which', UNKNOWN)} of the {imported.get('release', UNKNOWN)} release")
    else:
        _only_encoder(which, path, "a checkpoint of one encoder")
        found = Weights(dict(weights), "encoder", "encoder")
    found.encoder = _fill_encoder(found.encoder, config, path, found.notes)
    return found


def _only_encoder(which: str | None, path: Path, what: str) -> None:
    if which == "teacher":
        raise ValueError(f"which='teacher' is not allowed for {path}: it is {what}, with no EMA teacher; only a "
                         f"pretraining checkpoint (student and teacher) has one")


def _take_head(found: Weights, state: dict[str, Any], head: dict[str, torch.Tensor]) -> None:
    """Keep a classifier's head when it is the project's LayerNorm + Linear; note it when it is not."""
    if set(head) == SIMPLE_HEAD and "num_classes" in state:
        found.head = {"num_classes": int(state["num_classes"]), "readout": str(state.get("readout", "cls"))}
        found.head_state = head
    elif head:
        found.notes.append(f"the classifier's head ({sorted(head)[:4]}) is not the LayerNorm + Linear head "
                           f"load_pretrained_classifier rebuilds: the encoder alone is exported")


def _fill_encoder(tensors: dict[str, torch.Tensor], config: ASDAConfig, path: Path,
                  notes: list[str]) -> dict[str, torch.Tensor]:
    """``ASDAEncoder(config)``'s state dict filled from ``tensors`` (as ``model.load_encoder`` fills it), or a
    ValueError naming the encoder tensors the checkpoint lacks."""
    encoder = ASDAEncoder(config)
    missing, unexpected = encoder.load_state_dict(tensors, strict=False)
    if missing:
        raise ValueError(f"checkpoint {path} lacks encoder weights {missing[:5]}{' ...' if len(missing) > 5 else ''}"
                         f" for the encoder its config describes")
    if unexpected:
        notes.append(f"left out {len(unexpected)} tensor(s) the encoder does not take: {unexpected[:5]}")
    return encoder.state_dict()


# --------------------------------------------------------------------------------------------- provenance


def gather_facts(path: Path, state: dict[str, Any], config: ASDAConfig, weights: Weights,
                 sweep: str | Path | None) -> Facts:
    """Everything that says how the checkpoint was made: its settings, its sweep, its MLflow run, its data."""
    facts = Facts(feeding=state.get("feeding") if isinstance(state.get("feeding"), dict) else None)
    facts.settings, where = training_settings(path, state, config)
    if facts.settings is None and weights.kind != "imported release":
        facts.notes.append(f"no training settings found (checked {where})")
    facts.sweep = sweep_membership(path, sweep)
    run_id = next((r.get("run_id") for r in (facts.sweep or {}).get("matches", []) if r.get("run_id")), None)
    if weights.kind != "imported release":
        facts.run = tracked_run(run_id, *_run_name(path, facts.settings), facts.notes)
    params = (facts.run or {}).get("params") or {}
    tags = (facts.run or {}).get("tags") or {}
    data = ((facts.settings or {}).get("data") or tags.get(f"{tracking.PARAM_TRAIN}data")
            or params.get(f"{tracking.PARAM_TRAIN}data"))  # a param in runs logged before paths became tags
    if data:
        facts.data_path = str(data)
        facts.data = _data_card(str(data), facts.notes)
    return facts


def run_folder(path: Path) -> Path:
    """The run folder of a checkpoint: final.pt's folder, or the folder above a Ray Train checkpoint folder."""
    return path.parent.parent if path.parent.name.startswith(CHECKPOINT_PREFIX) else path.parent


def training_settings(path: Path, state: dict[str, Any], config: ASDAConfig) -> tuple[dict[str, Any] | None, str]:
    """(the training run's settings, where they were looked for). A Ray Train checkpoint holds its run's settings;
    a pretraining run's final.pt does not, but the run's checkpoint folders beside it do: the newest whose config
    is the checkpoint's is taken (read memory-mapped: only the settings are used)."""
    if isinstance(state.get("settings"), dict):
        return state["settings"], str(path)
    folder = run_folder(path)
    for candidate in sorted(folder.glob(f"{CHECKPOINT_PREFIX}*/{CHECKPOINT_FILE}"), reverse=True):
        if candidate.resolve() == path.resolve():
            continue
        try:
            other = torch.load(candidate, map_location="cpu", weights_only=True, mmap=True)
        except (OSError, RuntimeError, ValueError, EOFError):  # a damaged or foreign file: not this run's record
            continue
        if isinstance(other, dict) and isinstance(other.get("settings"), dict) and _same_config(other, config):
            return other["settings"], str(candidate)
    return None, f"{path} and the checkpoint folders in {folder}"


def _same_config(state: dict[str, Any], config: ASDAConfig) -> bool:
    """Whether a checkpoint's config is ``config``, fields its code did not have yet taking their defaults."""
    try:
        return ASDAConfig.from_dict(state.get("config") or {}) == config
    except (TypeError, ValueError):
        return False


def _run_name(path: Path, settings: dict[str, Any] | None) -> tuple[str, str]:
    """(experiment, run name) of the checkpoint's training run: its settings', else the run folder's name in the
    default experiment (a run's folder is named after the run)."""
    if settings and settings.get("name"):
        return str(settings.get("experiment") or tracking.DEFAULT_EXPERIMENT), str(settings["name"])
    return tracking.DEFAULT_EXPERIMENT, run_folder(path).name


def _store_reachable(uri: str) -> bool:
    """Whether the tracking store can be asked at once: a local store that was never written holds no runs (and
    opening it would create it), and a server that does not accept a connection within a few seconds is not
    waited for (MLflow's client retries for minutes)."""
    import socket
    from urllib.parse import urlsplit

    for scheme in ("sqlite:///", "file://"):
        if uri.startswith(scheme):
            return Path(uri[len(scheme):]).exists()
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        try:
            socket.create_connection((parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https"
                                                                                   else 80)), timeout=3).close()
        except OSError:
            return False
        return True
    return "://" in uri or Path(uri).exists()


def tracked_run(run_id: str | None, experiment: str, name: str, notes: list[str]) -> dict[str, Any] | None:
    """The training run in MLflow by id (a sweep row's), else by experiment and run name: its params, tags and
    metrics; None (with a note) where the store is not there or has no such run."""
    uri = tracking.tracking_uri()
    if not _store_reachable(uri):
        notes.append(f"the MLflow store {tracking.shown_uri(uri)} is not there: the training run was not read")
        return None
    try:
        import mlflow

        mlflow.set_tracking_uri(uri)
        run_id = run_id or tracking.find_run(experiment, name)
        if run_id is None:
            notes.append(f"no MLflow run named {name!r} in experiment {experiment!r}")
            return None
        run = mlflow.MlflowClient().get_run(run_id)
    except Exception as exc:  # a foreign or damaged store leaves these facts unknown; the export goes on
        notes.append(f"the MLflow run was not read: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        return None
    return {"run_id": run_id, "params": dict(run.data.params), "tags": dict(run.data.tags),
            "metrics": dict(run.data.metrics)}


def _data_card(data: str, notes: list[str]) -> dict[str, Any] | None:
    from .data.card import load_card

    try:
        return load_card(data)
    except (OSError, ValueError) as exc:  # moved, deleted or never finished: the data's facts are unknown
        notes.append(f"the prepared data {data} could not be read ({str(exc).splitlines()[0][:200]})")
        return None


def card_fingerprint(card: dict[str, Any]) -> str:
    """The sha256 of a data card's contents as canonical JSON (sorted keys), so whitespace does not count; the card
    lists every shard's content hash, so this names the prepared data itself."""
    return hashlib.sha256(json.dumps(card, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --------------------------------------------------------------------------------------------- sweeps


def sweep_membership(path: Path, sweep: str | Path | None) -> dict[str, Any] | None:
    """The sweep the checkpoint belongs to: {"folder", "state", "rows", "matches", "baseline"}, where matches are
    its rows in trials.json (its own cell, and the cells that evaluated the same pretraining another way). A named
    ``sweep`` must hold the checkpoint; a sweep folder found above the checkpoint may not (then None)."""
    from .runtime import SWEEP_BASELINE_FILE as BASELINE_FILE
    from .runtime import SWEEP_STATE_FILE as STATE_FILE
    from .runtime import SWEEP_TRIALS_FILE as TRIALS_FILE

    if sweep is not None:
        folder = Path(sweep)
        if not (folder / STATE_FILE).is_file() or not (folder / TRIALS_FILE).is_file():
            raise ValueError(f"--sweep {folder} is not a finished sweep folder (it needs {STATE_FILE} and "
                             f"{TRIALS_FILE})")
    else:
        folder = next((p for p in path.resolve().parents
                       if (p / STATE_FILE).is_file() and (p / TRIALS_FILE).is_file()), None)
        if folder is None:
            return None
    rows = json.loads((folder / TRIALS_FILE).read_text())
    matches = [r for r in rows if r.get("checkpoint") and same_checkpoint(Path(r["checkpoint"]), path, folder)]
    if not matches:
        if sweep is not None:
            raise ValueError(f"checkpoint {path} is not in --sweep {folder}: no row of its {TRIALS_FILE} names it")
        return None
    matches.sort(key=lambda r: r.get("shares_pretraining_of") is not None)  # the trial's own cell first
    baseline_file = folder / BASELINE_FILE
    baseline = json.loads(baseline_file.read_text()) if baseline_file.is_file() else []
    return {"folder": str(folder.resolve()), "state": json.loads((folder / STATE_FILE).read_text()),
            "rows": rows, "matches": matches, "baseline": baseline}


def same_checkpoint(recorded: Path, path: Path, folder: Path) -> bool:
    """Whether a row's checkpoint is ``path``: the same file, or (a sweep folder that was moved) the same path
    below the sweep folder."""
    if recorded.resolve() == path.resolve():
        return True
    try:
        below = path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return Path(*recorded.parts[-len(below.parts):]) == below and folder.name in recorded.parts


def spread(values: list[Any]) -> dict[str, Any]:
    """{"mean", "std", "n"} of the finite values: std is the sample standard deviation over seeds (as the sweep
    report's), None below two values; mean None where there are none."""
    finite = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)
              and math.isfinite(v)]
    return {"mean": statistics.fmean(finite) if finite else None,
            "std": statistics.stdev(finite) if len(finite) > 1 else None, "n": len(finite)}


def sweep_evaluations(sweep: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per cell that scored the checkpoint: this seed's value and the cell's spread over its seeds, and
    the same for each of the grid's tasks."""
    entries = []
    for row in sweep["matches"]:
        members = [r for r in sweep["rows"] if r.get("cell") == row.get("cell") and not r.get("error")]
        scored = [r for r in members if spread([r.get("metric_value")])["n"]]
        tasks = {name: {"this_seed": value, **spread([(r.get("tasks") or {}).get(name) for r in members])}
                 for name, value in (row.get("tasks") or {}).items()}
        entries.append({"cell": row.get("cell"), "factor": row.get("factor"), "value": row.get("value"),
                        "evaluation": row.get("evaluation") or {}, "metric": row.get("metric"),
                        "seed": row.get("seed"), "this_seed": row.get("metric_value"),
                        **spread([r.get("metric_value") for r in members]),
                        "seeds": sorted(r.get("seed") for r in scored), "tasks": tasks,
                        "collapse": row.get("collapse")})
    return entries


# --------------------------------------------------------------------------------------------- the card


def feature_facts(config: ASDAConfig, weights: Weights, facts: Facts) -> dict[str, Any]:
    """How the encoder's input is computed: the log-mel settings, the frames it was fed and the normalisation of
    its training data (the data card's; the SPEC's defaults, said so, where the data is unknown)."""
    params = (facts.run or {}).get("params") or {}
    fed = params.get(tracking.PARAM_DATA_TARGET_LENGTH)
    if fed is not None:
        length, length_source = int(fed), f"the training run's MLflow param {tracking.PARAM_DATA_TARGET_LENGTH}"
    elif weights.kind == "fine-tuned classifier" and facts.data:
        length, length_source = int(facts.data["target_length"]), "the data card's (fine-tuning's default)"
    else:
        length, length_source = config.target_length, "the checkpoint's config"
    if facts.data and isinstance(facts.data.get("normalisation"), dict):
        norm = facts.data["normalisation"]
        mean, std = float(norm["mean"]), float(norm["std"])
        source = f"the prepared data's card ({facts.data_path}: {norm.get('source', 'its statistics')})"
    elif facts.feeding:
        mean, std = float(facts.feeding["mean"]), float(facts.feeding["std"])
        length, length_source = int(facts.feeding["chunk_frames"]), "the checkpoint's record of its input"
        source = "the checkpoint's record of its training data's normalisation (the data itself is gone)"
    else:
        mean, std = SPEC_MEAN, SPEC_STD
        source = ("SPEC defaults (model.fbank's: AudioSet's statistics), because the training data is unknown; "
                  "replace them with your data's if it was trained on other data")
    return {"sample_rate": SAMPLE_RATE, "num_mel_bins": config.num_mel_bins, "target_length": length,
            "target_length_source": length_source, "mean": mean, "std": std, "source": source,
            "normalisation": "(log_mel - mean) / (2 * std), after padding or cropping to target_length",
            "fbank": dict(FEATURE_SETTINGS)}


def _data_facts(facts: Facts) -> dict[str, Any] | str:
    if not facts.data:
        return UNKNOWN if not facts.data_path else {"path": facts.data_path, "name": UNKNOWN, "fingerprint": UNKNOWN}
    card = facts.data
    return {"name": card.get("name", UNKNOWN), "path": facts.data_path, "fingerprint": card_fingerprint(card),
            "fingerprint_of": "sha256 of dataset.json as canonical JSON", "num_clips": card.get("num_clips"),
            "splits": card.get("splits"), "prepared_by_code_version": card.get("code_version", UNKNOWN)}


def _recipe(config: ASDAConfig, weights: Weights, facts: Facts) -> dict[str, Any] | str:
    settings = facts.settings or {}
    params = (facts.run or {}).get("params") or {}
    taken = {k: settings[k] for k in RECIPE_FIELDS if settings.get(k) is not None}
    taken.update({k: v for k, v in ((f, _param(params.get(f"{tracking.PARAM_TRAIN}{f}"))) for f in RECIPE_FIELDS)
                  if k not in taken and v is not None})
    if not taken and not facts.sweep:
        return UNKNOWN
    recipe: dict[str, Any] = {"training": weights.kind, **taken}
    if weights.kind == "pretraining":
        recipe["objective"] = {k: getattr(config, k) for k in OBJECTIVE_FIELDS}
    if facts.sweep:
        row = facts.sweep["matches"][0]
        recipe.update(grid=facts.sweep["state"].get("grid", UNKNOWN), cell=row.get("cell"),
                      overrides=row.get("overrides", UNKNOWN))
    return recipe


def _param(text: str | None) -> Any:
    """An MLflow param (``str(value)``) as the value it was: a number, a bool, a text; None for "None"."""
    import yaml

    if text is None or text == "None":
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, int | float | bool | str) else text


def _seeds(facts: Facts) -> dict[str, Any]:
    seed = (facts.settings or {}).get("seed")
    if seed is None and facts.sweep:
        seed = facts.sweep["matches"][0].get("seed")
    if seed is None:
        seed = _param(((facts.run or {}).get("params") or {}).get(f"{tracking.PARAM_TRAIN}seed"))
    cell = sweep_evaluations(facts.sweep)[0]["seeds"] if facts.sweep else UNKNOWN
    return {"this": int(seed) if seed is not None else UNKNOWN, "cell": cell}


def _evaluation(weights: Weights, facts: Facts) -> list[dict[str, Any]] | str:
    if facts.sweep:
        return sweep_evaluations(facts.sweep)
    metrics = (facts.run or {}).get("metrics") or {}
    scored = {k: v for k, v in metrics.items() if k.startswith("eval_")}
    if weights.kind == "fine-tuned classifier" and scored:  # the run scored itself once: no spread over seeds
        return [{"source": "the fine-tuning run's MLflow metrics", **{k: scored[k] for k in sorted(scored)},
                 "n": 1, "std": None}]
    return UNKNOWN


def model_card(path: Path, state: dict[str, Any], config: ASDAConfig, weights: Weights, facts: Facts,
               features: dict[str, Any]) -> dict[str, Any]:
    """card.json: every fact the export could find about the checkpoint, "unknown" where none says."""
    from .runtime import code_version

    run = facts.run or {}
    imported = state.get("imported_from")
    sweep = facts.sweep
    baseline = spread([r.get("metric_value") for r in sweep["baseline"]]) if sweep and sweep["baseline"] else None
    return {
        "format": CARD_FORMAT, "format_version": 1,
        "exported": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": {"checkpoint": str(path.resolve()), "sha256": file_sha256(path), "kind": weights.kind,
                   "encoder": weights.which, "head": weights.head,
                   "imported_from": imported if isinstance(imported, dict) else None},
        "updates": int(state["step"]) if isinstance(state.get("step"), int) else UNKNOWN,
        "data": _data_facts(facts),
        "features": features,
        "recipe": _recipe(config, weights, facts),
        "seeds": _seeds(facts),
        "evaluation": _evaluation(weights, facts),
        "random_init_baseline": ({"metric": sweep["matches"][0].get("metric"), **baseline} if baseline
                                 else UNKNOWN),
        "sweep": ({"folder": sweep["folder"], "sweep_id": sweep["state"].get("sweep_id", UNKNOWN),
                   "grid": sweep["state"].get("grid", UNKNOWN),
                   "fingerprint": sweep["state"].get("fingerprint", UNKNOWN)} if sweep else UNKNOWN),
        "training_run": {"mlflow_run_id": run["run_id"]} if run else UNKNOWN,
        "code_version": {"training": run.get("tags", {}).get(tracking.TAG_CODE_VERSION, UNKNOWN),
                         "export": code_version()},
        "model": {"parameters": sum(v.numel() for v in weights.encoder.values()), "embed_dim": config.embed_dim,
                  "depth": config.depth, "attention": config.attention},
        "notes": weights.notes + facts.notes,
    }


# --------------------------------------------------------------------------------------------- writing


def write_atomically(out: Path, force: bool, write: Callable[[Path], None]) -> None:
    """Run ``write`` on a new folder beside ``out``, then rename it to ``out``: a failure (or a stop) part-way
    leaves ``out`` as it was, never half written. With ``force`` a non-empty ``out`` is moved aside first and
    removed once the new folder is in place."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.export-{os.getpid()}")
    old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write(staging)
        if out.is_dir() and any(out.iterdir()):
            _check_out(out, force)  # filled while this export ran: the same rules
            os.replace(out, old)
        os.replace(staging, out)  # an empty out is replaced in one step
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)  # the folder that was there comes back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _value(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return UNKNOWN if value is None else str(value)


def _evaluation_lines(card: dict[str, Any]) -> list[str]:
    evaluation = card["evaluation"]
    if not isinstance(evaluation, list):
        return [f"Evaluation: {UNKNOWN} (the checkpoint belongs to no sweep that scored it)."]
    lines = ["| cell | metric | this seed | mean | std | n (seeds) |", "|---|---|---|---|---|---|"]
    for e in evaluation:
        if "cell" not in e:  # a fine-tuning run's own scores
            scores = ", ".join(f"{k} {_value(v)}" for k, v in e.items() if k.startswith("eval_"))
            lines.append(f"| fine-tuning | {scores} | | | | 1 |")
            continue
        lines.append(f"| {e['cell']} | {e['metric']} | {_value(e['this_seed'])} | {_value(e['mean'])} | "
                     f"{_value(e['std'])} | {e['n']} ({', '.join(map(str, e['seeds']))}) |")
        for name, task in e["tasks"].items():
            lines.append(f"| {e['cell']} · task {name} | | {_value(task['this_seed'])} | {_value(task['mean'])} "
                         f"| {_value(task['std'])} | {task['n']} |")
    baseline = card["random_init_baseline"]
    if isinstance(baseline, dict):
        lines.append(f"| random-init baseline | {baseline['metric']} | | {_value(baseline['mean'])} | "
                     f"{_value(baseline['std'])} | {baseline['n']} |")
    return lines


def render_readme(card: dict[str, Any], config: ASDAConfig) -> str:
    """README.md: the card for a reader, with how to load the weights."""
    source, data, features = card["source"], card["data"], card["features"]
    name = data["name"] if isinstance(data, dict) else UNKNOWN
    lines = [f"# ASDA encoder ({source['encoder']}, {config.embed_dim}-d, {config.depth} blocks, "
             f"{config.attention} attention)", "",
             f"Exported by `asda export` from `{source['checkpoint']}` (sha256 `{source['sha256']}`), a "
             f"{source['kind']} checkpoint.", "", "## How it was made", "",
             f"- data set: {name}" + (f" (card fingerprint `{data['fingerprint']}`, {data.get('num_clips')} clips "
                                      f"at `{data['path']}`)" if isinstance(data, dict) else ""),
             f"- updates: {card['updates']}",
             f"- seed: {card['seeds']['this']}; seeds of its sweep cell: {card['seeds']['cell']}",
             f"- recipe: {json.dumps(card['recipe']) if isinstance(card['recipe'], dict) else card['recipe']}",
             f"- sweep: {card['sweep']['sweep_id'] if isinstance(card['sweep'], dict) else UNKNOWN}",
             f"- code version: training {card['code_version']['training']}, export {card['code_version']['export']}",
             "", "## Evaluation", "", *_evaluation_lines(card), "", "## Input", "",
             f"Log-mel filterbank (`model.fbank`): {features['sample_rate']} Hz, {features['num_mel_bins']} mel bins, "
             f"{features['target_length']} frames, normalised as {features['normalisation']} with mean "
             f"{features['mean']:.4f} and std {features['std']:.4f} (from {features['source']}).", "",
             "## Use", "", "```python", "from model import fbank, load_pretrained",
             'encoder = load_pretrained("this folder")  # eval mode; torch and safetensors only',
             "s = encoder.feature_settings",
             'utterance, patches = encoder.extract_features(fbank(wav, sr, target_length=s["target_length"], '
             'mean=s["mean"], std=s["std"])[None])', "```", ""]
    if card["notes"]:
        lines += ["## Notes", "", *[f"- {note}" for note in card["notes"]], ""]
    return "\n".join(lines)


def format_summary(card: dict[str, Any]) -> str:
    """What ``asda export`` prints: where the folder is, what it holds, what the card knows and what it does not."""
    source, data, features = card["source"], card["data"], card["features"]
    lines = [f"wrote {card['out']}: {WEIGHTS_NAMES}",
             f"  encoder: {source['encoder']} of a {source['kind']} checkpoint ({source['checkpoint']}, sha256 "
             f"{source['sha256'][:12]}), updates {card['updates']}"
             + (f", with its head ({source['head']['num_classes']} classes)" if source["head"] else ""),
             f"  data: {data['name']} (card fingerprint {data['fingerprint'][:12]})" if isinstance(data, dict)
             else f"  data: {UNKNOWN}",
             f"  input: {features['target_length']} frames, mean {features['mean']:.4f}, std {features['std']:.4f} "
             f"({features['source']})"]
    if isinstance(card["evaluation"], list):
        for e in card["evaluation"]:
            if "cell" in e:
                spread_text = f"± {_value(e['std'])} " if e["std"] is not None else ""
                lines.append(f"  evaluation: {e['cell']} {e['metric']} {_value(e['this_seed'])} (seed {e['seed']}); "
                             f"cell mean {_value(e['mean'])} {spread_text}over {e['n']} seed(s)")
    unknown = [k for k, v in card.items() if v == UNKNOWN]
    if unknown:
        lines.append(f"  unknown: {', '.join(unknown)} (written as unknown in {CARD_FILE})")
    lines += [f"  note: {note}" for note in card["notes"]]
    lines.append(f"  load: model.load_pretrained({card['out']!r})")
    return "\n".join(lines)
