"""How much memory one trial of a sweep takes, how many fit on the machine at once, and how a trial that Ray's
memory monitor killed is named on the console.

A trial's memory is measured, not guessed: one real pretraining update (the trainer's own, ``pipelines.update``)
of the grid's heaviest cell at the grid's batch and frames runs in a subprocess, whose peak resident size is what
one Train worker holds (its imports, the model, the teacher, AdamW's state and the update's activations); the
same subprocess's size after its imports is what a process of the trial that does not train holds. Times the
Train workers of a trial, plus the trial's own process and its Train controller where the trial does not train
in its own process, that is one trial's peak. A GPU worker's update runs in GPU memory: for it, what the host
holds is measured (the imports and the model as it is built, before it moves). The result is kept in the
sweep's folder (``MEMORY_FILE``), keyed by everything that determines it, so a resumed sweep does not measure
again. Where the measurement cannot run, an estimate from the model's size stands in, and says so.

Ray's memory monitor kills workers when the node's memory passes its threshold; the trial's error then carries
Ray's own account ("Memory on the node (IP: ..., ID: ...) was 22.91GB used / 23.54GB limit"), which
``oom_reason`` turns into the console's "out of memory (22.9 GB used of 23.5)".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MEMORY_FILE = "memory.json"  # in the sweep's folder: the measurements, one per key (``_key``)
GB = 2**30  # Ray's memory messages count GB in units of 2^30 bytes; the console does as they do
MARGIN = 0.8  # share of the free memory trials may take: the rest for Ray Data, the driver and the page cache
MEASURE_TIMEOUT_S = 300.0  # one update of the base model at a real batch takes minutes on a few cores
MEASURE_SHARE = 0.8  # the measuring subprocess is stopped past this share of the memory free when it starts
CONTROL_PROCESSES = 2  # a trial that does not train in its own process holds it and its Train controller
# An estimate from the model's size where nothing could be measured, its constants fitted to measurements on CPU
# in float32 (tiny model, 4 and 8 students, 112 and 256 frames, batch 8: 0.84 and 0.97 GB measured, 0.93 and 1.03
# estimated; base model, 16 students, 1024 frames, batch 2: 6.1 measured, 7.4 estimated): the imports of a
# trial's process (torch, Ray, Ray Train, Ray Data, MLflow: 0.70 GB measured), the update's own workspace, and
# the bytes of activations the forward and backward hold per token, layer and channel of each view of a clip
# (the teacher's and every student's: 24 on the base model, 37 on the tiny one).
FALLBACK_OVERHEAD = 768 * 2**20
UPDATE_WORKSPACE = 128 * 2**20
ACTIVATION_BYTES = 32


@dataclass(frozen=True)
class TrialMemory:
    """One trial's peak memory (``per_trial``, bytes) and what it is made of."""

    per_trial: int  # what one trial peaks at: its Train workers and its other processes together
    per_worker: int  # one Train worker (or the trial's own process where it trains itself): one update's peak
    overhead: int  # one process of the trial that does not train: its imports
    workers: int
    in_process: bool
    how: str  # where the number comes from, for the header: "measured: ..." or "estimated from ..."

    @classmethod
    def compose(cls, per_worker: int, overhead: int, workers: int, in_process: bool, how: str) -> TrialMemory:
        """The trial's peak from its parts: ``workers`` Train workers, plus the trial's own process and its Train
        controller where it does not train in its own process (Ray Train's local mode has neither)."""
        total = workers * per_worker + (0 if in_process else CONTROL_PROCESSES * overhead)
        return cls(int(total), int(per_worker), int(overhead), workers, in_process, how)


# --- the grid's trial ----------------------------------------------------------------------------------------


def sweep_memory(grid, folder: str | Path, data: str | Path | None, wanted: int, *, local: bool) -> tuple[int, str]:
    """(the most trials that fit at once, the header's line) for a sweep that would run ``wanted`` at once: the
    model-size estimate where twice it still lets every one of them fit (measuring would change nothing, and costs
    a process's start and imports), else the measurement (``grid_memory``)."""
    config, settings = heaviest_trial(grid, data)
    estimate = estimate_from_size(config, settings)
    doubled = dataclasses.replace(estimate, per_trial=2 * estimate.per_trial)
    if memory_line(doubled, local=local)[0] >= wanted:
        how = f"{estimate.how}; {wanted} at twice that fit, so it was not measured"
        return memory_line(dataclasses.replace(estimate, how=how), local=local)
    return memory_line(trial_memory(config, settings, folder), local=local)


def grid_memory(grid, folder: str | Path, data: str | Path | None = None, *, threads: int | None = None,
                timeout_s: float = MEASURE_TIMEOUT_S) -> TrialMemory:
    """One trial of ``grid`` (a ``sweeps.grid.Grid``): its heaviest cell (``heaviest_trial``) measured at the
    grid's batch and frames, workers and way of training. Cached in ``folder`` (``trial_memory``)."""
    config, settings = heaviest_trial(grid, data, threads=threads)
    return trial_memory(config, settings, folder, timeout_s=timeout_s)


def heaviest_trial(grid, data: str | Path | None = None, *, threads: int | None = None):
    """(config, settings) of the grid's heaviest cell by the model-size estimate (the most students, the widest
    model) at the frames its trials feed (``data``: its prepared folder, whose card gives them; else the model's
    ``target_length``), with the grid's batch, workers and way of training (``Grid.trains_in_process``)."""
    from pipelines.pretrain import PretrainSettings

    train = {**grid.train, "in_process": grid.trains_in_process}
    settings = PretrainSettings(**{**train, "data": str(data or "-"), "threads_per_worker": threads
                                   or train.get("threads_per_worker") or 1})
    configs = {json.dumps(c.to_dict(), sort_keys=True): c for c in (grid.config_for(t) for t in grid.trials())}
    frames = grid_frames(settings, data, next(iter(configs.values())))
    sized = [dataclasses.replace(c, target_length=frames) for c in configs.values()]
    return max(sized, key=lambda c: estimate_from_size(c, settings).per_trial), settings


def grid_frames(settings, data: str | Path | None, config) -> int:
    """Frames per clip the trials feed: the settings' ``target_length``, else the prepared data's (its card, as
    ``pipelines.pretrain`` decides), else the model's."""
    if settings.target_length:
        return int(settings.target_length)
    if data is not None:
        try:
            from pipelines.data.card import feed_length, load_card

            return feed_length(load_card(data), None, data, config.patch_size)
        except Exception:  # noqa: BLE001 - no card here (a cluster's shared folder): the model's length
            pass
    return int(config.target_length)


def trial_memory(config, settings, folder: str | Path, *, timeout_s: float = MEASURE_TIMEOUT_S,
                 limit_bytes: int | None = None) -> TrialMemory:
    """One trial of ``config`` (its ``target_length``: the frames fed) trained with ``settings`` (a
    ``PretrainSettings``: batch, workers, in process or not, precision, threads): measured once
    (``measure_update``) and kept in ``folder``/MEMORY_FILE under its key; where the measurement fails, the
    estimate from the model's size (``estimate_from_size``), not kept, so that a later run measures again; one
    that outgrew ``limit_bytes`` (``measure_update``) counts as at least that much per worker."""
    key, spec = _key(config, settings)
    path = Path(folder) / MEMORY_FILE
    known = _read(path)
    try:
        return TrialMemory(**known[key]["memory"])
    except (KeyError, TypeError):  # not measured yet (or kept in another shape): measured now
        pass
    what = (f"the host side of a GPU worker of {_describe(config)} (imports, the model before it moves)"
            if settings.use_gpu else
            f"one update of {_describe(config)} at batch {settings.batch_size}, {config.target_length} frames")
    try:
        found = measure_update(spec, timeout_s=timeout_s, limit_bytes=limit_bytes)
    except MeasureFailed as failed:
        estimate = estimate_from_size(config, settings)
        if failed.exceeded is None:
            return dataclasses.replace(estimate, how=f"{estimate.how}; measuring failed: {failed}")
        # It outgrew what it was allowed: at least that much, the estimate where that is more.
        stopped = f"{what} outgrew {failed.exceeded / GB:.1f} GB and was stopped"
        how = f"{estimate.how}; {stopped}" if estimate.per_worker > failed.exceeded else f"at least: {stopped}"
        memory = TrialMemory.compose(max(failed.exceeded, estimate.per_worker), estimate.overhead,
                                     settings.workers, settings.in_process, how)
    else:
        memory = TrialMemory.compose(found["peak"], found["overhead"], settings.workers, settings.in_process,
                                     f"measured: {what}")
    known[key] = {"spec": spec, "memory": dataclasses.asdict(memory), "at": time.strftime("%Y-%m-%d %H:%M:%S")}
    _write(path, known)
    return memory


def _describe(config) -> str:
    return (f"the {config.embed_dim}-wide, {config.depth}-layer model with {config.num_students} student"
            f"{'s' if config.num_students != 1 else ''}")


def _key(config, settings) -> tuple[str, dict[str, Any]]:
    """What determines a trial's memory (the model, batch, frames, workers, where it trains, precision, threads)
    and a short key of it."""
    spec = {"config": config.to_dict(), "batch_size": int(settings.batch_size),
            "frames": int(config.target_length), "workers": int(settings.workers),
            "in_process": bool(settings.in_process), "threads": int(settings.threads_per_worker or 1),
            "precision": None if settings.use_gpu else settings.precision, "gpu": bool(settings.use_gpu)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16], spec


def _read(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text())
        return found if isinstance(found, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(path: Path, known: dict[str, Any]) -> None:
    """Written whole and renamed into place: a reader never sees half a file. A folder that cannot take it costs
    the cache, never the sweep."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f".{path.name}.{os.getpid()}")
        part.write_text(json.dumps(known, indent=2))
        part.replace(path)
    except OSError:
        pass


# --- the measurement -----------------------------------------------------------------------------------------


class MeasureFailed(RuntimeError):
    """The measuring subprocess did not give a number: why; ``exceeded``: the bytes it was stopped at when it
    outgrew the memory it was allowed (None for any other failure)."""

    def __init__(self, reason: str, exceeded: int | None = None):
        super().__init__(reason)
        self.exceeded = exceeded


def measure_update(spec: dict[str, Any], *, timeout_s: float = MEASURE_TIMEOUT_S,
                   limit_bytes: int | None = None) -> dict[str, int]:
    """Run one pretraining update of ``spec`` (``_key``'s) in a subprocess on CPU; returns its ``peak`` resident
    bytes (``getrusage``), its ``overhead`` (resident after its imports) and AdamW's ``state`` bytes. The
    subprocess is stopped (its whole process group) past ``timeout_s`` or when its resident size passes
    ``limit_bytes`` (default: MEASURE_SHARE of the memory free now), so the measurement never drives the
    machine out of memory itself. Raises MeasureFailed."""
    from pipelines.runtime import REPO_ROOT

    limit = limit_bytes or int(MEASURE_SHARE * local_available())
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(spec.get("threads") or 1)}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "sweeps.memory", json.dumps(spec)], cwd=REPO_ROOT, env=env,
                                stdout=out, stderr=err, start_new_session=True)
        try:
            _watch(proc, limit, timeout_s)
        finally:
            _stop(proc)
        out.seek(0)
        err.seek(0)
        lines = out.read().decode(errors="replace").strip().splitlines()
        if proc.returncode != 0 or not lines:
            tail = err.read().decode(errors="replace").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            raise MeasureFailed(f"the measuring process failed ({tail[0][:200]})")
    return json.loads(lines[-1])


def _watch(proc: subprocess.Popen, limit: int, timeout_s: float) -> None:
    """Wait for ``proc``, sampling its resident size; MeasureFailed past ``limit`` bytes or ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        rss = _resident(proc.pid)
        if rss > limit:
            raise MeasureFailed(f"it outgrew {limit / GB:.1f} GB", exceeded=rss)
        if time.monotonic() > deadline:
            raise MeasureFailed(f"it took longer than {timeout_s:.0f} s")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    """The measuring process and anything it started (its own process group), if still running."""
    import signal

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _resident(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _measure_here(spec: dict[str, Any]) -> dict[str, int]:
    """In the measuring subprocess: the imports of a trial's process, then the trainer's update of the spec's
    model on one batch of its size and frames. AdamW allocates its two moments at the first update's step, after
    the backward has freed the activations; every later update holds them through its backward, so they are
    added to the first update's peak. For a GPU worker (``spec["gpu"]``) the host holds the imports and the model
    as it is built, before it moves to the GPU, where its update runs: that much is measured, on CPU."""
    import resource

    import mlflow  # noqa: F401 - what a trial's processes import: their resident size is part of each
    import ray.data  # noqa: F401
    import ray.train  # noqa: F401
    import ray.tune  # noqa: F401
    import torch

    from model import ASDA, ASDAConfig
    from pipelines.cost import _release_free_heap, resident_bytes

    torch.set_num_threads(int(spec.get("threads") or 1))
    _release_free_heap()
    overhead = resident_bytes()
    config = ASDAConfig.from_dict(spec["config"])
    torch.manual_seed(0)
    model = ASDA(config)
    state = 0 if spec.get("gpu") else _one_update(model, spec)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return {"peak": int(peak + state), "overhead": int(overhead), "state": int(state)}


def _one_update(model, spec: dict[str, Any]) -> int:
    """One update of ``model`` on CPU as the trainer runs it (``pipelines.update.build_update``) on a batch of the
    spec's size and frames; returns the bytes of AdamW's state it allocated."""
    import torch

    from pipelines.pretrain import PretrainSettings
    from pipelines.update import build_update

    settings = PretrainSettings(data="-", batch_size=spec["batch_size"], precision=spec.get("precision"))
    update = build_update(model, settings, torch.device("cpu"))
    update(torch.randn(spec["batch_size"], spec["frames"], model.config.num_mel_bins))
    return sum(t.numel() * t.element_size() for s in update.optimiser.state.values() for t in s.values()
               if torch.is_tensor(t) and t.dim() > 0)


def estimate_from_size(config, settings) -> TrialMemory:
    """A trial's memory from the model's size alone, where nothing could be measured: the imports
    (FALLBACK_OVERHEAD), float32 weights, gradients and AdamW's two moments of what trains, the teacher's and the
    buffers' weights, the update's workspace and ACTIVATION_BYTES per token, layer and channel of each view
    (teacher and students) of each clip of the batch. Parameters counted on the meta device: no memory, no
    time. For a GPU worker, the host's share: the imports and the model as it is built."""
    import torch

    from model import ASDA

    with torch.device("meta"):
        model = ASDA(config)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kept = sum(p.numel() for p in model.parameters() if not p.requires_grad) + sum(b.numel() for b in model.buffers())
    rows, cols = config.grid
    tokens = rows * cols + 1
    views = settings.batch_size * (config.num_students + 1)
    activations = ACTIVATION_BYTES * views * tokens * config.embed_dim * config.depth
    per_worker = FALLBACK_OVERHEAD + UPDATE_WORKSPACE + 16 * trained + 4 * kept + activations
    if settings.use_gpu:  # the host holds the model as it is built; the update runs in GPU memory
        per_worker = FALLBACK_OVERHEAD + 4 * (trained + kept)
    return TrialMemory.compose(per_worker, FALLBACK_OVERHEAD, settings.workers, settings.in_process,
                               f"estimated from the model's size ({trained / 1e6:.1f} M trained parameters)")


# --- how many fit ----------------------------------------------------------------------------------------------


def memory_cap(per_trial_bytes: int, available_bytes: int, margin: float = MARGIN) -> int:
    """Trials that fit at once in ``margin`` of ``available_bytes``: at least one (a trial that does not fit
    alone runs alone, and the header says so)."""
    return max(1, _fits(per_trial_bytes, available_bytes, margin))


def _fits(per_trial_bytes: int, available_bytes: int, margin: float) -> int:
    if per_trial_bytes <= 0:
        raise ValueError(f"per_trial_bytes={per_trial_bytes!r} is not allowed: expected a positive number")
    return int(max(0, available_bytes) * margin // per_trial_bytes)


def local_available() -> int:
    """Bytes this machine can still give without swapping: /proc/meminfo's MemAvailable (a cgroup's limit less its
    usage where that is smaller)."""
    found = None
    try:
        with open("/proc/meminfo") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        found = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cgroup = _cgroup_room()
    return min(found, cgroup) if cgroup is not None else found


def _cgroup_room() -> int | None:
    """A cgroup v2 memory limit less its current usage, or None where there is no limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None


def cluster_memory() -> list[int]:
    """Ray's memory resource of each live node (bytes; what Ray leaves its tasks and actors beside the object
    store), from the instance this process is connected to."""
    import ray

    return [int(n["Resources"].get("memory", 0)) for n in ray.nodes() if n.get("Alive")]


def memory_line(memory: TrialMemory, *, local: bool, margin: float = MARGIN,
                nodes: list[int] | None = None) -> tuple[int, str]:
    """(the most trials that fit at once, the sweep header's line saying so). ``local``: this machine's own Ray
    instance, whose free memory (``local_available``) counts; else the cluster's nodes (``nodes``, default
    ``cluster_memory``), each holding the trials that fit in ``margin`` of its Ray memory."""
    peak = f"one trial peaks at ~{memory.per_trial / GB:.1f} GB ({memory.how})"
    if local:
        free = local_available()
        cap = memory_cap(memory.per_trial, free, margin)
        where = f"{free / GB:.1f} GB free on this node"
        fits = _fits(memory.per_trial, free, margin)
    else:
        nodes = cluster_memory() if nodes is None else nodes
        fits = sum(_fits(memory.per_trial, n, margin) for n in nodes)
        cap = max(1, fits)
        largest = max(nodes, default=0)
        where = (f"{len(nodes)} node(s) with {sum(nodes) / GB:.1f} GB of Ray memory (the largest "
                 f"{largest / GB:.1f} GB)")
    verdict = f"at most {cap} at a time" if fits else \
        f"not even one fits in {margin:.0%} of it: one at a time, and Ray may stop it for memory"
    return cap, f"memory     {peak}; {where}: {verdict}"


# --- a trial Ray's memory monitor killed ----------------------------------------------------------------------

# Ray's raylet (memory_monitor / node_manager) in every OutOfMemoryError and in the death cause of an actor it
# killed: "Memory on the node (IP: 10.0.0.1, ID: 9f1d...) was 22.91GB used / 23.54GB limit (0.973...)".
NODE_MEMORY = re.compile(r"Memory on the node \(IP: [^,]*, ID: [^)]*\) was ([\d.]+)\s*GB used / ([\d.]+)\s*GB limit")
OOM_WORDS = ("killed due to the node running low on memory", "killed due to memory pressure (OOM)")


def oom_reason(error: BaseException | str | None) -> str | None:
    """"out of memory (N GB used of M)" for an error of a task, actor or trial that Ray's memory monitor killed
    (a ``ray.exceptions.OutOfMemoryError``, or any error whose text carries Ray's account of it, as an actor's
    death cause and a Tune trial's error file do), with the node's memory at the kill; "out of memory" where the
    numbers are missing; None for any other error."""
    if error is None:
        return None
    texts, killed = _texts(error)
    text = "\n".join(texts)
    found = NODE_MEMORY.findall(text)
    if found:
        used, total = found[-1]
        return f"out of memory ({float(used):.1f} GB used of {float(total):.1f})"
    if killed or any(words in text for words in OOM_WORDS):
        return "out of memory"
    return None


def _texts(error: BaseException | str) -> tuple[list[str], bool]:
    """The text of ``error`` and of every error it wraps (its cause, context and Ray's ``cause``), and whether one
    of them is an OutOfMemoryError."""
    if isinstance(error, str):
        return [error], False
    try:
        from ray.exceptions import OutOfMemoryError
    except ImportError:  # pragma: no cover - ray is a dependency
        OutOfMemoryError = ()  # noqa: N806
    texts, killed, seen, todo = [], False, set(), [error]
    while todo:
        current = todo.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        killed = killed or isinstance(current, OutOfMemoryError)
        try:
            texts.append(str(current))
        except Exception:  # noqa: BLE001 - an exception whose str fails still counts by its type
            texts.append(type(current).__name__)
        todo += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    return texts, killed


if __name__ == "__main__":  # the measuring subprocess (measure_update): one JSON line on stdout
    print(json.dumps(_measure_here(json.loads(sys.argv[1]))), flush=True)
