"""One pretraining update of ASDA vs the same config with standard attention, interleaved in one process."""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from model import ASDA, ASDAConfig, param_groups_weight_decay

_aten = torch.ops.aten


def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's counter knows the CUDA attention kernels but not the CPU flash kernel; count it with the same formulas.
_CPU_ATTENTION_FLOPS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


def update_flops(model: ASDA, optimiser: torch.optim.Optimizer, batch: torch.Tensor, device: torch.device) -> int:
    """Matmul/conv/attention FLOPs of one update (student and teacher forward, backward), by torch's counter."""
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS) as counter:
        _update(model, optimiser, batch, device)
    return counter.get_total_flops()


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


def _update(model: ASDA, optimiser: torch.optim.Optimizer, batch: torch.Tensor, device: torch.device,
            forward=None) -> None:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = (model if forward is None else forward)(batch)["loss"]
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    model.update_teacher()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_step(config: ASDAConfig, *, batch_size: int = 8, repeats: int = 10, warmup: int = 3,
               device: str = "cpu", seed: int = 0, compile: bool = False) -> dict:
    """Median seconds per update and clips/s of ``config`` and of its standard-attention twin.

    ``compile`` times the forward through ``torch.compile`` (FLOPs are still counted on the eager model, which
    computes the same function)."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    variants = {"differential": config, "standard": dataclasses.replace(config, attention="standard")}
    runs = {}
    for name, cfg in variants.items():
        model = ASDA(cfg).to(dev).train()
        opt = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
        runs[name] = (model, opt, [], torch.compile(model) if compile else model)
    batch = torch.randn(batch_size, config.target_length, config.num_mel_bins, device=dev)
    flops = {}
    for name, (model, opt, _, forward) in runs.items():
        for _ in range(warmup):
            _update(model, opt, batch, dev, forward)
        flops[name] = update_flops(model, opt, batch, dev)
    for _ in range(repeats):  # interleaved so drift in machine load hits both alike
        for model, opt, times, forward in runs.values():
            _sync(dev)
            start = time.perf_counter()
            _update(model, opt, batch, dev, forward)
            _sync(dev)
            times.append(time.perf_counter() - start)
    peak_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32  # what the update's matmuls run in
    peak = matmul_peak_tflops(dev, peak_dtype)
    results = []
    for name, (_, _, times, _) in runs.items():
        median = statistics.median(times)
        achieved = flops[name] / median / 1e12
        results.append({"name": name, "median_ms": median * 1000, "clips_per_s": batch_size / median,
                        "gflops_per_update": flops[name] / 1e9, "achieved_tflops": achieved,
                        "mfu": achieved / peak})
    return {"device": dev.type if dev.type == "cpu" else torch.cuda.get_device_name(dev),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "batch": batch_size,
            "num_students": config.num_students, "compiled": compile, "config": config.to_dict(), "results": results,
            "matmul_peak_tflops": peak, "matmul_peak_dtype": str(peak_dtype).removeprefix("torch."),
            "differential_over_standard": results[0]["median_ms"] / results[1]["median_ms"],
            "flops_ratio": flops["differential"] / flops["standard"]}
