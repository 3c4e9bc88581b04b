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
    """What a training loop needs in memory. On a GPU the peak allocation since the loop started
    (``peak_gpu_mb``). On a CPU the growth of this process's resident memory over the loop (``loop_rss_mb``: its
    largest resident size at the samples, ``sample`` once per update, less the size when the loop started, after
    handing freed heap back to the system, so that what an earlier trial of a reused process left behind does not
    count), and that largest size itself (``peak_rss_mb``)."""

    def __init__(self, device: torch.device | None = None):
        self.device = device
        if device is not None and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _release_free_heap()
        self.start = self.rss = resident_bytes()

    def sample(self) -> None:
        self.rss = max(self.rss, resident_bytes())

    def as_metrics(self) -> dict[str, Any]:
        self.sample()
        out = {"peak_rss_mb": self.rss / 2**20, "loop_rss_mb": (self.rss - self.start) / 2**20}
        if self.device is not None and self.device.type == "cuda":
            out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return out


def resident_bytes() -> int:
    """This process's resident memory now: /proc/self/statm on Linux, else psutil's."""
    import os

    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import psutil

        return psutil.Process().memory_info().rss


def _release_free_heap() -> None:
    """glibc's malloc_trim(0): freed heap goes back to the system (elsewhere: nothing)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
