"""Warm start from released weights: a fairseq EAT or ASDA checkpoint mapped onto ``ASDAEncoder``.

The parameter names below were read from the releases' model code, not guessed:

- EAT, github.com/cwx-worst-one/EAT (commit 06c1c34), built on fairseq's data2vec 2.0 multi-modal model:
  ``models/EAT_pretraining.py`` (``Data2VecMultiModel``: ``modality_encoders`` keyed by modality name — ``IMAGE``
  for spectrograms —, the shared ``blocks``, ``norm`` only when ``layer_norm_first``, and ``state_dict()`` adding
  ``_ema``, the EMA teacher's float32 state dict: the whole model without decoders when ``ema_encoder_only`` is
  false, as in ``config/pretraining_AS2M.yaml``, else the blocks alone), ``models/images.py`` (``ImageEncoder``:
  ``local_encoder`` = ``PatchEmbed_new`` with ``.proj`` a Conv2d over (time, 128 mel bins),
  ``fixed_positional_encoder.positions`` = ``get_2d_sincos_pos_embed_flexible`` over ``max_length`` × 8,
  ``decoder`` = ``Decoder2d``), ``models/base.py`` (``ModalitySpecificEncoder``: ``extra_tokens`` prepended after
  the positions are added, without a position of their own, then ``context_encoder``), ``models/modules.py``
  (``BlockEncoder.norm`` applied before its — here empty — blocks; ``AltBlock``: ``norm1``, ``attn``, ``norm2``,
  ``mlp.fc1``/``mlp.fc2``, post-LN when ``layer_norm_first`` is false; ``AltAttention``: fused ``qkv`` laid out
  [q | k | v], ``proj``), ``models/mae.py`` (the sincos table: frequency half first, then time; sin then cos),
  ``models/EAT_audio_classification.py`` (a fine-tuned model keeps the encoder under ``model.``, with
  ``fc_norm`` and ``head``; fine-tuning starts from the student: ``load_state_dict`` then
  ``remove_pretraining_modules`` drops the EMA).
- ASDA, github.com/MyParadise21/ASDA (commit 5c34463), the same code with ``ASDA/models/modules.py``'s
  ``AltAttention`` replaced: ``qk`` (4·D outputs; reshaped (2, 2·D) → q, k; each chunked into two D-wide
  groups, so the rows are [q1 | q2 | k1 | k2]), ``v``, ``norm`` (LayerNorm(D), eps 1e-5), ``proj``; λ = 0.1 and the
  branch scale (1 − 0.05) are constants in that code, and ``AltBlock`` hard-codes the MLP at 3.5·D whatever
  ``cfg.model.mlp_ratio`` says.
- The published ASDA code has no λ parameters. A checkpoint of the learnable-λ variant in the same layout is
  read with the Differential Transformer's names (github.com/microsoft/unilm, ``Diff-Transformer/
  multihead_diffattn.py``): ``attn.lambda_q1``/``lambda_k1``/``lambda_q2``/``lambda_k2`` (one value per head
  dimension, λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init with λ_init = 0.8 − 0.6·exp(−0.3·layer)) and ``attn.subln``
  (per-head RMSNorm) in place of ``attn.norm``.

fairseq pickles its configuration (``cfg``: a dict holding enums of the release's own modules, or an omegaconf
object; ``args``: an ``argparse.Namespace``) next to the tensors. Loading never imports or runs any of it:
``torch.load(weights_only=True)`` where that suffices, else an unpickler that builds tensors and plain containers
and turns every other pickled class or function into an inert ``Placeholder``.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import types
import zipfile
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, NoReturn

import torch

from .checkpoint import save_checkpoint
from .config import RELEASE, ASDAConfig
from .encoder import ASDAEncoder
from .pos_embed import SinCos2dPositionalEncoding, sincos_2d_table

RELEASE_MEL_BINS = 128  # EAT/ASDA images.py: img_size = (target_length, 128)
RELEASE_TARGET_LENGTH = 1024  # D2vImageConfig.target_length
ASDA_LAMBDA, ASDA_LAMBDA_INIT = RELEASE["diff_lambda"], RELEASE["lambda_init"]  # models/modules.py: (attn1 - 0.1 * attn2), norm(x) * (1 - 0.05)
POSITION_TOLERANCE = 1e-3  # largest |difference| from our sincos table that still counts as the same table
REPORT_SUFFIX = ".import.json"  # the report is written beside the checkpoint: <out>.import.json

_STUDENT_REASON = "student encoder (the default import; this one took --which teacher)"
_UNUSED_REASONS = {  # last component of a group prefix -> why the encoder does not take it
    "_ema": "EMA teacher (asda import --which teacher takes it instead of the student)",
    "decoder": "pretraining decoder, not part of the encoder",
    "shared_decoder": "pretraining decoder, not part of the encoder",
    "recon_proj": "pretraining-only projection (reconstruction loss)",
    "cls_proj": "pretraining-only projection (utterance loss experiment)",
    "center": "pretraining-only centre (DINO-loss experiment)",
    "fc_norm": "fine-tuning head (asda probe and asda finetune train their own)",
    "head": "fine-tuning head (asda probe and asda finetune train their own)",
}


# --------------------------------------------------------------------------------------------- safe loading
class Placeholder:
    """What a pickled object of any class other than tensors and plain containers becomes: its class's name
    (``qualified_name``), the arguments and state it was pickled with; nothing of the class is imported or run."""

    qualified_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items = args, kwargs, None, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # the arguments were kept by __new__
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # a pickled dict subclass
        self.items.append((key, value))

    def append(self, value: Any) -> None:  # a pickled list subclass
        self.items.append(value)

    def extend(self, values: Any) -> None:
        self.items.extend(values)

    def __repr__(self) -> str:
        return f"<placeholder {self.qualified_name}>"


def _safe_globals() -> dict[tuple[str, str], Any]:
    """The only globals a checkpoint may name: tensor and parameter rebuilders, dtypes, plain containers."""
    allowed: dict[tuple[str, str], Any] = {("collections", "OrderedDict"): OrderedDict,
                                           ("torch", "Size"): torch.Size, ("torch", "device"): torch.device}
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                 "_rebuild_parameter_with_state"):
        if hasattr(torch._utils, name):
            allowed[("torch._utils", name)] = getattr(torch._utils, name)
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    for kind in (set, frozenset, list, dict, tuple, int, float, complex, str, bytes, bytearray, bool, slice):
        allowed[("builtins", kind.__name__)] = kind
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose ``find_class`` never imports: allowed globals, else a ``Placeholder`` subclass."""

    allowed = _safe_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is not None:
            return found
        qualified = f"{module}.{name}"
        _REPLACED.add(qualified)
        return type(name, (Placeholder,), {"qualified_name": qualified})


_REPLACED: set[str] = set()  # names replaced during the current restricted load (torch builds the unpickler)
_restricted_pickle = types.SimpleNamespace(
    __name__="restricted_pickle", Unpickler=_RestrictedUnpickler,
    load=lambda f, **kwargs: _RestrictedUnpickler(f, **kwargs).load())


def load_fairseq_checkpoint(path: str | Path) -> tuple[dict, list[str]]:
    """(the checkpoint's top-level dict, the pickled class names replaced by placeholders), read without running
    any pickled code; a file that is not a PyTorch checkpoint raises ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    mmap = zipfile.is_zipfile(path)  # torch.save's format since 1.6: map it rather than read a GB into memory
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        replaced: list[str] = []
    except Exception:  # fairseq pickles its configuration: read that part as placeholders
        _REPLACED.clear()
        try:
            state = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle,
                               mmap=mmap)
        except Exception as exc:
            raise ValueError(f"{path} is not a PyTorch checkpoint: {exc}") from None
        replaced = sorted(_REPLACED)
    if isinstance(state, dict) and "format" in state and "config" in state:
        raise ValueError(f"{path} is already an ASDA checkpoint; give it to asda probe/finetune directly")
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        found = sorted(map(str, state))[:8] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not a fairseq checkpoint: expected a dict with a 'model' state dict, found "
                         f"{found}")
    return state, replaced


def plain(value: Any) -> Any:
    """A pickled configuration as plain values: omegaconf nodes by their content, a Namespace by its attributes,
    an enum by its value; other placeholders stay."""
    if isinstance(value, Placeholder):
        state = value.state
        if isinstance(state, dict) and "_content" in state:  # omegaconf DictConfig / ListConfig
            return plain(state["_content"])
        if isinstance(state, dict) and "_val" in state:  # omegaconf value node
            return plain(state["_val"])
        if isinstance(state, dict):  # argparse.Namespace and other plain objects
            return {k: plain(v) for k, v in state.items()}
        if state is None and len(value.args) == 1 and not value.items:  # an enum member: (its value,)
            return plain(value.args[0])
        return value
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value


def release_settings(state: dict) -> dict:
    """The checkpoint's configuration as plain dicts: ``cfg`` (hydra-era fairseq: "model", "task", ...), else the
    flat ``args`` namespace of older checkpoints as {"model": args}; {} when neither is there."""
    cfg = plain(state.get("cfg"))
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        return cfg
    args = plain(state.get("args"))
    return {"model": args} if isinstance(args, dict) else {}


def _setting(settings: dict, dotted: str) -> Any:
    value: Any = settings
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


# --------------------------------------------------------------------------------------------- mapping
def _flatten(weights: dict, prefix: str = "") -> dict[str, Any]:
    """Every entry of a (nested, as ``_ema`` is) state dict under its dotted name."""
    flat: dict[str, Any] = {}
    for key, value in weights.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _locate(keys: list[str], path: Path) -> tuple[str, str]:
    """(root, modality): the encoder's keys start with ``root`` ("" for pretraining, "model." for fine-tuned
    checkpoints) and its patch embedding lives in ``modality_encoders.<modality>``."""
    pattern = re.compile(r"^((?:model\.)?)modality_encoders\.([^.]+)\.local_encoder\.")
    found = sorted({m.groups() for k in keys if (m := pattern.match(k))})
    if not found:
        shown = sorted({k.split(".")[0] for k in keys})[:12]
        raise ValueError(f"{path} has no EAT/ASDA encoder weights: no modality_encoders.<MODALITY>.local_encoder "
                         f"keys (top-level names found: {shown})")
    if len(found) > 1:
        raise ValueError(f"{path} holds several modality encoders {[m for _, m in found]}; this importer maps one")
    return found[0]


def _encoder_view(weights: dict, which: str, path: Path) -> tuple[dict[str, tuple[str, torch.Tensor]], str, list[str]]:
    """The chosen encoder's tensors by release name without root: {name: (checkpoint key, tensor)}, the modality,
    and notes on where the tensors came from."""
    keys = [k for k in weights if k != "_ema"]
    root, modality = _locate(keys, path)
    notes: list[str] = []
    student = {k[len(root):]: (k, v) for k, v in _flatten(weights).items()
               if k.startswith(root) and not k.startswith(f"{root}_ema.") and isinstance(v, torch.Tensor)}
    if which == "student":
        return student, modality, notes
    ema = weights.get(f"{root}_ema")
    if not isinstance(ema, dict) or not ema:
        raise ValueError(f"{path} has no EMA teacher ({root}_ema): import the student (leave out --which teacher)")
    flat_ema = {k: (f"{root}_ema.{k}", v) for k, v in _flatten(ema).items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("modality_encoders.") for k in flat_ema):
        return flat_ema, modality, notes
    # ema_encoder_only: the teacher is the blocks alone and runs on the student's embedding (EAT_pretraining.py
    # feeds it contextualized_features of the student's local features), so the rest comes from the student.
    teacher = {k: v for k, v in student.items() if not k.startswith("blocks.")}
    teacher.update({f"blocks.{k}": v for k, v in flat_ema.items() if re.match(r"^\d+\.", k)})
    notes.append("the EMA teacher holds the blocks only (ema_encoder_only); its patch embedding, CLS and input "
                 "norm are the student's, as in the release's teacher forward")
    return teacher, modality, notes


def _refuse(path: Path, what: str) -> NoReturn:
    raise ValueError(f"{path}: {what}; ASDAEncoder cannot represent it, so it is not imported")


def infer_config(view: dict[str, tuple[str, torch.Tensor]], settings: dict, modality: str,
                 path: Path) -> tuple[ASDAConfig, dict[str, str], list[str]]:
    """(config, field -> where its value came from, notes) from the tensor shapes, with ``settings`` (the
    checkpoint's cfg) for what shapes cannot tell: heads, LayerNorm eps, pre/post-LN, target length."""
    enc = f"modality_encoders.{modality}."
    shape = {k: tuple(v.shape) for k, (_, v) in view.items()}
    source: dict[str, str] = {}
    notes: list[str] = []
    fields: dict[str, Any] = {}

    conv = shape.get(f"{enc}local_encoder.proj.weight")
    if conv is None:
        _refuse(path, f"its patch embedding is not a single convolution ({enc}local_encoder.proj missing; a "
                      f"local_encoder with a projection after the convolution)")
    if len(conv) != 4 or conv[1] != 1 or conv[2] != conv[3]:
        _refuse(path, f"its patch embedding {enc}local_encoder.proj.weight has shape {conv}, not "
                      f"(D, 1, p, p) over a one-channel spectrogram")
    fields["embed_dim"], fields["patch_size"] = conv[0], conv[2]
    source["embed_dim"] = source["patch_size"] = f"shape of {enc}local_encoder.proj.weight {conv}"
    D = conv[0]

    blocks = sorted({int(m.group(1)) for k in view if (m := re.match(r"^blocks\.(\d+)\.", k))})
    if not blocks or blocks != list(range(len(blocks))):
        _refuse(path, f"its transformer blocks are {blocks or 'missing'}, not blocks.0 .. blocks.N-1")
    fields["depth"] = len(blocks)
    source["depth"] = f"blocks.0 .. blocks.{len(blocks) - 1} in the checkpoint"
    if any(k.startswith(f"{enc}context_encoder.blocks.") for k in view):
        _refuse(path, "it has modality-specific blocks before the shared ones (prenet_depth > 0)")
    if any("alibi" in k for k in view):
        _refuse(path, "it uses ALiBi attention biases (use_alibi_encoder)")
    if "norm.weight" in view or _setting(settings, "model.layer_norm_first") is True:
        _refuse(path, "its blocks are pre-LN (layer_norm_first: true, a final norm.weight); this encoder's "
                      "blocks are post-LN as in EAT and ASDA")
    if f"{enc}context_encoder.norm.weight" not in view:
        _refuse(path, f"it lacks the input LayerNorm {enc}context_encoder.norm that post-LN blocks follow")

    heads = _setting(settings, "model.num_heads")
    if isinstance(heads, int) and heads > 0:
        fields["num_heads"], source["num_heads"] = heads, "cfg model.num_heads"
    else:
        fields["num_heads"] = max(1, D // 64)
        source["num_heads"] = "embed_dim / 64 (the checkpoint has no cfg; override with num_heads=N)"
        notes.append(f"num_heads {fields['num_heads']} is assumed (head width 64), the checkpoint has no cfg")
    H = fields["num_heads"]

    if "blocks.0.mlp.fc1.weight" not in shape:
        _refuse(path, "blocks.0 has no mlp.fc1.weight, so its MLP width is unknown")
    hidden = shape["blocks.0.mlp.fc1.weight"][0]
    fields["mlp_ratio"] = hidden / D
    source["mlp_ratio"] = f"shape of blocks.0.mlp.fc1.weight ({hidden} = {hidden / D:g}·D)"
    cfg_ratio = _setting(settings, "model.mlp_ratio")
    if cfg_ratio is not None and not math.isclose(float(cfg_ratio), hidden / D):
        notes.append(f"mlp_ratio: cfg says {cfg_ratio}, the weights {hidden / D:g} (the ASDA release's AltBlock "
                     f"hard-codes 3.5·D); the weights decide")
    eps = _setting(settings, "model.norm_eps")
    fields["layer_norm_eps"] = float(eps) if eps is not None else 1e-6
    source["layer_norm_eps"] = "cfg model.norm_eps" if eps is not None else "the release's default norm_eps"

    length = _setting(settings, "model.modalities.image.target_length") or _setting(settings, "task.target_length")
    fields["target_length"] = int(length) if length else RELEASE_TARGET_LENGTH
    source["target_length"] = ("the checkpoint's cfg (modalities.image / task target_length)" if length
                               else "the release's default (1024); probe and finetune use the data set's")
    fields["num_mel_bins"], source["num_mel_bins"] = RELEASE_MEL_BINS, "the release hard-codes 128 mel bins"

    extra = shape.get(f"{enc}extra_tokens")
    if extra is None or extra[1] == 0:
        fields["cls_position"], source["cls_position"] = "none", f"no {enc}extra_tokens: no CLS token"
    elif extra[1] == 1:
        fields["cls_position"], source["cls_position"] = "head", f"{enc}extra_tokens, prepended to the patches"
    else:
        _refuse(path, f"it has {extra[1]} extra tokens; this encoder has one CLS token")
    fields["pos_embed"], source["pos_embed"] = "sincos2d", f"{enc}fixed_positional_encoder.positions (checked)"

    attn = {k.split("attn.", 1)[1] for k in view if k.startswith("blocks.0.attn.")}
    if "qkv.weight" in attn:
        fields["attention"], source["attention"] = "standard", "blocks.N.attn.qkv (EAT's fused q, k, v)"
        fields["qkv_bias"] = "qkv.bias" in attn
    elif {"qk.weight", "v.weight"} <= attn:
        fields["attention"], source["attention"] = "differential", "blocks.N.attn.qk and .v (ASDA's layout)"
        fields["qkv_bias"] = "qk.bias" in attn
        if "lambda_q1" in attn:
            fields["learnable_lambda"], fields["lambda_init"] = True, None
            source["learnable_lambda"] = "blocks.N.attn.lambda_q1/k1/q2/k2 present"
            source["lambda_init"] = "0.8 − 0.6·exp(−0.3·layer), the Differential Transformer's (not stored)"
            size = shape["blocks.0.attn.lambda_q1"][0]
            if size != D // H:
                _refuse(path, f"its λ vectors have {size} values, not one per head dimension ({D // H})")
        else:
            fields["diff_lambda"], fields["lambda_init"] = ASDA_LAMBDA, ASDA_LAMBDA_INIT
            source["diff_lambda"] = source["lambda_init"] = "constants of the ASDA release's AltAttention"
            # The rest of the release's constants (ASDAConfig.preset("release")): its CLS init and weight decay.
            fields["cls_init_std"], fields["cls_weight_decay"] = RELEASE["cls_init_std"], RELEASE["cls_weight_decay"]
            source["cls_init_std"] = "the ASDA release's nn.init.normal_ of extra_tokens (models/base.py)"
            source["cls_weight_decay"] = "the ASDA release decays every parameter of more than one dimension"
        if "subln.weight" in attn:
            fields["diff_norm"], source["diff_norm"] = "headwise_rms", "blocks.N.attn.subln (per-head RMSNorm)"
        else:
            fields["diff_norm"], source["diff_norm"] = "layernorm", "blocks.N.attn.norm (LayerNorm over D)"
    else:
        _refuse(path, f"blocks.0.attn holds {sorted(attn)}: neither EAT's qkv nor ASDA's qk + v")
    source["qkv_bias"] = "presence of the attention projection's bias"
    # The objective and decoder are not imported; these two of their fields must fit the encoder's shape.
    fields["average_top_k_layers"], fields["decoder_groups"] = fields["depth"], math.gcd(16, D)
    try:
        return ASDAConfig(**fields), source, notes
    except ValueError as exc:
        raise ValueError(f"{path}: the config inferred from it is not valid: {exc}") from None


def _block_map(i: int, config: ASDAConfig) -> list[tuple[str, list[str]]]:
    """(our parameter, the release names it is made of) for block ``i``."""
    b = f"blocks.{i}."
    pairs = [(f"{b}{n}.{p}", [f"{b}{n}.{p}"]) for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2")
             for p in ("weight", "bias")]
    pairs += [(f"{b}attn.out_proj.{p}", [f"{b}attn.proj.{p}"]) for p in ("weight", "bias")]
    params = ("weight", "bias") if config.qkv_bias else ("weight",)
    if config.attention == "standard":
        pairs += [(f"{b}attn.qkv.{p}", [f"{b}attn.qkv.{p}"]) for p in params]
        return pairs
    pairs += [(f"{b}attn.qkv.{p}", [f"{b}attn.qk.{p}", f"{b}attn.v.{p}"]) for p in params]  # [q1|q2|k1|k2 | v]
    if config.diff_norm == "layernorm":
        pairs += [(f"{b}attn.norm.{p}", [f"{b}attn.norm.{p}"]) for p in ("weight", "bias")]
    else:
        pairs += [(f"{b}attn.norm.norm.weight", [f"{b}attn.subln.weight"])]
    if config.learnable_lambda:
        pairs += [(f"{b}attn.{n}", [f"{b}attn.{n}"]) for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")]
    return pairs


def parameter_map(config: ASDAConfig, modality: str) -> list[tuple[str, list[str]]]:
    """Every encoder parameter of ``config`` with the release names it is built from (several are concatenated
    along the output dimension, in order)."""
    enc = f"modality_encoders.{modality}."
    pairs = [("patch_embed.proj.weight", [f"{enc}local_encoder.proj.weight"]),
             ("patch_embed.proj.bias", [f"{enc}local_encoder.proj.bias"]),
             ("norm_input.weight", [f"{enc}context_encoder.norm.weight"]),
             ("norm_input.bias", [f"{enc}context_encoder.norm.bias"])]
    if config.cls_position != "none":
        pairs.append(("cls_token", [f"{enc}extra_tokens"]))
    for i in range(config.depth):
        pairs += _block_map(i, config)
    return pairs


def _group(key: str, which: str) -> str:
    """The prefix a checkpoint key is reported under: ``_ema`` (the whole teacher, when the student is imported),
    ``blocks``, ``modality_encoders.IMAGE.decoder``, ``model.blocks``, ``_ema.modality_encoders.IMAGE.decoder``."""
    parts = key.split(".")
    root = parts[:1] if parts[0] == "model" else []
    rest = parts[len(root):]
    if rest[0] == "_ema":
        if which == "student":
            return ".".join(root + ["_ema"])
        root, rest = root + ["_ema"], rest[1:]
    size = 3 if rest[0] == "modality_encoders" else 1
    return ".".join(root + rest[:size])


def _reason(group: str, which: str) -> str:
    last = group.rsplit(".", 1)[-1]
    if last in _UNUSED_REASONS:
        return _UNUSED_REASONS[last]
    encoder_part = last in ("blocks", "local_encoder", "extra_tokens", "context_encoder", "fixed_positional_encoder")
    if which == "teacher" and encoder_part and "_ema" not in group.split("."):
        return _STUDENT_REASON
    return "not part of the encoder layout this importer knows"


def map_weights(state: dict, *, which: str = "student", path: str | Path = "checkpoint",
                overrides: list[str] | None = None) -> tuple[ASDAConfig, dict[str, torch.Tensor], dict]:
    """(config, the encoder's state dict, the import report) from a loaded fairseq checkpoint; works on meta
    tensors too (shapes only), except the positional table, whose values are checked.

    The report accounts for every checkpoint key (used, checked or unused with a reason, grouped by prefix) and
    every encoder parameter; a parameter the checkpoint cannot fill is an error.
    """
    if which not in ("student", "teacher"):
        raise ValueError(f"which={which!r} is not allowed: expected 'student' or 'teacher'")
    path = Path(path)
    weights = state["model"]
    view, modality, notes = _encoder_view(weights, which, path)
    settings = release_settings(state)
    config, source, config_notes = infer_config(view, settings, modality, path)
    notes += config_notes
    if overrides:
        config = config.with_overrides(overrides)
        for item in overrides:
            source[item.partition("=")[0].strip()] = "command-line override"
    enc = f"modality_encoders.{modality}."
    release = "ASDA" if config.attention == "differential" else "EAT"

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ASDAEncoder(config).state_dict().items()}
    filled: dict[str, torch.Tensor] = {}
    unfilled: dict[str, list[str]] = {}
    used: set[str] = set()
    for ours, names in parameter_map(config, modality):
        missing = [n for n in names if n not in view]
        if missing:
            unfilled[ours] = missing
            continue
        tensor = torch.cat([view[n][1].float() for n in names], dim=0) if len(names) > 1 else view[names[0]][1]
        filled[ours] = tensor.float()
        used.update(view[n][0] for n in names)
    unfilled.update({k: ["(no release name maps to it)"] for k in expected if k not in filled and k not in unfilled})
    if unfilled:
        shown = "; ".join(f"{k} <- {v}" for k, v in list(unfilled.items())[:6])
        raise ValueError(f"{path}: {len(unfilled)} encoder parameter(s) cannot be filled from the checkpoint: "
                         f"{shown}{' ...' if len(unfilled) > 6 else ''}")
    wrong = {k: (tuple(v.shape), expected[k]) for k, v in filled.items() if tuple(v.shape) != expected[k]}
    if wrong:
        shown = "; ".join(f"{k}: checkpoint {a}, encoder {b}" for k, (a, b) in list(wrong.items())[:6])
        raise ValueError(f"{path}: the checkpoint's shapes do not fit the config ({shown}); check the overrides")

    differences: list[str] = []
    checked: dict[str, str] = {}
    pos_key = f"{enc}fixed_positional_encoder.positions"
    if pos_key not in view:
        _refuse(path, f"it has no fixed positional table ({pos_key}); this encoder always adds one")
    table = view[pos_key][1].float().reshape(-1, config.embed_dim)
    freq = config.num_mel_bins // config.patch_size
    if table.shape[0] % freq:
        _refuse(path, f"its positional table has {table.shape[0]} rows, not a multiple of {freq} frequency bins")
    ours_table = sincos_2d_table((table.shape[0] // freq, freq), config.embed_dim)
    gap = float((table - ours_table).abs().max())
    if not gap <= POSITION_TOLERANCE:
        _refuse(path, f"its positional table differs from the 2-D sincos table by up to {gap:.3g}")
    checked[view[pos_key][0]] = (f"equals this encoder's fixed sincos2d table to {gap:.2g} over {table.shape[0]} "
                                 f"rows ({table.shape[0] // freq} time columns); not copied, the encoder computes it")
    used.add(view[pos_key][0])
    differences.append(f"positions: the release's table is computed in float32, this encoder's in float64 then "
                       f"rounded to float32: largest difference {gap:.2g}")

    if config.cls_position == "head":
        # The release adds no position to its CLS; ours adds the sincos code of the slot before the first column.
        # Subtracting that code here makes the CLS entering block 0 the release's, bit for bit up to rounding.
        code = SinCos2dPositionalEncoding(config.embed_dim, config.grid, "head").cls_code(config.num_patches)
        filled["cls_token"] = filled["cls_token"] - code.to(filled["cls_token"].device)
        differences.append("CLS: the release adds no positional code to its CLS token; this encoder adds the time "
                           "half of the sincos code of column −1, so cls_token = extra_tokens − that code and "
                           "the CLS entering the blocks is the release's")
    if config.attention == "differential" and not config.learnable_lambda:
        differences.append(f"λ = {ASDA_LAMBDA} and λ_init = {ASDA_LAMBDA_INIT} are constants of the ASDA "
                           f"release's code, not stored in the checkpoint; a checkpoint trained with other "
                           f"constants cannot say so (override diff_lambda / lambda_init)")
    if config.attention == "differential" and config.learnable_lambda:
        differences.append("λ_init is not stored: the Differential Transformer's 0.8 − 0.6·exp(−0.3·layer) is "
                           "assumed, which is also this encoder's default for a learnable λ")

    all_keys = _flatten(weights)
    groups: dict[str, Counter] = {}
    for key, value in all_keys.items():
        if key in used:
            continue
        group = _group(key, which)
        counts = groups.setdefault(group, Counter())
        counts["count"] += 1
        counts["elements"] += value.numel() if isinstance(value, torch.Tensor) else 0
    unused = {g: {"count": c["count"], "elements": c["elements"], "reason": _reason(g, which)}
              for g, c in sorted(groups.items())}
    report = {
        "source": str(path),
        "release": release,
        "kind": "fine-tuned" if any(k.startswith("model.modality_encoders.") for k in all_keys) else "pretraining",
        "which": which,
        "config": config.to_dict(),
        "inferred": source,
        "checkpoint_keys": len(all_keys),
        "mapped": {"checkpoint_keys": len(used) - len(checked), "encoder_parameters": len(filled)},
        "checked": checked,
        "unused": unused,
        "unfilled": [],
        "differences": differences,
        "notes": notes,
    }
    return config, filled, report


def convert(state: dict, *, which: str = "student", path: str | Path = "checkpoint",
            overrides: list[str] | None = None) -> tuple[ASDAEncoder, dict]:
    """(the encoder with the release's weights, the import report) from a loaded fairseq checkpoint."""
    config, filled, report = map_weights(state, which=which, path=path, overrides=overrides)
    encoder = ASDAEncoder(config)
    encoder.load_state_dict(filled, strict=True)
    return encoder, report


def import_fairseq(source: str | Path, out: str | Path, *, which: str = "student",
                   overrides: list[str] | None = None, force: bool = False) -> dict:
    """Map a released fairseq EAT/ASDA checkpoint onto ``ASDAEncoder`` and write it at ``out`` in this project's
    checkpoint format (what ``load_encoder``, ``asda probe --checkpoint`` and ``asda finetune --checkpoint`` read),
    with the report beside it (``<out>.import.json``). Returns the report."""
    source, out = Path(source), Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; name the checkpoint file to write (e.g. {out / 'eat.pt'})")
    if out.exists() and not force:
        raise ValueError(f"--out {out} exists; pass --force to replace it")
    if out.resolve() == source.resolve():
        raise ValueError(f"--out {out} is the checkpoint being imported; write somewhere else")
    state, replaced = load_fairseq_checkpoint(source)
    encoder, report = convert(state, which=which, path=source, overrides=overrides)
    report["placeholders"] = replaced
    report["output"] = str(out)
    report["report"] = str(out.with_name(out.name + REPORT_SUFFIX))
    save_checkpoint(out, encoder, encoder.config,
                    imported_from={"source": str(source.resolve()), "release": report["release"], "which": which})
    Path(report["report"]).write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_report(report: dict) -> str:
    """The import report as lines for a terminal."""
    c = report["config"]
    attention = c["attention"] if c["attention"] == "standard" else (
        f"differential, λ {'learnable' if c['learnable_lambda'] else c['diff_lambda']}, "
        f"λ_init {c['lambda_init'] if c['lambda_init'] is not None else 'by depth'}, {c['diff_norm']}")
    lines = [f"{report['source']}: {report['release']} {report['kind']} checkpoint, {report['which']} encoder",
             f"  config: D {c['embed_dim']}, depth {c['depth']}, heads {c['num_heads']}, MLP {c['mlp_ratio']:g}·D, "
             f"patch {c['patch_size']}, {c['pos_embed']}, CLS {c['cls_position']}, attention {attention}",
             f"  mapped {report['mapped']['checkpoint_keys']} checkpoint keys onto "
             f"{report['mapped']['encoder_parameters']} encoder parameters; encoder parameters not filled: "
             f"{len(report['unfilled'])}"]
    for key, note in report["checked"].items():
        lines.append(f"  checked {key}: {note}")
    lines.append(f"  checkpoint keys not used ({sum(g['count'] for g in report['unused'].values())} of "
                 f"{report['checkpoint_keys']}):")
    for group, g in report["unused"].items():
        lines.append(f"    {group}: {g['count']} keys, {g['elements']:,} values — {g['reason']}")
    for item in report["differences"]:
        lines.append(f"  difference: {item}")
    for item in report["notes"]:
        lines.append(f"  note: {item}")
    if report.get("placeholders"):
        lines.append(f"  pickled classes read as inert placeholders: {', '.join(report['placeholders'])}")
    if report.get("output"):
        lines.append(f"  wrote {report['output']} and {report['report']}")
    return "\n".join(lines)
