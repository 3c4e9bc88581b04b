"""Where one pretraining update spends its operator calls: torch.profiler over the trainer's update, per stage.

The count is of operator calls made from Python (ATen ops with no ATen op above them; the autograd engine's
calls in the backward), less the ops that only make views or read metadata. On a GPU each is at least one kernel
launch, so this is the number the "many small kernels" of an update come down to; on CPU it is the dispatch
overhead per update. The stages are the ``record_function`` labels of ``pipelines.update.PretrainUpdate``, with
the teacher's part of the forward counted on its own.
"""

from __future__ import annotations

import collections
import functools
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

# Ops that move no data: views, aliases, metadata, allocation without a fill.
VIEW_OPS = frozenset({
    "aten::view", "aten::_reshape_alias", "aten::_unsafe_view", "aten::view_as", "aten::transpose",
    "aten::permute", "aten::t", "aten::expand", "aten::expand_as", "aten::as_strided", "aten::unsqueeze",
    "aten::squeeze", "aten::slice", "aten::select", "aten::narrow", "aten::split", "aten::split_with_sizes",
    "aten::chunk", "aten::unbind", "aten::unflatten", "aten::alias", "aten::detach", "aten::detach_",
    "aten::lift_fresh", "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resolve_conj",
    "aten::resolve_neg", "aten::result_type", "aten::is_nonzero", "aten::requires_grad_", "aten::set_",
    "aten::_has_compatible_shallow_copy_type", "aten::is_same_size",
})
# Ops that return their input when nothing needs converting or copying, and call a copying op when it does: they
# count only then.
ALIAS_UNLESS_COPYING = frozenset({"aten::to", "aten::contiguous", "aten::reshape", "aten::flatten", "aten::type_as"})
TEACHER = "asda.teacher_targets"  # the teacher's part of "asda.forward"


def _stage(event, labels: frozenset[str]) -> str:
    while event is not None:
        if event.name in labels:
            return event.name
        event = event.cpu_parent
    return "other"


def _top_level(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


def count_calls(events, labels: frozenset[str]) -> dict[str, collections.Counter]:
    """{stage: Counter(op name -> calls)} of the profiled ``events``' top-level, data-moving ATen ops."""
    stages: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in events:
        if not e.name.startswith("aten::") or e.name in VIEW_OPS or not _top_level(e):
            continue
        if e.name in ALIAS_UNLESS_COPYING and not any(c.name.startswith("aten::") and c.name not in VIEW_OPS
                                                      for c in e.cpu_children):
            continue
        stages[_stage(e, labels)][e.name] += 1
    return stages


def _labelled(label: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return wrapper


def profile_update(config, *, batch_size: int = 8, warmup: int = 2, repeats: int = 5, seed: int = 0,
                   top: int = 8) -> dict:
    """Operator calls per stage of one trainer update of ``config`` on CPU (eager, float32), and its time.

    Time: median wall and CPU (process) milliseconds of ``repeats`` updates after ``warmup``, unprofiled; CPU time
    is the steadier of the two on a shared machine."""
    from bench.step import trainer_update

    torch.manual_seed(seed)
    update = trainer_update(config, torch.device("cpu"), precision="fp32")
    model = update.model
    # The teacher's share of the forward, under its own label (an instance attribute shadows the method).
    model.teacher_targets = _labelled(TEACHER, model.teacher_targets)
    batch = torch.randn(batch_size, config.target_length, config.num_mel_bins)
    for _ in range(warmup):
        update(batch)
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        update(batch)
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        update(batch)
    labels = frozenset({TEACHER, *update.STAGES})
    stages = count_calls(prof.events(), labels)
    order = [update.STAGES[0], TEACHER, *update.STAGES[1:], "other"]
    rows = [{"stage": s.removeprefix("asda."), "calls": sum(stages[s].values()),
             "top": stages[s].most_common(top)} for s in order if s in stages]
    return {"config": config.to_dict(), "batch": batch_size, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "stages": rows, "total_calls": sum(r["calls"] for r in rows),
            "median_ms": statistics.median(wall) * 1000, "median_cpu_ms": statistics.median(cpu) * 1000}
