"""One pretraining update, the same for `asda pretrain`, `asda bench step` and `asda bench curve`.

    update = build_update(model, settings, device)   # settings: a PretrainSettings
    out, grad_norm = update(fbank)   # views drawn, forward (autocast), backward, clip, AdamW, schedule, EMA

Pure PyTorch: no Ray, no MLflow. The trainer hands ``forward`` its DistributedDataParallel wrapper; the benchmarks
call the model itself. Whatever calls the forward, the weights, the optimiser and the EMA live on ``model``, the
plain module, so checkpoints never carry a wrapper's prefix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch.profiler import record_function

from model import ASDA, param_groups_weight_decay

PRECISIONS = ("bf16", "fp32")
# AdamW's fused kernel (one kernel per step for all parameters): CUDA, and CPU too in torch 2.11, where it ran
# 3-6x faster than the default per-parameter loop on the tiny and a mid-size model and agreed with it to 1.5e-8
# after 18 steps. Elsewhere AdamW keeps torch's default implementation.
FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def check_precision(precision: str | None) -> None:
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not allowed: expected one of {PRECISIONS} (or None: bf16 on "
                         f"a GPU, fp32 on CPU)")


def default_precision(device_type: str) -> str:
    """bf16 autocast on a GPU, plain float32 on CPU (where bf16 matmuls are slow on most processors)."""
    return "bf16" if device_type == "cuda" else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16: the forward under ``torch.autocast`` (weights, optimiser state and EMA stay float32); fp32: as is."""
    check_precision(precision)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def build_optimiser(model: torch.nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
                    device: torch.device) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases and 1-D parameters, fused where the device has the kernel."""
    fused = {"fused": True} if device.type in FUSED_ADAMW_DEVICES else {}
    return torch.optim.AdamW(param_groups_weight_decay(model, weight_decay), lr=lr, betas=betas, **fused)


def compile_model(model: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """Compile ``model``'s calls in place (``nn.Module.compile``), before any DistributedDataParallel wrap, as the
    PyTorch guide on where to apply torch.compile recommends for DDP: DDP's own hooks stay eager, and inside its
    forward Dynamo splits the graph at DDP's bucket boundaries so that gradient all-reduce overlaps the backward.
    In place, the module keeps its parameter names: its state dict has no ``_orig_mod.`` prefix, so compiled and
    eager runs read each other's checkpoints. Only ``model(...)`` is compiled; its methods (``draw_views``,
    ``update_teacher``, ``forward`` called by name) stay eager. ``backend``: torch.compile's (tests trace with
    "aot_eager", which generates no code)."""
    model.compile(backend=backend)
    return model


def build_scheduler(optimiser: torch.optim.Optimizer, *, warmup_steps: int, steps: int,
                    min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine to ``lr * min_lr_ratio`` at ``steps`` (``worker.warmup_cosine``)."""
    from .worker import warmup_cosine

    return torch.optim.lr_scheduler.LambdaLR(optimiser, warmup_cosine(warmup_steps, steps, min_lr_ratio))


@dataclass
class PretrainUpdate:
    """One optimiser update of ASDA: draw the students' views (eager, so a compiled forward draws nothing),
    forward under ``precision``, backward, clip the gradient norm, AdamW step, learning-rate schedule, one
    teacher EMA step. A non-finite gradient norm skips the step, the schedule and the EMA (the caller decides
    whether to stop). Each stage runs under a ``record_function`` label (``STAGES``), so a profile of training
    reads by stage (``bench/profile.py``)."""

    STAGES: ClassVar[tuple[str, ...]] = ("asda.draw_views", "asda.forward", "asda.backward", "asda.clip",
                                         "asda.optimiser", "asda.ema")

    model: ASDA
    optimiser: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    device: torch.device
    precision: str = "fp32"
    grad_clip: float = 4.0
    forward: Callable[..., dict[str, torch.Tensor]] | None = None  # default: the model; the trainer: its DDP wrap
    params: list[torch.nn.Parameter] = field(init=False)

    def __post_init__(self) -> None:
        check_precision(self.precision)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if self.forward is None:
            self.forward = self.model

    def __call__(self, fbank: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """fbank (B, T, F) on ``device`` -> (the forward's losses, the gradient norm before clipping)."""
        draw, forward, backward, clip, step, ema = self.STAGES
        with record_function(draw):
            views = self.model.draw_views(fbank)
        with record_function(forward), autocast(self.device, self.precision):
            out = self.forward(fbank, views)
        with record_function(backward):
            self.optimiser.zero_grad(set_to_none=True)
            out["loss"].backward()
        with record_function(clip):
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        if torch.isfinite(grad_norm):
            with record_function(step):
                self.optimiser.step()
                if self.scheduler is not None:
                    self.scheduler.step()
            with record_function(ema):
                self.model.update_teacher()
        return out, grad_norm


def build_update(model: ASDA, settings: Any, device: torch.device) -> PretrainUpdate:
    """The update `asda pretrain` runs for ``settings`` (a ``PretrainSettings``): AdamW (``build_optimiser``) at
    its lr, weight decay and betas, its warm-up + cosine schedule, its gradient clip and precision, and the model
    compiled in place when ``settings.compile``. The model is put in training mode (its teacher stays in eval).
    A trainer with several ranks sets ``forward`` to its DDP wrapper afterwards."""
    s = settings
    model.train()
    optimiser = build_optimiser(model, lr=s.lr, weight_decay=s.weight_decay, betas=(s.beta1, s.beta2), device=device)
    scheduler = build_scheduler(optimiser, warmup_steps=s.warmup_steps, steps=s.steps, min_lr_ratio=s.min_lr_ratio)
    if s.compile:
        compile_model(model)
    return PretrainUpdate(model, optimiser, scheduler, device, precision=s.precision or default_precision(device.type),
                          grad_clip=s.grad_clip)
