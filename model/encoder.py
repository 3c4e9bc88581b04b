"""ASDAEncoder: patch embedding -> positional encoding -> (masking) -> CLS -> post-LN blocks.

The same module serves as student (visible patches only), teacher (all patches, per-layer targets) and the
fine-tuning backbone. The CLS token is inserted after positional encoding and masking, with the positional code
of its slot in the full layout (see ``pos_embed``), so head and middle are different functions.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .attention import build_attention
from .block import Block
from .config import ASDAConfig
from .patch_embed import PatchEmbed
from .pos_embed import POSITIONAL_ENCODINGS

# How a clip's vector is read from the encoder's outputs (an evaluation's choice, not the model's): "cls" = the
# utterance vector (the CLS token's output; the patches' mean for a model with cls_position "none"); "mean" = the
# release's mean pooling (PredictionMode.MEAN_POOLING): the CLS stays in the sequence and the patch outputs are
# averaged.
READOUTS = ("cls", "mean")


def check_readout(readout: str) -> None:
    if readout not in READOUTS:
        raise ValueError(f"readout={readout!r} is not allowed: expected one of {list(READOUTS)}")


def read_out(utterance: torch.Tensor, patches: torch.Tensor, readout: str) -> torch.Tensor:
    """(B, D): the clip vector ``readout`` names, from ``extract_features``' utterance (B, D) and patches (B, P, D)."""
    check_readout(readout)
    return utterance if readout == "cls" else patches.mean(dim=1)


class ASDAEncoder(nn.Module):
    def __init__(self, config: ASDAConfig):
        super().__init__()
        self.config = config
        D = config.embed_dim
        self.patch_embed = PatchEmbed(D, config.patch_size, config.num_mel_bins)
        self.pos_embed = POSITIONAL_ENCODINGS[config.pos_embed](D, config.grid, config.cls_position)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if config.cls_position != "none" else None
        # Post-LN blocks expect normalised input: the release normalises the token sequence before block 0.
        self.norm_input = nn.LayerNorm(D, eps=config.layer_norm_eps)
        drop_rates = [config.drop_path * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(
            Block(
                D,
                build_attention(
                    config.attention, D, config.num_heads, diff_lambda=config.diff_lambda,
                    learnable_lambda=config.learnable_lambda, layer_index=i, diff_norm=config.diff_norm,
                    qkv_bias=config.qkv_bias, lambda_init=config.lambda_init,
                ),
                mlp_ratio=config.mlp_ratio, drop_path=drop_rates[i], eps=config.layer_norm_eps,
            )
            for i in range(config.depth)
        )
        self.apply(functools.partial(_init_weights, std=config.linear_init_std))
        if self.cls_token is not None:
            _init_cls(self.cls_token, config.cls_init_std)

    # --- stages
    def embed(self, fbank: torch.Tensor) -> torch.Tensor:
        """(B, T, F) -> (B, P, D) patch tokens with positions."""
        return self.pos_embed(self.patch_embed(fbank))

    def cls_index(self, num_tokens: int) -> int | None:
        """Where the CLS token sits in a sequence of ``num_tokens`` patch tokens (None for 'none')."""
        return {"head": 0, "middle": num_tokens // 2, "none": None}[self.config.cls_position]

    def _with_cls(self, tokens: torch.Tensor, num_patches: int | None = None) -> tuple[torch.Tensor, int | None]:
        """(B, N, D) patch tokens -> the sequence with the CLS token at its position, and that position.

        ``num_patches``: patches in the full layout the tokens were taken from (default N); it fixes the CLS's
        positional code, so a masked view and the full input give the CLS the same code.
        """
        idx = self.cls_index(tokens.shape[1])
        if idx is None:
            return tokens, None
        B, _, D = tokens.shape
        cls = self.cls_token + self.pos_embed.cls_code(num_patches or tokens.shape[1]).to(self.cls_token.dtype)
        return _insert(tokens, cls.expand(B, 1, D).to(tokens.dtype), idx), idx

    def forward_tokens(
        self,
        tokens: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        return_layer_targets: bool = False,
        num_patches: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor] | None]:
        """Run the blocks over (B, N, D) patch tokens (all, or the visible ones of a masked view).

        key_padding_mask: (B, N) bool, True = padded patch; num_patches: patches of the full layout (default N).
        Returns (utterance (B, D), patch outputs (B, N, D),
        per-layer MLP outputs at the patch positions or None).
        """
        x, idx = self._with_cls(tokens, num_patches)
        if idx is not None and key_padding_mask is not None:
            key_padding_mask = _insert(key_padding_mask, key_padding_mask.new_zeros(len(tokens), 1), idx)
        x = self.norm_input(x)
        layer_targets = [] if return_layer_targets else None
        for block in self.blocks:
            x, t = block(x, key_padding_mask=key_padding_mask)
            if layer_targets is not None:
                layer_targets.append(_drop_token(t, idx))
        patches = _drop_token(x, idx)
        if idx is not None:
            utterance = x[:, idx]
        elif key_padding_mask is None:
            utterance = patches.mean(dim=1)
        else:
            keep = (~key_padding_mask).unsqueeze(-1).to(patches.dtype)
            utterance = (patches * keep).sum(1) / keep.sum(1).clamp_min(1)
        return utterance, patches, layer_targets

    def extract_features(self, fbank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, F) log-mel -> (utterance (B, D), patch tokens (B, P, D))."""
        utterance, patches, _ = self.forward_tokens(self.embed(fbank))
        return utterance, patches

    def forward(self, fbank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.extract_features(fbank)

    @torch.no_grad()
    def attention_maps(self, fbank: torch.Tensor) -> tuple[list[dict[str, torch.Tensor]], int | None]:
        """Explicit attention maps of every block, for analysis: ([{"a1", "a2", "lam"} or {"a1"}] per layer,
        CLS index in the token sequence or None). Maps are (B, H, N, N) over CLS + patch tokens."""
        x, idx = self._with_cls(self.embed(fbank))
        x = self.norm_input(x)
        maps = []
        for block in self.blocks:
            found = block.attn.attention_maps(x)
            maps.append(dict(zip(("a1", "a2", "lam"), found, strict=True)) if isinstance(found, tuple)
                        else {"a1": found})
            x, _ = block(x)
        return maps, idx


def _insert(x: torch.Tensor, item: torch.Tensor, idx: int) -> torch.Tensor:
    return torch.cat([x[:, :idx], item, x[:, idx:]], dim=1)


def _drop_token(x: torch.Tensor, idx: int | None) -> torch.Tensor:
    if idx is None:
        return x
    if idx == 0:  # the CLS at the head: a view, no copy
        return x[:, 1:]
    return torch.cat([x[:, :idx], x[:, idx + 1:]], dim=1)


def _init_cls(token: nn.Parameter, std: float) -> None:
    """N(0, std): timm's trunc_normal_ (cut at ±2, which never binds at the small std of EAT and the base preset)
    up to std 0.1; above it the release's untruncated nn.init.normal_ (its CLS is N(0, 1), models/base.py)."""
    if std <= 0.1:
        nn.init.trunc_normal_(token, std=std)
    else:
        nn.init.normal_(token, std=std)


def _init_weights(module: nn.Module, std: float) -> None:
    # BERT/data2vec initialisation: N(0, std) linear weights (0.02 at the base width), zero biases, unit LayerNorm.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
