"""Data throughput: `asda prepare` on Ray Data against bare torchaudio fbank on the same clips, where the time
goes (per stage, in one process and inside the Ray tasks), and the feed."""

from __future__ import annotations

import cProfile
import os
import pstats
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def tree_cpu_seconds(root: int | None = None) -> tuple[float, set[str]] | None:
    """CPU seconds (user + system) spent so far by ``root`` (default: this process) and every process descending
    from it, reaped ones included, and the names of the live ones; None without /proc. A local Ray instance's
    processes (GCS, raylet, workers) descend from the driver that started it."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    root = root or os.getpid()
    ticks = os.sysconf("SC_CLK_TCK")
    parent, spent, names = {}, {}, {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            head, tail = text.rsplit(")", 1)
            fields = tail.split()  # fields[0] is the state (field 3 of proc(5))
            pid = int(entry.name)
            parent[pid], names[pid] = int(fields[1]), head.split("(", 1)[1]
            spent[pid] = sum(int(x) for x in fields[11:15]) / ticks  # utime, stime, cutime, cstime
    tree, frontier = {root}, [root]
    children: dict[int, list[int]] = defaultdict(list)
    for pid, ppid in parent.items():
        children[ppid].append(pid)
    while frontier:
        for child in children[frontier.pop()]:
            if child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(spent.get(p, 0.0) for p in tree), {names[p] for p in tree if p in names}


def _bare_fbank_rate(paths: list[str]) -> tuple[float, float]:
    """(clips/s, clips per CPU-second) of decode + log-mel in one process, one thread: the cost floor per core.
    Per CPU-second does not depend on what else the machine runs."""
    import soundfile as sf
    import torch

    from model.features import log_mel

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        log_mel(torch.zeros(1, 16000), 16000)  # imports and first-call set-up outside the timing
        start, cpu = time.perf_counter(), time.process_time()
        for path in paths:
            data, rate = sf.read(path, dtype="float32", always_2d=True)
            log_mel(torch.from_numpy(np.ascontiguousarray(data.T)), rate)
        return len(paths) / (time.perf_counter() - start), len(paths) / (time.process_time() - cpu)
    finally:
        torch.set_num_threads(threads)


def profile_stages(paths: list[str], *, top: int = 12) -> dict:
    """The prepare task's work on ``paths`` in this process, one thread: seconds per clip of each stage (decode,
    resample, fbank, float16 conversion with the card's sums, Parquet encode with its hash), and cProfile's
    functions with the most time of their own."""
    import io

    import pyarrow as pa
    import torch

    from pipelines.data.prepare import _schema, clip_features, stored_features, write_shard

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    timings: dict[str, float] = defaultdict(float)
    profiler = cProfile.Profile()
    try:
        clip_features(paths[0])  # imports and first-call set-up outside the timing
        profiler.enable()
        columns: dict[str, list] = {name: [] for name in _schema().names}
        for path in paths:
            feats, rate, seconds = clip_features(path, timings)
            start = time.perf_counter()
            fbank, frames, total, total_sq = stored_features(feats)
            timings["float16"] += time.perf_counter() - start
            row = dict(id=path, path=path, split="train", fold=0, labels=[0], event_start=0.0, event_end=0.0,
                       frames=frames, fbank=fbank, sample_rate=rate, duration=seconds, fbank_sum=total,
                       fbank_sumsq=total_sq)
            for key, value in row.items():
                columns[key].append(value)
        start = time.perf_counter()
        import pyarrow.fs as pafs

        with tempfile.TemporaryDirectory() as tmp:
            write_shard(pa.table(columns, schema=_schema()), pafs.LocalFileSystem(), f"{tmp}/shard.parquet")
        timings["parquet"] += time.perf_counter() - start
        profiler.disable()
    finally:
        torch.set_num_threads(threads)
    total = sum(timings.values())
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    own = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]  # (file, line, name) -> tottime
    profiled = sum(v[2] for v in stats.stats.values()) or 1.0
    return {
        "clips": len(paths),
        "ms_per_clip": {k: round(1000 * v / len(paths), 3) for k, v in timings.items()},
        "share": {k: round(v / total, 3) for k, v in timings.items()},
        "clips_per_s": len(paths) / total,
        "top_functions": [{"function": f"{Path(f).name}:{line}({name})", "share": round(v[2] / profiled, 3)}
                          for (f, line, name), v in own],
    }


def bench_data(*, clips: int = 320, batch_size: int = 32, epochs: int = 2, sample_rate: int = 16_000,
               profile: bool = False, workdir: str | None = None) -> dict:
    """Prepare ``clips`` synthetic clips (at ``sample_rate``) end to end, time bare fbank on the same files, then
    read the prepared train split through the feed ``epochs`` times. ``profile`` adds the stage profile."""
    from pipelines.data.adapters import build_index
    from pipelines.data.card import load_card
    from pipelines.data.feed import feed_dataset, iter_torch
    from pipelines.data.prepare import prepare
    from pipelines.runtime import ensure_ray

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp)
        options = {"num_train": clips, "num_valid": 0, "num_test": 0, "seed": 0, "sample_rate": sample_rate}
        index = build_index("synthetic", root / "raw", **options)  # generate the audio outside the timing
        paths = [c.path for c in index.clips]
        ray = ensure_ray()
        before = tree_cpu_seconds()
        start = time.perf_counter()
        prepare("synthetic", root / "raw", root / "prepared", options=options)
        prepare_s = time.perf_counter() - start
        after = tree_cpu_seconds()
        # CPU-seconds only where this process started the Ray instance, so that its workers are counted.
        prepare_cpu = after[0] - before[0] if after and "raylet" in after[1] else None
        bare, bare_cpu = _bare_fbank_rate(paths)
        card = load_card(root / "prepared")
        stages = profile_stages(paths[: min(len(paths), 200)]) if profile else None
        ds = feed_dataset(root / "prepared", "train", labels="index", random_crop=True)
        batches, nbytes = 0, 0
        start = time.perf_counter()
        for epoch in range(epochs):
            for batch in iter_torch(ds, batch_size, seed=epoch):
                batches += 1
                nbytes += batch["fbank"].numel() * batch["fbank"].element_size()
        feed_s = time.perf_counter() - start
        logical = ray.cluster_resources().get("CPU", cores)
    prepare_rate = clips / prepare_s
    made = card["throughput"]
    task_s = sum(n["task_seconds"] for n in made["nodes"])
    stage_s = sum(made["stage_seconds"].values())
    report = {
        "cores": cores, "ray_logical_cpus": logical, "clips": clips, "clip_seconds": 2.56,
        "sample_rate": sample_rate, "shards": len(card["shards"]),
        "prepare": {"seconds": prepare_s, "clips_per_s": prepare_rate, "clips_per_s_per_core": prepare_rate / cores,
                    "includes": "Ray Data job start, decode, resample, fbank, Parquet write, card"},
        "bare_torchaudio": {"clips_per_s_per_core": bare, "clips_per_cpu_s": bare_cpu},
        "prepare_per_core_over_bare": prepare_rate / cores / bare,
        # The same ratio in CPU time, which other load on the machine does not change: every CPU-second the
        # local Ray instance (driver, GCS, raylet, workers) spent on the prepare against the bare loop's.
        "prepare_cpu_s": prepare_cpu,
        "prepare_per_cpu_s_over_bare": clips / prepare_cpu / bare_cpu if prepare_cpu else None,
        # Where a prepare run's core-seconds went: the stages inside the shard tasks, the rest of the tasks
        # (Ray worker start, imports), and what no task covered (job start, planning, the card).
        "in_ray": {"stage_seconds": made["stage_seconds"], "task_seconds": task_s,
                   "task_cpu_seconds": sum(n["task_cpu_seconds"] for n in made["nodes"]),
                   "task_seconds_outside_stages": task_s - stage_s,
                   "core_seconds_outside_tasks": prepare_s * cores - task_s, "nodes": made["nodes"]},
        "feed": {"batch_size": batch_size, "epochs": epochs, "batches": batches, "seconds": feed_s,
                 "batches_per_s": batches / feed_s, "mb_per_s": nbytes / feed_s / 2**20,
                 "target_length": card["target_length"]},
    }
    if stages is not None:
        report["profile"] = stages
    return report
