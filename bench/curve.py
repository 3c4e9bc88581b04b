"""Does a preset learn? Probe accuracy against pretraining updates, for the tiny preset as it was and as it is.

The update is the trainer's (``pipelines.update.build_update`` with the run's settings: fused AdamW with the
weight-decay groups, warm-up + cosine, grad-norm clip, one teacher EMA step); batches are drawn from the prepared
train split in this process, seeded, one torch thread, so the numbers depend on the recipe and not on Ray Data or the machine's cores. Every
``every`` updates the student's utterance vectors are probed as `asda probe` does (logistic regression, test
split). ``speechcommands_layout`` writes the synthetic classes as 1 s clips in Speech Commands' layout, so the
curve can be drawn on the speechcommands adapter's 128-frame input too.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

CLIP_SECONDS_SPC = 1.0


def presets() -> dict[str, tuple[Any, dict[str, float]]]:
    """(model config, schedule) of the tiny preset before and after it was sized to short runs ("old", "new": both
    with alpha 0.5 under per-element means, as they were measured), the width-aware init, and the preset as it is
    now ("preset": alpha 0 and a slower teacher, ``ASDAConfig.tiny``)."""
    from model import ASDAConfig

    measured = dict(loss_reduction="mean", alpha=0.5)
    old = ASDAConfig.tiny(init_std=0.02, ema_decay_start=0.99, ema_decay_end=0.999, ema_anneal_fraction=None,
                          ema_anneal_steps=1000, **measured)
    new = ASDAConfig.tiny(ema_decay_start=0.9, ema_decay_end=0.99, **measured)
    wide_init = ASDAConfig.tiny(ema_decay_start=0.9, ema_decay_end=0.99, init_std=None, **measured)
    schedule = {"warmup": 0.1, "min_lr_ratio": 0.1}
    return {"old": (old, {"warmup": 0.1, "min_lr_ratio": 0.0}), "new": (new, schedule),
            "width-aware": (wide_init, schedule), "preset": (ASDAConfig.tiny(), schedule)}


def _probe(encoder, train: dict, test: dict, num_classes: int) -> float:
    import torch

    from pipelines.metrics import evaluate
    from pipelines.probe import encoder_features, fit_linear

    x_train, x_test = encoder_features(encoder, train["fbank"]), encoder_features(encoder, test["fbank"])
    classifier = fit_linear(x_train, torch.as_tensor(train["label"]), num_classes, multilabel=False, l2=1e-3,
                            max_iter=300)
    with torch.no_grad():
        return evaluate(classifier(x_test), test["label"], num_classes, False)["eval_accuracy"]


def curve(config, schedule: dict[str, float], data: str | Path, *, steps: int, every: int, seed: int = 0,
          batch_size: int = 8, lr: float = 5e-4) -> list[tuple[int, float]]:
    """[(updates, probe accuracy)] for one pretraining run of ``steps`` updates."""
    import torch

    from model import ASDA
    from pipelines.data.card import feed_length, load_card
    from pipelines.data.feed import read_clips
    from pipelines.pretrain import PretrainSettings
    from pipelines.update import build_update

    card = load_card(data)
    length = feed_length(card, None, data)
    config = dataclasses.replace(config, target_length=length).for_run(steps)
    train = read_clips(data, "train", target_length=length, labels="index")
    test = read_clips(data, "test", target_length=length, labels="index")
    num_classes = len(card["class_names"])
    torch.manual_seed(seed)
    model = ASDA(config)
    settings = PretrainSettings(data=str(data), steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                warmup_steps=max(1, int(schedule["warmup"] * steps)),
                                min_lr_ratio=schedule["min_lr_ratio"])
    update = build_update(model, settings, torch.device("cpu"))
    rng = np.random.default_rng(seed)
    points = [(0, _probe(model.student, train, test, num_classes))]
    for step in range(1, steps + 1):
        model.train()
        batch = torch.as_tensor(train["fbank"][rng.choice(len(train["fbank"]), batch_size, replace=False)])
        update(batch)
        if step % every == 0 or step == steps:
            points.append((step, _probe(model.student, train, test, num_classes)))
    return points


def speechcommands_layout(root: str | Path, per_class: int = 60, seed: int = 0) -> Path:
    """The synthetic classes as 1 s, 16 kHz clips in Speech Commands' layout (a folder per keyword, the
    validation and testing lists): a fifth of each class is test, none valid."""
    import soundfile as sf

    from pipelines.data.synthetic import CLASS_NAMES, generate_clip

    root = Path(root)
    testing = []
    for k, name in enumerate(CLASS_NAMES):
        for i in range(per_class):
            wav, _ = generate_clip(k, np.random.default_rng([seed, k, i]), clip_seconds=CLIP_SECONDS_SPC)
            path = root / name / f"{k:02d}{i:06x}_nohash_0.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, wav, 16_000, subtype="PCM_16")
            if i % 5 == 0:
                testing.append(f"{name}/{path.name}")
    (root / "testing_list.txt").write_text("\n".join(testing) + "\n")
    (root / "validation_list.txt").write_text("")
    return root


def bench_curve(data: str | Path, *, steps: int = 200, every: int = 50, seeds: tuple[int, ...] = (0,),
                names: tuple[str, ...] = ("old", "new")) -> dict[str, Any]:
    """Probe curves of the named presets on a prepared folder, one run per seed, on one torch thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        found = presets()
        out: dict[str, Any] = {"data": str(data), "steps": steps, "curves": {}}
        for name in names:
            config, schedule = found[name]
            started = time.perf_counter()
            runs = [curve(config, schedule, data, steps=steps, every=every, seed=s) for s in seeds]
            out["curves"][name] = {"updates": [u for u, _ in runs[0]],
                                   "accuracy": [[a for _, a in run] for run in runs],
                                   "seconds": time.perf_counter() - started}
        return out
    finally:
        torch.set_num_threads(threads)
