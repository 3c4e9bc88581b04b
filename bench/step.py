"""One pretraining update of ASDA vs the same config with standard attention, interleaved in one process."""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from model import ASDA, ASDAConfig, param_groups_weight_decay


def _update(model: ASDA, optimiser: torch.optim.Optimizer, batch: torch.Tensor, device: torch.device) -> None:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model(batch)["loss"]
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    model.update_teacher()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_step(config: ASDAConfig, *, batch_size: int = 8, repeats: int = 10, warmup: int = 3,
               device: str = "cpu", seed: int = 0) -> dict:
    """Median seconds per update and clips/s of ``config`` and of its standard-attention twin."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    variants = {"differential": config, "standard": dataclasses.replace(config, attention="standard")}
    runs = {}
    for name, cfg in variants.items():
        model = ASDA(cfg).to(dev).train()
        opt = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
        runs[name] = (model, opt, [])
    batch = torch.randn(batch_size, config.target_length, config.num_mel_bins, device=dev)
    for model, opt, _ in runs.values():
        for _ in range(warmup):
            _update(model, opt, batch, dev)
    for _ in range(repeats):  # interleaved so drift in machine load hits both alike
        for model, opt, times in runs.values():
            _sync(dev)
            start = time.perf_counter()
            _update(model, opt, batch, dev)
            _sync(dev)
            times.append(time.perf_counter() - start)
    results = []
    for name, (_, _, times) in runs.items():
        median = statistics.median(times)
        results.append({"name": name, "median_ms": median * 1000, "clips_per_s": batch_size / median})
    ratio = results[0]["median_ms"] / results[1]["median_ms"]
    return {"device": str(dev), "threads": torch.get_num_threads(), "batch": batch_size,
            "num_students": config.num_students, "config": config.to_dict(), "results": results,
            "differential_over_standard": ratio}
