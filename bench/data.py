"""Data throughput: `asda prepare` on Ray Data against bare torchaudio fbank on the same clips, and the feed."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np


def _bare_fbank_rate(paths: list[str]) -> float:
    """Clips/s of decode + log-mel in one process, one thread: the cost floor per core."""
    import soundfile as sf
    import torch

    from model.features import log_mel

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        for path in paths:
            data, rate = sf.read(path, dtype="float32", always_2d=True)
            log_mel(torch.from_numpy(np.ascontiguousarray(data.T)), rate)
        return len(paths) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def bench_data(*, clips: int = 320, batch_size: int = 32, epochs: int = 2, workdir: str | None = None) -> dict:
    """Prepare ``clips`` synthetic clips end to end, time bare fbank on the same files, then read the prepared
    train split through the feed ``epochs`` times."""
    from pipelines.data.adapters import build_index
    from pipelines.data.card import load_card
    from pipelines.data.feed import feed_dataset, iter_torch
    from pipelines.data.prepare import prepare
    from pipelines.runtime import ensure_ray

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp)
        options = {"num_train": clips, "num_valid": 0, "num_test": 0, "seed": 0}
        index = build_index("synthetic", root / "raw", **options)  # generate the audio outside the timing
        paths = [c.path for c in index.clips]
        ray = ensure_ray()
        start = time.perf_counter()
        prepare("synthetic", root / "raw", root / "prepared", options=options)
        prepare_s = time.perf_counter() - start
        bare = _bare_fbank_rate(paths)
        card = load_card(root / "prepared")
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
    return {
        "cores": cores, "ray_logical_cpus": logical, "clips": clips, "clip_seconds": 2.56,
        "prepare": {"seconds": prepare_s, "clips_per_s": prepare_rate, "clips_per_s_per_core": prepare_rate / cores,
                    "includes": "Ray Data job start, decode, resample, fbank, Parquet write, card"},
        "bare_torchaudio": {"clips_per_s_per_core": bare},
        "prepare_per_core_over_bare": prepare_rate / cores / bare,
        "feed": {"batch_size": batch_size, "epochs": epochs, "batches": batches, "seconds": feed_s,
                 "batches_per_s": batches / feed_s, "mb_per_s": nbytes / feed_s / 2**20,
                 "target_length": card["target_length"]},
    }
