"""Downstream: a classifier on the utterance vector, and optimiser parameter groups for training."""

from __future__ import annotations

import re

import torch
from torch import nn

from .config import ASDAConfig
from .encoder import ASDAEncoder, check_readout, read_out

# Parameters that never get weight decay besides biases and other 1-D tensors (the CLS token only where its config
# says: the release decays it, ASDAConfig.cls_weight_decay).
_NO_DECAY_NAMES = ("cls_token", "pos_embed.table")


class ClassificationHead(nn.Module):
    """LayerNorm (eps 1e-6) + Linear on the utterance vector, initialised as the release's fine-tuning head:
    unit norm scale, zero norm bias, Linear weight from a normal truncated at ±2 with std 0.02, zero bias."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, utterance: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(utterance))


class ASDAClassifier(nn.Module):
    """Encoder + head: (B, T, F) log-mel -> (B, num_classes) logits; the head reads the clip vector ``readout``
    names (``model.encoder.READOUTS``: the CLS output, or the release's mean pooling of the patch outputs)."""

    def __init__(self, config: ASDAConfig, num_classes: int, encoder: ASDAEncoder | None = None,
                 readout: str = "cls"):
        super().__init__()
        check_readout(readout)
        self.readout = readout
        self.encoder = encoder if encoder is not None else ASDAEncoder(config)
        self.head = ClassificationHead(config.embed_dim, num_classes)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        utterance, patches = self.encoder.extract_features(fbank)
        return self.head(read_out(utterance, patches, self.readout))


def _decays(name: str, param: torch.Tensor, decay_cls: bool = False) -> bool:
    free = tuple(n for n in _NO_DECAY_NAMES if not (decay_cls and n == "cls_token"))
    return param.ndim > 1 and not name.endswith(".bias") and not any(n in name for n in free)


def _decay_cls(model: nn.Module) -> bool:
    """Whether ``model``'s config (an ASDA's, an encoder's or a classifier's encoder's) decays the CLS token."""
    config = getattr(model, "config", None) or getattr(getattr(model, "encoder", None), "config", None)
    return bool(getattr(config, "cls_weight_decay", False))


def param_groups_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weight decay on matrices/kernels, none on biases, norms, λ vectors, positions and (unless the
    config's ``cls_weight_decay``) the CLS."""
    decay, no_decay = [], []
    decay_cls = _decay_cls(model)
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if _decays(name, p, decay_cls) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def layer_id(name: str, depth: int) -> int:
    """i + 1 for block i; depth + 1 (the base rate) for everything else: patch embedding, CLS, positions, input
    and final norms, head."""
    match = re.search(r"blocks\.(\d+)\.", name)
    return int(match.group(1)) + 1 if match else depth + 1


def param_groups_layer_decay(
    model: nn.Module, weight_decay: float, layer_decay: float = 0.65, depth: int | None = None
) -> list[dict]:
    """Layer-wise lr decay groups: block i gets ``lr_scale = layer_decay ** (depth - i)``, every parameter outside
    the blocks 1 (so the last block already trains at ``layer_decay`` times the base rate).

    Each group carries ``lr_scale``; the training loop sets ``lr = base_lr * lr_scale``.
    """
    if depth is None:
        depth = sum(1 for n, _ in model.named_modules() if re.fullmatch(r"(.*\.)?blocks\.\d+", n))
    groups: dict[tuple[int, bool], dict] = {}
    decay_cls = _decay_cls(model)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid, decays = layer_id(name, depth), _decays(name, p, decay_cls)
        group = groups.setdefault((lid, decays), {
            "params": [], "weight_decay": weight_decay if decays else 0.0,
            "lr_scale": layer_decay ** (depth + 1 - lid), "layer_id": lid,
        })
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]
