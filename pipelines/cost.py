"""What a pretraining update costs: its FLOPs (torch's counter), the encoder's parameters, and the peak memory of
a training loop. ``asda bench step`` and a sweep's per-cell cost read them from here."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from model import ASDAConfig, ASDAEncoder

_aten = torch.ops.aten


def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's counter knows the CUDA attention kernels but not the CPU flash kernel; count it with the same formulas.
CPU_ATTENTION_FLOPS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


def update_flops(update, batch: torch.Tensor) -> int:
    """Matmul/conv/attention FLOPs of one update (student and teacher forward, backward), by torch's counter.
    Counted through the eager forward (``model.forward``: the same function a compiled call runs), since
    compiled kernels bypass the counter."""
    eager = dataclasses.replace(update, forward=update.model.forward)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        eager(batch)
    return counter.get_total_flops()


def encoder_parameters(config: ASDAConfig) -> int:
    """The encoder's parameter count, built on the meta device (no memory, no time at any size)."""
    with torch.device("meta"):
        return sum(p.numel() for p in ASDAEncoder(config).parameters())


class PeakMemory:
    """The largest resident memory of this process seen at the samples (``sample``, once per update), and the
    GPU's peak allocation since the loop started; ``as_metrics`` in MB."""

    def __init__(self, device: torch.device | None = None):
        import psutil

        self.process, self.device, self.rss = psutil.Process(), device, 0
        if device is not None and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def sample(self) -> None:
        self.rss = max(self.rss, self.process.memory_info().rss)

    def as_metrics(self) -> dict[str, Any]:
        self.sample()
        out = {"peak_rss_mb": self.rss / 2**20}
        if self.device is not None and self.device.type == "cuda":
            out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return out
