"""Fine-tuning recipes by data set: the released code's settings (MyParadise21/ASDA, config/finetuning.yaml and the
finetuning_*.sh scripts), taken by default for the data set a run fine-tunes on.

A recipe names values for the fields of ``FinetuneSettings`` that it governs (``GOVERNED``); a field the caller sets
(a command-line flag, a grid's ``evaluation.settings``) keeps the caller's value. Updates and warm-up are the
release's for its own runs; a run of another length (``--steps``) keeps the recipe's warm-up share. Every recipe
shares the release's optimiser (AdamW β (0.9, 0.95), weight decay 0.05, layer decay 0.65, drop path 0.1), its
cosine schedule to an absolute 1e-6, mixup with probability 0.9, roll + gain, and no gradient clipping (fairseq's
``clip_norm`` default, 0). ``none`` is the project's generic recipe for data sets the release never fine-tuned on.
"""

from __future__ import annotations

from typing import Any

# What a recipe sets; None in FinetuneSettings means "the recipe's value".
GOVERNED = ("lr", "batch_size", "steps", "warmup_steps", "min_lr", "grad_clip", "mixup", "specaug_time",
            "specaug_freq", "label_smoothing", "loss", "noise", "split")

_RELEASE_COMMON: dict[str, Any] = dict(min_lr=1e-6, grad_clip=0.0, label_smoothing=0.0, noise=False)

RECIPES: dict[str, dict[str, Any]] = {
    # finetuning_AS20K.sh: 1 GPU x 32, lr 5e-5, 60 k / 6 k updates, mixup 0.8, mask ratio 0.2, BCE
    "as20k": {**_RELEASE_COMMON, "lr": 5e-5, "batch_size": 32, "steps": 60_000, "warmup_steps": 6_000,
              "mixup": 0.8, "specaug_time": 0.2, "specaug_freq": 0.2, "loss": "bce", "split": "train"},
    # finetuning_AS2M.sh: 1 GPU x 48, 600 k / 60 k, the unbalanced split drawn class-balanced (AS2M_finetune)
    "as2m": {**_RELEASE_COMMON, "lr": 5e-5, "batch_size": 48, "steps": 600_000, "warmup_steps": 60_000,
             "mixup": 0.8, "specaug_time": 0.2, "specaug_freq": 0.2, "loss": "bce", "split": "unbalanced"},
    # finetuning_ESC50.sh: 1 GPU x 48, 4 k / 400, no mixup, mask ratio 0.4, cross-entropy with smoothing 0.1
    "esc50": {**_RELEASE_COMMON, "lr": 5e-5, "batch_size": 48, "steps": 4_000, "warmup_steps": 400,
              "mixup": 0.0, "specaug_time": 0.4, "specaug_freq": 0.4, "label_smoothing": 0.1, "loss": "ce",
              "split": "train"},
    # finetuning_SPC2.sh: 1 GPU x 256, lr 2e-4, 80 k / 8 k, mixup 0.8 (its smoothing 0.1 is ignored under mixup),
    # BCE per clip, and task.noise: fbank noise and a ±10-frame roll
    "spc2": {**_RELEASE_COMMON, "lr": 2e-4, "batch_size": 256, "steps": 80_000, "warmup_steps": 8_000,
             "mixup": 0.8, "specaug_time": 0.2, "specaug_freq": 0.2, "label_smoothing": 0.1, "loss": "bce_clip",
             "noise": True, "split": "train"},
    # The project's settings for any other data set (synthetic, folder, manifest): short CPU runs.
    "none": {"lr": 2e-4, "batch_size": 16, "steps": 200, "warmup_steps": 20, "min_lr": None, "grad_clip": 0.0,
             "mixup": 0.0, "specaug_time": 0.2, "specaug_freq": 0.2, "label_smoothing": 0.1, "loss": None,
             "noise": False, "split": "train"},
}
RECIPE_CHOICES = ("auto", *RECIPES)
NONE_MIN_LR_RATIO = 0.005  # recipe none: the cosine ends at this share of the peak lr


def recipe_for(card: dict, split: str | None) -> str:
    """The release's recipe for the data set of ``card`` (AudioSet: AS-2M when fine-tuning on its unbalanced split,
    else AS-20K), or "none" for a data set the release did not fine-tune on."""
    name = card.get("name")
    if name == "audioset":
        return "as2m" if split == "unbalanced" else "as20k"
    return {"esc50": "esc50", "speechcommands": "spc2"}.get(name, "none")


def check_recipe(name: str) -> None:
    if name not in RECIPE_CHOICES:
        raise ValueError(f"recipe={name!r} is not allowed: expected one of {list(RECIPE_CHOICES)}")


def resolve(settings: Any, card: dict) -> tuple[Any, str, dict[str, Any]]:
    """(``settings`` with every field it left to the recipe filled in, the recipe's name, the values the recipe
    gave). ``settings`` is a FinetuneSettings; ``settings.recipe`` "auto" takes the card's data set's."""
    import dataclasses

    check_recipe(settings.recipe)
    name = recipe_for(card, settings.split) if settings.recipe == "auto" else settings.recipe
    recipe = RECIPES[name]
    given = {f: getattr(settings, f) for f in GOVERNED}
    taken = {f: recipe[f] for f, value in given.items() if value is None}
    if given["steps"] is not None and given["warmup_steps"] is None:  # the release's warm-up share of this run
        taken["warmup_steps"] = round(given["steps"] * recipe["warmup_steps"] / recipe["steps"])
    values = {**given, **taken}
    lr, min_lr = values["lr"], values["min_lr"]
    ratio = settings.min_lr_ratio if settings.min_lr_ratio is not None else (
        NONE_MIN_LR_RATIO if min_lr is None else min(1.0, min_lr / lr))
    values["mixup"] = float(values["mixup"])
    resolved = dataclasses.replace(settings, **values, min_lr_ratio=ratio, recipe=name)
    return resolved, name, taken
