"""Short timings of the pieces of work a sweep's trials do (a pretraining update, a fine-tuning update, encoding
clips, the attention measurement, the probe's fit), in one process or in several at once.

A sweep on one machine runs several trials at a time, and on a shared or virtual machine two processes at once
may each get far less than a core: measured on the 2-vCPU machine of docs/benchmarks.md, one tiny-preset update
ran at 150 clips/s alone and at 63 clips/s in each of two processes started together (a pure-Python loop lost
half its speed the same way, so the machine gave two processes about one core's worth that moment). ``measure``
therefore times the jobs in as many processes as the sweep will run trials, all timing the same job together
(each process waits for the others before each job), and reports what a process got.

Used by ``sweeps.estimate``; ``asda sweep --estimate`` prints what it measured.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from dataclasses import dataclass

import torch

from model import ASDA, ASDAClassifier, ASDAConfig, ASDAEncoder

KINDS = ("pretrain", "finetune", "encode", "attention", "fit")


@dataclass(frozen=True)
class RateJob:
    """One piece of work to time: ``kind`` (KINDS) of ``config`` on ``batch`` clips of ``config.target_length``
    frames (``fit``: a probe's fit on ``batch`` clips' features of ``width`` floats into ``classes`` classes)."""

    kind: str
    config: ASDAConfig
    batch: int
    classes: int = 2
    readout: str = "cls+mean"  # encode: what the probe reads per clip; finetune: what the head reads
    width: int = 0  # fit: features per clip
    precision: str | None = None  # pretrain / finetune: "bf16" or "fp32"; None: the device's default
    compile: bool = False  # pretrain: torch.compile the model, as `asda pretrain --compile`

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is not allowed: expected one of {KINDS}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pretrain_step(job: RateJob, device: torch.device):
    from pipelines.pretrain import PretrainSettings
    from pipelines.update import build_update

    update = build_update(ASDA(job.config).to(device),
                          PretrainSettings(data="-", precision=job.precision, compile=job.compile), device)
    batch = torch.randn(job.batch, job.config.target_length, job.config.num_mel_bins, device=device)
    return lambda: update(batch)


def _finetune_step(job: RateJob, device: torch.device):
    """A fine-tuning update as ``pipelines.finetune.FinetuneJob.step`` runs it, less the augmentation (cheap next
    to the encoder): the forward under the device's autocast, the BCE loss, backward, AdamW and the schedule."""
    from pipelines.finetune import classification_loss, optimiser_step
    from pipelines.update import autocast, default_precision

    model = ASDAClassifier(job.config, job.classes, readout=job.readout).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda _: 1.0)
    x = torch.randn(job.batch, job.config.target_length, job.config.num_mel_bins, device=device)
    y = torch.zeros(job.batch, job.classes, device=device)
    y[:, 0] = 1.0
    precision = job.precision or default_precision(device.type)

    def step():
        with autocast(device, precision):
            logits = model(x)
        optimiser_step(classification_loss(logits, y, "bce", 0.0), params, optimiser, scheduler, 0.0)
    return step


def _inference_step(job: RateJob, device: torch.device):
    from pipelines.analysis import attention_summary
    from pipelines.inference import forward

    encoder = ASDAEncoder(job.config).to(device).eval()
    x = torch.randn(job.batch, job.config.target_length, job.config.num_mel_bins, device=device)

    @torch.no_grad()
    def step():
        return forward(encoder, x, job.readout) if job.kind == "encode" else attention_summary(encoder, x)
    return step


def _fit_step(job: RateJob, device: torch.device):
    """The probe's classifier fitted on random features: L-BFGS runs to its iteration cap on features that do
    not separate, so this is the slow end of a fit."""
    from pipelines.probe import fit_linear

    x = torch.randn(job.batch, job.width)
    y = torch.randint(0, job.classes, (job.batch,))
    return lambda: fit_linear(x, y, job.classes, multilabel=False, l2=1e-3, max_iter=300)


def time_job(job: RateJob, device: torch.device | str = "cpu", *, warmup: int = 2, repeats: int = 8,
             budget_s: float = 2.0) -> float:
    """Median seconds of one call of ``job`` after ``warmup`` calls: at least three timed calls, then more up to
    ``repeats`` while the timed calls have taken less than ``budget_s``."""
    device = torch.device(device)
    build = {"pretrain": _pretrain_step, "finetune": _finetune_step, "encode": _inference_step,
             "attention": _inference_step, "fit": _fit_step}[job.kind]
    torch.manual_seed(0)
    step = build(job, device)
    for _ in range(warmup):
        step()
    _sync(device)
    times: list[float] = []
    while len(times) < 3 or (len(times) < repeats and sum(times) < budget_s):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _time_all(jobs: list[RateJob], device: str, threads: int, before_each=None, **timing) -> list[float]:
    """Each job's seconds per call in this process at ``threads`` torch threads, calling ``before_each()`` (when
    given) before each job: the step that keeps the processes timing the same job at the same moment."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        found = []
        for job in jobs:
            if before_each is not None:
                before_each()
            found.append(time_job(job, device, **timing))
        return found
    finally:
        torch.set_num_threads(previous)


def serve() -> None:
    """A measuring process started by ``measure``: reads its request (pickled) on stdin, then for each job writes
    "ready" and waits for "go". Protocol lines and the final JSON go to the original stdout; anything the libraries
    print goes to stderr."""
    import json
    import os
    import pickle
    import sys

    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    request = pickle.load(sys.stdin.buffer)

    def wait_for_go():
        protocol.write("ready\n")
        if sys.stdin.buffer.readline() != b"go\n":
            raise SystemExit(1)

    seconds = _time_all(request["jobs"], request["device"], request["threads"], wait_for_go, **request["timing"])
    protocol.write(json.dumps({"seconds": seconds}) + "\n")


def _start(request: dict) -> subprocess.Popen:
    """A ``serve`` process, its request sent, its stderr kept in a temporary file (read if it fails)."""
    import os
    import pickle
    import sys
    import tempfile
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen([sys.executable, "-c", "from sweeps.rates import serve; serve()"], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=tempfile.TemporaryFile())
    pickle.dump(request, child.stdin)
    child.stdin.flush()
    return child


def _expect(child: subprocess.Popen, what: str) -> bytes:
    line = child.stdout.readline()
    if not line or (what and line != what.encode()):
        child.kill()
        child.wait()
        child.stderr.seek(0)
        tail = child.stderr.read().decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"a measuring process stopped (exit {child.returncode}): {' | '.join(tail)}")
    return line


def measure(jobs: list[RateJob], *, processes: int = 1, threads: int = 1, device: str = "cpu",
            **timing) -> dict:
    """Seconds per call of each job: the mean over ``processes`` processes timing it at once (this one is one of
    them). ``timing``: ``time_job``'s keywords."""
    import json

    if processes < 1:
        raise ValueError(f"processes={processes!r} is not allowed: expected >= 1")
    started = time.perf_counter()
    if processes == 1:
        seconds = _time_all(jobs, device, threads, **timing)
        return {"seconds": seconds, "processes": 1, "threads": threads, "wall_s": time.perf_counter() - started}
    request = {"jobs": jobs, "device": device, "threads": threads, "timing": timing}
    children = [_start(request) for _ in range(processes - 1)]

    def release():  # every process is ready for the next job: start it together
        for child in children:
            _expect(child, "ready\n")
        for child in children:
            child.stdin.write(b"go\n")
            child.stdin.flush()

    try:
        own = _time_all(jobs, device, threads, release, **timing)
        found = [json.loads(_expect(child, "")) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.wait()
    per_job = zip(own, *(f["seconds"] for f in found), strict=True)
    return {"seconds": [statistics.fmean(s) for s in per_job], "processes": processes, "threads": threads,
            "wall_s": time.perf_counter() - started}
