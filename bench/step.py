"""One pretraining update of ASDA vs the same config with standard attention, interleaved in one process; and
the same update as `asda pretrain` runs it, measured by the trainer itself.

The update is the trainer's (``pipelines.update``): the benchmark builds it exactly as a pretraining run with the
default settings does (views, forward under the precision, backward, clip, fused AdamW, schedule, EMA).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from model import ASDA, ASDAConfig
from pipelines.cost import update_flops


def trainer_update(config: ASDAConfig, device: torch.device, *, precision: str | None = None,
                   compile: bool = False):
    """A fresh model of ``config`` on ``device`` and the update `asda pretrain` would run on it with its default
    settings, ``precision`` (default: the device's) and ``compile``."""
    from pipelines.pretrain import PretrainSettings
    from pipelines.update import build_update

    settings = PretrainSettings(data="-", precision=precision, compile=compile)
    return build_update(ASDA(config).to(device), settings, device)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, *, size: int | None = None, repeats: int = 10) -> float:
    """Measured dense matmul throughput of ``device`` in ``dtype``: the denominator of the MFU."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_step(config: ASDAConfig, *, batch_size: int = 8, repeats: int = 10, warmup: int = 3,
               device: str = "cpu", seed: int = 0, compile: bool = False, precision: str | None = None) -> dict:
    """Median seconds per update and clips/s of ``config`` and of its standard-attention twin.

    ``compile`` compiles each model as `asda pretrain --compile` does (FLOPs are counted through the eager
    forward, which computes the same function); ``precision``: "bf16" or "fp32" (default: the device's)."""
    from pipelines.update import default_precision

    dev = torch.device(device)
    precision = precision or default_precision(dev.type)
    torch.manual_seed(seed)
    variants = {"differential": config, "standard": dataclasses.replace(config, attention="standard")}
    runs = {name: (trainer_update(cfg, dev, precision=precision, compile=compile), [])
            for name, cfg in variants.items()}
    batch = torch.randn(batch_size, config.target_length, config.num_mel_bins, device=dev)
    flops = {}
    for name, (update, _) in runs.items():
        for _ in range(warmup):
            update(batch)
        flops[name] = update_flops(update, batch)
    for _ in range(repeats):  # interleaved so drift in machine load hits both alike
        for update, times in runs.values():
            _sync(dev)
            start = time.perf_counter()
            update(batch)
            _sync(dev)
            times.append(time.perf_counter() - start)
    peak_dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # what the update's matmuls run in
    peak = matmul_peak_tflops(dev, peak_dtype)
    results = []
    for name, (_, times) in runs.items():
        median = statistics.median(times)
        achieved = flops[name] / median / 1e12
        results.append({"name": name, "median_ms": median * 1000, "clips_per_s": batch_size / median,
                        "gflops_per_update": flops[name] / 1e9, "achieved_tflops": achieved,
                        "mfu": achieved / peak})
    return {"device": dev.type if dev.type == "cpu" else torch.cuda.get_device_name(dev),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "batch": batch_size,
            "num_students": config.num_students, "compiled": compile, "precision": precision,
            "config": config.to_dict(), "results": results,
            "matmul_peak_tflops": peak, "matmul_peak_dtype": str(peak_dtype).removeprefix("torch."),
            "differential_over_standard": results[0]["median_ms"] / results[1]["median_ms"],
            "flops_ratio": flops["differential"] / flops["standard"]}


def bench_trainer(config: ASDAConfig, *, batch_size: int = 8, steps: int = 40, log_every: int = 10,
                  device: str = "cpu", compile: bool = False, precision: str | None = None,
                  threads: int | None = None, data: str | None = None, in_process: bool | None = None,
                  workdir: str | None = None) -> dict:
    """`asda pretrain` of ``config`` for ``steps`` updates on a synthetic set, into a throw-away folder and
    MLflow store; returns the clips/s the trainer logged (its ``clips_per_s`` metric, one value per ``log_every``
    updates). The first window holds the start (compilation, the feed's first blocks) and is reported apart;
    ``clips_per_s`` is the median of the others.

    ``data``: a prepared folder to train on (default: a synthetic set prepared here, outside the timing, large
    enough that the run stays in its first epoch: the feed starts once, as in a run over a real data set, instead
    of once every few updates). ``threads``: torch threads of the worker (default: this process's, as
    ``bench_step`` uses). ``in_process``: train in this process (Ray Train's local mode, `asda pretrain
    --in-process`), as ``bench_step`` does, or in a Ray Train worker; default: in process on CPU, a worker on a
    GPU. Ray starts its workers at nice 15, so on a CPU machine shared with other work a worker gets a smaller
    share of the cores than this process and the two rates would not compare."""
    import tempfile
    from pathlib import Path

    from mlflow import MlflowClient

    from bench.sweep import throwaway_tracking
    from pipelines.data.prepare import prepare
    from pipelines.pretrain import PretrainSettings, pretrain
    from pipelines.runtime import ensure_ray
    from pipelines.update import default_precision

    if steps < 2 * log_every:
        raise ValueError(f"steps={steps} with log_every={log_every} is not allowed: the trainer's rate needs at "
                         f"least two windows of log_every updates (the first holds the start)")
    if in_process is None:
        in_process = device == "cpu"
    ensure_ray()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        folder = Path(tmp)
        if data is None:
            data = folder / "prepared"
            prepare("synthetic", folder / "raw", data,
                    options={"num_train": batch_size * (steps + 2), "num_valid": 0, "num_test": 0, "seed": 0})
        settings = PretrainSettings(
            data=str(data), steps=steps, batch_size=batch_size, log_every=log_every, checkpoint_every=steps,
            figure_clips=0, use_gpu=device == "cuda", compile=compile, precision=precision, max_failures=0,
            threads_per_worker=threads or torch.get_num_threads(), target_length=config.target_length,
            in_process=in_process, name="bench-trainer", storage=str(folder / "results"))
        with throwaway_tracking(folder):
            result = pretrain(config, settings)
            history = MlflowClient().get_metric_history(result["run_id"], "clips_per_s")
            loop_s = result["metrics"].get("train_loop_s")
    windows = [m.value for m in sorted(history, key=lambda m: m.step)]
    return {"steps": steps, "log_every": log_every, "batch": batch_size, "compiled": compile,
            "precision": settings.precision or default_precision(torch.device(device).type),
            "threads": settings.threads_per_worker, "in_process": in_process,
            "first_window_clips_per_s": windows[0], "windows_clips_per_s": windows,
            "clips_per_s": statistics.median(windows[1:]), "train_loop_s": loop_s}
