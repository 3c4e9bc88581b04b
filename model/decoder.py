"""The light CNN decoder of EAT: fills masked positions with noise and predicts every patch's target."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ASDAConfig


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of (B, C, H, W), no affine parameters."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.channels, self.eps = channels, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, (self.channels,), eps=self.eps)
        return x.permute(0, 3, 1, 2)


class DecoderBlock(nn.Sequential):
    def __init__(self, dim: int, kernel_size: int, groups: int):
        super().__init__(
            nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=groups),
            ChannelLayerNorm(dim),
            nn.GELU(),
        )


class CNNDecoder(nn.Module):
    """Visible encoder outputs + N(0, σ) mask tokens on the patch grid -> residual grouped convs -> Linear."""

    def __init__(self, config: ASDAConfig):
        super().__init__()
        D = config.embed_dim
        self.noise_std = config.mask_noise_std
        self.blocks = nn.ModuleList(
            DecoderBlock(D, config.decoder_kernel_size, config.decoder_groups) for _ in range(config.decoder_layers)
        )
        self.proj = nn.Linear(D, D)

    def forward(self, visible: torch.Tensor, visible_idx: torch.Tensor, noise: torch.Tensor,
                grid: tuple[int, int]) -> torch.Tensor:
        """visible (B, k, D) at ascending patch indices visible_idx (B, k) -> predictions (B, P, D).

        noise (B, P, D): N(0, 1) draws, fresh every update (``ASDA.draw_views``); scaled, they are the mask tokens,
        not a learned embedding."""
        B, _, D = visible.shape
        T, Fq = grid
        x = (noise * self.noise_std).to(visible.dtype)  # (B, P, D)
        x = x.scatter(1, visible_idx.unsqueeze(-1).expand(-1, -1, D), visible)  # (B, P, D)
        x = x.transpose(1, 2).reshape(B, D, T, Fq)  # (B, D, T, F), time-major like the patch grid
        for block in self.blocks:
            x = x + block(x)
        return self.proj(x.flatten(2).transpose(1, 2))  # (B, P, D)
