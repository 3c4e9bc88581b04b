"""ASDAConfig: every hyperparameter of the encoder, the pretraining objective and the teacher.

Defaults build the base model of the ASDA release (SPEC §2–4); ``ASDAConfig.tiny()`` is the CPU preset used by
tests, the embedded default data set and the CPU sweep grids. Sweep grids and the command line name these fields.
"""

from __future__ import annotations

import dataclasses
import math
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from .masking import keep_count

ATTENTION_KINDS = ("differential", "standard")
DIFF_NORMS = ("layernorm", "headwise_rms")
POS_EMBEDS = ("sincos2d", "learned1d")
CLS_POSITIONS = ("head", "middle", "none")
# Older name of cls_position "none" (read with a warning): it was mistaken for the release's mean pooling, which
# is a read-out of a model pretrained with its CLS (``model.encoder.READOUTS``), not a model without one.
CLS_POSITION_ALIASES = {"mean": "none"}
LOSS_REDUCTIONS = ("release", "mean")


@dataclass(frozen=True)
class ASDAConfig:
    # --- encoder geometry (SPEC §2)
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 3.5  # 3.5 in the ASDA release, 4.0 in EAT
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    patch_size: int = 16
    num_mel_bins: int = 128
    target_length: int = 1024  # frames; a multiple of patch_size
    pos_embed: Literal["sincos2d", "learned1d"] = "sincos2d"
    # where the CLS token sits (head, middle), or "none": no CLS at all, the project's own intervention: pretraining
    # regresses the mean of the visible patch outputs onto the utterance target, and the utterance vector is the
    # patches' mean ("mean" is read as "none", with a warning)
    cls_position: Literal["head", "middle", "none"] = "head"
    # std of the encoder's linear weights; None = 0.02·sqrt(768 / embed_dim): the release's 0.02 at the base width,
    # and at any other width the same spread of attention logits at init (a narrow model at 0.02 starts with
    # near-uniform attention whose q/k learn slowly)
    init_std: float | None = None
    drop_path: float = 0.0  # stochastic depth, linearly 0 -> drop_path over the blocks (fine-tuning)
    cls_init_std: float = 0.02  # the CLS token's init, N(0, std) (the release: N(0, 1); see encoder._init_cls)
    cls_weight_decay: bool = False  # weight decay on the CLS token (the release decays it: only 1-D params are free)

    # --- attention (SPEC §3)
    attention: Literal["differential", "standard"] = "differential"
    diff_lambda: float = 0.3  # fixed λ (paper ablation 0 / 0.3 / 0.5); ignored when learnable_lambda
    learnable_lambda: bool = False  # Differential Transformer re-parameterisation of λ
    diff_norm: Literal["layernorm", "headwise_rms"] = "layernorm"
    # branch scale (1 − lambda_init), separate from λ: None = 0.05 for a fixed λ (the release's constant), the
    # Differential Transformer's depth formula for a learnable one; a number fixes it for every layer
    lambda_init: float | None = None

    # --- pretraining objective (SPEC §4)
    num_students: int = 16  # clones of each clip, each with its own mask
    mask_ratio: float = 0.8
    mask_block_size: int = 5
    mask_adjust: float = 0.07
    alpha: float = 0.5  # weight of the utterance loss: loss = alpha * loss_utterance + loss_frame
    # what alpha weighs (SPEC §4): "release" = fairseq's sums (frame term per masked patch, utterance term summed
    # over clips x clones), so alpha means the paper's alpha; "mean" = per-element means of both terms
    loss_reduction: Literal["release", "mean"] = "release"
    average_top_k_layers: int = 12  # teacher layers averaged into the targets
    decoder_layers: int = 6
    decoder_kernel_size: int = 3
    decoder_groups: int = 16
    mask_noise_std: float = 0.01  # decoder mask tokens are drawn from N(0, std), not learned

    # --- EMA teacher (SPEC §4)
    ema_decay_start: float = 0.9998
    ema_decay_end: float = 0.99999
    ema_anneal_steps: int = 100_000
    # anneal over this share of the run's updates instead of ema_anneal_steps (set when the run starts)
    ema_anneal_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.cls_position in CLS_POSITION_ALIASES:
            new = CLS_POSITION_ALIASES[self.cls_position]
            warnings.warn(f"cls_position={self.cls_position!r} is now called {new!r} (no CLS token in pretraining "
                          f"or fine-tuning); the release's mean pooling is the read-out 'mean' of a model with a CLS "
                          f"(probe/finetune --readout mean, the grid factor readout)", UserWarning, stacklevel=3)
            object.__setattr__(self, "cls_position", new)
        _check_choice("attention", self.attention, ATTENTION_KINDS)
        _check_choice("diff_norm", self.diff_norm, DIFF_NORMS)
        _check_choice("pos_embed", self.pos_embed, POS_EMBEDS)
        _check_choice("cls_position", self.cls_position, CLS_POSITIONS)
        _check_choice("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        for name in ("embed_dim", "depth", "num_heads", "patch_size", "num_mel_bins", "target_length",
                     "num_students", "mask_block_size", "decoder_layers", "decoder_kernel_size",
                     "decoder_groups", "ema_anneal_steps", "average_top_k_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _fail(name, value, "a positive integer")
        if self.embed_dim % self.num_heads:
            _fail("embed_dim", self.embed_dim, f"a multiple of num_heads ({self.num_heads})")
        if self.pos_embed == "sincos2d" and self.embed_dim % 4:
            _fail("embed_dim", self.embed_dim, "a multiple of 4 with pos_embed 'sincos2d'")
        if self.embed_dim % self.decoder_groups:
            _fail("decoder_groups", self.decoder_groups, f"a divisor of embed_dim ({self.embed_dim})")
        if self.target_length % self.patch_size:
            _fail("target_length", self.target_length, f"a multiple of patch_size ({self.patch_size})")
        if self.num_mel_bins % self.patch_size:
            _fail("num_mel_bins", self.num_mel_bins, f"a multiple of patch_size ({self.patch_size})")
        if self.decoder_kernel_size % 2 == 0:
            _fail("decoder_kernel_size", self.decoder_kernel_size, "an odd integer (same-size convolution)")
        if self.average_top_k_layers > self.depth:
            _fail("average_top_k_layers", self.average_top_k_layers, f"between 1 and depth ({self.depth})")
        if not self.mlp_ratio > 0:
            _fail("mlp_ratio", self.mlp_ratio, "a positive number")
        if not 0.0 <= self.diff_lambda < 1.0:
            _fail("diff_lambda", self.diff_lambda, "a number in [0, 1)")
        if self.lambda_init is not None and not 0.0 <= self.lambda_init < 1.0:
            _fail("lambda_init", self.lambda_init, "null (the mode's default) or a number in [0, 1)")
        if not 0.0 <= self.drop_path < 1.0:
            _fail("drop_path", self.drop_path, "a number in [0, 1)")
        if not 0.0 < self.mask_ratio < 1.0:
            _fail("mask_ratio", self.mask_ratio, "a number in (0, 1)")
        if keep_count(self.num_patches, self.mask_ratio) < 1:
            _fail("mask_ratio", self.mask_ratio, f"a ratio that keeps at least one of {self.num_patches} patches")
        if not 0.0 <= self.mask_adjust < 1.0:
            _fail("mask_adjust", self.mask_adjust, "a number in [0, 1)")
        if not self.alpha >= 0.0:
            _fail("alpha", self.alpha, "a number >= 0")
        if not self.mask_noise_std >= 0.0:
            _fail("mask_noise_std", self.mask_noise_std, "a number >= 0")
        if not 0.0 <= self.ema_decay_start <= self.ema_decay_end <= 1.0:
            _fail("ema_decay_start", (self.ema_decay_start, self.ema_decay_end),
                  "0 <= ema_decay_start <= ema_decay_end <= 1")
        if self.init_std is not None and not self.init_std > 0:
            _fail("init_std", self.init_std, "null (width-aware) or a positive number")
        if self.ema_anneal_fraction is not None and not 0.0 < self.ema_anneal_fraction <= 1.0:
            _fail("ema_anneal_fraction", self.ema_anneal_fraction, "null or a number in (0, 1]")
        if not self.cls_init_std > 0:
            _fail("cls_init_std", self.cls_init_std, "a positive number")
        if not self.layer_norm_eps > 0:
            _fail("layer_norm_eps", self.layer_norm_eps, "a positive number")

    # --- derived geometry: never hard-code the grid
    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (time, frequency) of a full-length input."""
        return self.target_length // self.patch_size, self.num_mel_bins // self.patch_size

    @property
    def linear_init_std(self) -> float:
        return self.init_std if self.init_std is not None else 0.02 * math.sqrt(768 / self.embed_dim)

    def for_run(self, steps: int) -> ASDAConfig:
        """This config for a run of ``steps`` updates: ``ema_anneal_fraction`` turned into ``ema_anneal_steps``."""
        if self.ema_anneal_fraction is None:
            return self
        return dataclasses.replace(self, ema_anneal_steps=max(1, round(self.ema_anneal_fraction * steps)))

    def alpha_effective(self, clips_per_device: int) -> float:
        """The utterance term's weight relative to the frame term per element (SPEC §4): alpha under per-element
        means; under the release's sums alpha x clips per device x clones (loss = D (L_frame + alpha B S L_utt) in
        per-element means), so it moves with the batch per device and the student count."""
        if self.loss_reduction == "mean":
            return self.alpha
        return self.alpha * clips_per_device * self.num_students

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    # --- presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ASDAConfig:
        """A named starting point: "base" (the paper's encoder, the defaults), "tiny" (the CPU preset) or "release"
        (the released code's constants at base size, ``RELEASE``)."""
        if name not in PRESETS:
            raise ValueError(f"preset={name!r} is not allowed: expected one of {PRESETS}")
        if name == "tiny":
            return cls.tiny(**overrides)
        return cls(**{**(RELEASE if name == "release" else {}), **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> ASDAConfig:
        """The CPU preset: same architecture, small enough for a 2-core machine (~0.9 M encoder parameters), and
        a recipe chosen by measurement for runs of a few hundred updates on small data sets, which differs from
        the release's (``TINY_RECIPE``; the README's "defaults" table has the numbers):

        - ``loss_reduction="mean"``: under the release's sums the utterance term weighs clips x clones (32x at
          batch 8 x 4 students) more than the frame term per element, and it collapsed every small run measured
          (the synthetic set, synthesized speech, recorded drum hits: probes below the random-init encoder);
        - ``alpha=0``: the utterance target (the mean over patches of instance-normalised teacher outputs) is
          nearly one vector for every clip, and at this scale regressing the CLS onto it costs more than it
          gives: on recorded drum hits alpha = 0.5 (per-element means) probed below random init, 0.1 level with
          it, 0 above it; the ablation grids set alpha themselves, so their cells keep the paper's values;
        - a teacher that follows the student slowly (EMA 0.99 -> 0.999 over the whole run), nearer the
          release's 0.9998 -> 0.99999 than a fast one, which let some seeds of the grid's cells fall back to the
          random-init level.

        It keeps the release's 0.02 init: the width-aware one makes a stronger random encoder, and pretraining
        then adds less to it within such runs (`asda bench curve`; see the README)."""
        base = dict(
            embed_dim=128, depth=4, num_heads=4, target_length=256, num_students=4,
            average_top_k_layers=4, decoder_layers=2, decoder_groups=16, init_std=0.02,
            ema_anneal_fraction=1.0, **TINY_RECIPE,
        )
        base.update(overrides)
        return cls(**base)

    # --- serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ASDAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ASDAConfig field(s) {unknown}; allowed: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> ASDAConfig:
        path = Path(path_or_text)
        is_file = isinstance(path_or_text, Path) or (len(str(path_or_text)) < 4096 and path.is_file())
        text = path.read_text() if is_file else str(path_or_text)
        values = load_yaml(text, f"config {path}" if is_file else "config") or {}
        if not isinstance(values, dict):
            raise ValueError(f"config YAML {path_or_text!s:.80} must be a mapping of field: value")
        return cls.from_dict(values)

    def with_overrides(self, assignments: list[str] | dict[str, Any]) -> ASDAConfig:
        """A copy with fields replaced; ``assignments`` is a dict or ``["field=value", ...]`` from a command line."""
        if not isinstance(assignments, dict):
            parsed = {}
            for item in assignments:
                key, sep, raw = item.partition("=")
                if not sep or not key:
                    raise ValueError(f"override {item!r} must look like field=value (e.g. diff_lambda=0.5)")
                parsed[key.strip()] = yaml.safe_load(raw)
            assignments = parsed
        return ASDAConfig.from_dict({**self.to_dict(), **assignments})


PRESETS = ("base", "tiny", "release")
# The released code (MyParadise21/ASDA) where it differs from the base preset: its AltAttention hard-codes
# (A1 − 0.1·A2)·v and norm(·)·(1 − 0.05) (models/modules.py), its pretraining sums the losses with cls_loss 0.5
# (config/pretraining_AS2M.yaml), its CLS is drawn from N(0, 1) (models/base.py: nn.init.normal_) and decayed like
# every parameter of more than one dimension; its MLP is 3.5·D and its attention norm a LayerNorm over D, as the base
# preset's. What ``asda import --from fairseq`` builds for an ASDA checkpoint, and the paper grid's centre.
RELEASE: dict[str, Any] = dict(diff_lambda=0.1, lambda_init=0.05, diff_norm="layernorm", mlp_ratio=3.5,
                               loss_reduction="release", alpha=0.5, cls_init_std=1.0, cls_weight_decay=True)
# Where the tiny preset's objective and teacher differ from the release's (ASDAConfig.tiny says why).
TINY_RECIPE: dict[str, Any] = dict(loss_reduction="mean", alpha=0.0, ema_decay_start=0.99, ema_decay_end=0.999)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error, not a silent override."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, where: str) -> Any:
    """Parse YAML, naming ``where`` (the file) and the line on a syntax error or a repeated key."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ValueError(f"{where} is not valid YAML: {' '.join(str(exc).split())}") from None


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"ASDAConfig.{name}={value!r} is not allowed: expected {allowed}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(name, value, "one of " + ", ".join(repr(c) for c in choices))


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Accept what YAML and command lines produce (1 for 1.0, 'true' for True, '1e-1', which YAML reads as text)
    and nothing looser; numbers must be finite. An optional field also takes null."""
    if type(None) in typing.get_args(hint):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~")):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint in (int, float) and isinstance(value, str):
        try:
            value = int(value) if hint is int and value.strip().lstrip("+-").isdigit() else float(value)
        except ValueError:
            _fail(name, value, f"a number ({hint.__name__})")
    if isinstance(value, float) and not math.isfinite(value):
        _fail(name, value, "a finite number")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        _fail(name, value, "true or false")
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if hint in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        _fail(name, value, f"a number ({hint.__name__})")
    return value
