"""A frozen model's outputs over prepared splits, computed on Ray Data: the caller gets (N, D) vectors back, never
the fbank.

    out = model_outputs(encoder, prepared, ["train", "test"], target_length=112, labels="index")
    out["output"]  # (N, D) float32 utterance vectors (an ASDAEncoder) or (N, C) logits (an ASDAClassifier)
    out["label"], out["id"], out["split"], out["fold"]  # per clip, in shard order (read_clips' order)

The feed's reader gives the raw rows; they are cut into blocks of exactly ``batch_size`` consecutive clips (the last
one shorter) and an actor pool decodes each block (the feed's ``to_model_batch``) and runs the model on it as one
batch. Which clips share a batch therefore depends on the data alone, never on how Parquet reads were split or which
actor got a block. With order preserved, a fixed thread count and eval mode, CPU actors give the same bits as
encoding the same clips in one process in batches of ``batch_size`` (``probe.encoder_features``), and GPU
actors the same bits run after run on one kind of GPU.

The weights reach the actors through the object store (the config and state dict, put once); an actor takes a
GPU when the cluster has one, else a quarter of a CPU (a whole one would starve reads on a 2-core instance, SPEC §8).
An actor is not restarted (``on_actor_pool``).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import ASDAClassifier, ASDAConfig, ASDAEncoder, read_out

from .data import storage
from .data.card import load_card
from .data.feed import (
    DATA_TASK_CPUS,
    DATA_TASKS_PER_WORKER,
    LabelMode,
    check_labels,
    check_splits,
    read_rows,
    split_rows,
    to_model_batch,
    verify_shards,
)

# What an encoder gives per clip, as an evaluation reads it: "cls" (the utterance vector: the CLS output), "mean"
# (the release's mean pooling: the patch outputs averaged, the CLS kept in the sequence) or "cls+mean" (the two
# side by side, (B, 2D): the linear evaluation of DINO and its successors, which probes both what the utterance
# objective shaped and what the frame objective did). See model.encoder.READOUTS.
ENCODER_READOUTS = ("cls", "mean", "cls+mean")
# The probe's older names of two read-outs ("utterance" for cls, "utterance+mean" for cls+mean).
READOUT_ALIASES = {"utterance": "cls", "utterance+mean": "cls+mean"}
INFERENCE_THREADS = 1  # torch threads per actor: the thread count orders float sums, so it is fixed, not the machine's
BATCHES_PER_ACTOR = 8  # a pool grows only while each actor has at least this many batches: starting one costs ~3 s


def check_readout(readout: str) -> str:
    """``readout`` as ENCODER_READOUTS names it (an older name, READOUT_ALIASES, is translated); else an error
    naming the allowed ones."""
    readout = READOUT_ALIASES.get(readout, readout)
    if readout not in ENCODER_READOUTS:
        raise ValueError(f"readout={readout!r} is not allowed: expected one of {list(ENCODER_READOUTS)}")
    return readout


def readout_width(config: ASDAConfig, readout: str) -> int:
    """Floats per clip an encoder with ``config`` gives as ``readout``."""
    return config.embed_dim * (2 if readout == "cls+mean" else 1)


def readout_columns(config: ASDAConfig, readout: str) -> slice:
    """Where ``readout``'s floats sit in the "cls+mean" vector of an encoder with ``config``."""
    D = config.embed_dim
    return {"cls": slice(0, D), "mean": slice(D, 2 * D), "cls+mean": slice(0, 2 * D)}[check_readout(readout)]


def model_spec(model: ASDAEncoder | ASDAClassifier, readout: str = "cls") -> dict[str, Any]:
    """What an actor needs to rebuild ``model``: its kind, config, head size, read-out and weights (CPU tensors);
    an encoder gives ``readout`` per clip (ENCODER_READOUTS), a classifier reads its own."""
    if isinstance(model, ASDAClassifier):
        kind, num_classes, config, readout = ("classifier", model.head.linear.out_features, model.encoder.config,
                                              model.readout)
    elif isinstance(model, ASDAEncoder):
        kind, num_classes, config, readout = "encoder", None, model.config, check_readout(readout)
    else:
        raise TypeError(f"model_outputs takes an ASDAEncoder or an ASDAClassifier, not {type(model).__name__}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"kind": kind, "config": config.to_dict(), "num_classes": num_classes, "state": state,
            "readout": readout}


def build_model(spec: dict[str, Any]) -> ASDAEncoder | ASDAClassifier:
    config = ASDAConfig.from_dict(spec["config"])
    if spec["kind"] == "classifier":
        model = ASDAClassifier(config, spec["num_classes"], readout=spec["readout"])
    else:
        model = ASDAEncoder(config)
    model.load_state_dict(spec["state"])
    return model.eval()


@torch.no_grad()
def forward(model: ASDAEncoder | ASDAClassifier, fbank: torch.Tensor, readout: str = "cls") -> torch.Tensor:
    """(B, T, 128) normalised log-mel -> (B, C) logits (classifier), or (encoder) the read-out (B, D), or with
    ``readout="cls+mean"`` (B, 2D): the utterance vector, then the mean of the patch outputs."""
    if isinstance(model, ASDAClassifier):
        return model(fbank).float()
    utterance, patches = model.extract_features(fbank)
    if readout == "cls+mean":
        return torch.cat([utterance, read_out(utterance, patches, "mean")], dim=-1).float()
    return read_out(utterance, patches, check_readout(readout)).float()


def actor_model(spec_ref: list, threads: int) -> tuple[ASDAEncoder | ASDAClassifier, dict[str, Any], torch.device]:
    """In an actor of a pool: (the model rebuilt once from the spec in the object store, on the actor's GPU if it
    has one, the spec, the device), with torch's thread count fixed to ``threads``."""
    import ray

    torch.set_num_threads(threads)
    device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
    spec = ray.get(spec_ref[0])
    return build_model(spec).to(device), spec, device


class _ModelActor:
    """One actor of the pool: rebuilds the model from the object store once, then decodes and runs blocks."""

    def __init__(self, spec_ref: list, *, threads: int, decode: dict[str, Any]):
        self.model, spec, self.device = actor_model(spec_ref, threads)
        self.readout, self.decode = spec["readout"], decode

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        clips = to_model_batch(rows, **self.decode)
        result = {"id": clips["id"], "split": np.asarray(rows["split"], dtype=object), "fold": np.asarray(rows["fold"])}
        if "noisy" in clips:  # the noisy versions only: the clean ones come from the caller's own pass
            for level, fbank in enumerate(clips["noisy"]):
                result[f"output_{level}"] = self._forward(fbank)
        else:
            result["output"] = self._forward(clips["fbank"])
        if "label" in clips:
            result["label"] = clips["label"]
        return result

    def _forward(self, fbank: np.ndarray) -> np.ndarray:
        return forward(self.model, torch.from_numpy(fbank).to(self.device), self.readout).cpu().numpy()


def pool_size(ray, batches: int) -> tuple[int, dict[str, float]]:
    """(largest actor count, resources per actor): one GPU each when the cluster has GPUs (at most one actor per
    GPU), else DATA_TASK_CPUS of a CPU each, at most one actor per two physical cores of the cluster. Never more
    than one actor per BATCHES_PER_ACTOR batches: a small job runs on one actor, started once."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        cap, per_actor = gpus, {"num_gpus": 1, "num_cpus": DATA_TASK_CPUS}
    else:
        # A local instance declares more logical CPUs than it has cores (runtime.local_num_cpus); count cores.
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        cores = min(int(resources.get("CPU", 1)), (os.cpu_count() or 1) * max(1, nodes))
        cap, per_actor = max(1, cores // 2), {"num_cpus": DATA_TASK_CPUS}
    return max(1, min(cap, math.ceil(batches / BATCHES_PER_ACTOR))), per_actor


def on_actor_pool(ds, actor_class: type, **options):
    """``ds.map_batches(actor_class, **options)`` on a pool whose actors are not restarted. Ray Data hands every
    pool actor its transformer and context as object-store refs; where the actor may restart (Ray Data's default,
    max_restarts=-1), the driver's own core worker prints, once, on the console: "core_worker.cc:...: Actor with
    class name: 'MapWorker(MapBatches(_ModelActor))' and ID: '...' has constructor arguments in the object store
    and max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor restart will
    fail. See https://github.com/ray-project/ray/issues/53727" (such a restart is not reliable: the arguments'
    lineage is not kept for it). A pass of a frozen model is short and gives the same outputs on any actor: an
    actor that dies fails the pass with its error, and the command (or the sweep's trial) runs it again."""
    with warnings.catch_warnings():
        # Ray 2.60 takes max_restarts only among map_batches' extra remote args, which it calls deprecated (to go
        # in 2.64) while no named parameter replaces it yet: this one knob, kept off the console knowingly.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
        return ds.map_batches(actor_class, max_restarts=0, **options)


def in_blocks_of(ds, rows: int):
    """``ds`` in blocks of exactly ``rows`` consecutive rows (the last may be short), whatever blocks the reads
    made: the batch composition is then a function of the data only, so the outputs do not depend on the cluster.

    Its tasks take DATA_TASK_CPUS each, like the reads: ``repartition`` offers no resources of its own and Ray
    Data gives its tasks a whole CPU, which a node whose trial holds all but part of a CPU never has. After a
    worker node was lost, the trial left on a 3-CPU head (2 CPUs, its model actor a quarter more) waited on them
    for good. The setting goes on the plan's repartition operator (Ray Data 2.60, pinned), which takes remote
    arguments like any map operator."""
    from ray.data._internal.logical.operators import StreamingRepartition

    ds = ds.repartition(target_num_rows_per_block=rows, strict=True)
    operator = ds._logical_plan.dag
    assert isinstance(operator, StreamingRepartition), f"Ray Data planned {type(operator).__name__} here"
    operator.ray_remote_args["num_cpus"] = DATA_TASK_CPUS
    return ds


def model_outputs(
    model: ASDAEncoder | ASDAClassifier,
    prepared: str | Path,
    split: str | Sequence[str],
    *,
    target_length: int | None = None,
    labels: LabelMode = "index",
    folds: Iterable[int] | None = None,
    batch_size: int = 64,
    threads: int = INFERENCE_THREADS,
    readout: str = "cls",
    noise_snrs: Sequence[float] = (),
) -> dict[str, np.ndarray]:
    """``model``'s outputs on every clip of ``split`` (and ``folds``), computed on Ray Data (see the module).

    ``readout``: what an encoder gives per clip (ENCODER_READOUTS). ``noise_snrs``: instead of "output", "noisy"
    (L, N, ·): the outputs of the clips with seeded white noise at each SNR in dB (``feed.add_noise``).
    Returns "output" (N, D, 2D or C) float32,
    "id", "split", "fold" and, unless labels="none", "label" as the feed gives it; N may be 0. target_length
    defaults to the card's.
    """
    import ray.data

    from .runtime import ensure_ray

    if batch_size < 1 or threads < 1:
        raise ValueError(f"batch_size={batch_size!r}, threads={threads!r} are not allowed: expected >= 1 each")
    prepared = storage.normalise(prepared)
    card = load_card(prepared)
    splits = check_splits(card, split)
    check_labels(card, labels)
    shards = verify_shards(prepared, card)
    folds = None if folds is None else [int(f) for f in folds]
    clips = split_rows(card, splits, folds)
    spec = model_spec(model, readout)
    width = spec["num_classes"] or readout_width(model.config, spec["readout"])
    ray = ensure_ray()
    actors, per_actor = pool_size(ray, math.ceil(clips / batch_size))
    norm = card["normalisation"]
    decode = dict(mean=norm["mean"], std=norm["std"], target_length=target_length or card["target_length"],
                  num_classes=len(card["class_names"]), num_mel_bins=card["features"]["num_mel_bins"],
                  labels=labels, random_crop=False, noise_snrs=tuple(noise_snrs))
    ds = read_rows(shards=shards, splits=splits, folds=folds, tasks=DATA_TASKS_PER_WORKER)
    ds = in_blocks_of(ds, batch_size)
    ds = on_actor_pool(ds, _ModelActor, batch_size=batch_size, batch_format="numpy",
                       fn_constructor_args=([ray.put(spec)],),
                       fn_constructor_kwargs=dict(threads=threads, decode=decode),
                       compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors), **per_actor)
    ds.context.execution_options.preserve_order = True  # outputs in shard order, whichever actor finishes first
    out = _gathered(ds, clips, width, labels, decode)
    if noise_snrs:
        levels = [out.pop(f"output_{i}", np.zeros((0, width), dtype=np.float32)) for i in range(len(noise_snrs))]
        out.pop("output", None)
        out["noisy"] = np.stack(levels)
    return out


def _gathered(ds, clips: int, width: int, labels: LabelMode, decode: dict) -> dict[str, np.ndarray]:
    """The dataset's output batches joined in order, with a progress line; the empty arrays when it has none."""
    from .console import progress

    parts, done, shown = [], 0, progress(clips, "clips encoded")
    for part in ds.iter_batches(batch_size=None, batch_format="numpy"):
        parts.append(part)
        done += len(part["id"])
        if shown:
            shown.update(done)
    if shown:
        shown.finish()
    if not parts:
        empty = {"output": np.zeros((0, width), dtype=np.float32), "id": np.zeros(0, dtype=object),
                 "split": np.zeros(0, dtype=object), "fold": np.zeros(0, dtype=np.int64)}
        if labels != "none":
            empty["label"] = to_model_batch({k: [] for k in ("id", "frames", "fbank", "labels", "event_start",
                                                             "event_end")}, **decode)["label"]
        return empty
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
