"""Self-attention layers: the standard single-softmax layer (EAT) and differential attention (ASDA).

Both share one constructor/forward shape so the encoder picks either by name. The training path never builds an
N x N attention map: it calls ``scaled_dot_product_attention`` so the flash / memory-efficient kernels apply.
``attention_maps`` computes the maps explicitly, for analysis only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

FIXED_LAMBDA_INIT = 0.05  # the release's branch scale constant (1 − 0.05) with a fixed λ


def _sdpa_mask(key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, N) bool, True = padded key  ->  (B, 1, 1, N) bool, True = may attend (SDPA's convention)."""
    if key_padding_mask is None:
        return None
    return ~key_padding_mask[:, None, None, :]


def _explicit_softmax(q: torch.Tensor, k: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q kᵀ / √d) in float32 (or float64 for float64 inputs): (B, H, N, N)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1)


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    B, N, C = x.shape
    return x.view(B, N, num_heads, C // num_heads).transpose(1, 2)  # (B, H, N, d)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, H, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, H * d)  # (B, N, D)


class StandardAttention(nn.Module):
    """Multi-head softmax attention: ``out_proj(softmax(q kᵀ / √d) v)`` (the EAT baseline)."""

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True):
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} not divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return tuple(_split_heads(t, self.num_heads) for t in (q, k, v))  # each (B, H, N, d)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.project_qkv(x)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=_sdpa_mask(key_padding_mask))
        return self.out_proj(_merge_heads(o))

    def attention_maps(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, _ = self.project_qkv(x)
        return _explicit_softmax(q, k, key_padding_mask)  # (B, H, N, N)


class HeadwiseRMSNorm(nn.Module):
    """RMSNorm of each head's output separately (the Differential Transformer's "subln"); (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-5):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.RMSNorm(dim // num_heads, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        return self.norm(x.view(B, N, self.num_heads, D // self.num_heads)).view(B, N, D)


class DifferentialAttention(nn.Module):
    """Differential attention (Ye et al., 2024, "Differential Transformer"; ASDA, 2025).

        A1 = softmax(q1 k1ᵀ / √d),  A2 = softmax(q2 k2ᵀ / √d)
        y  = out_proj( norm( merge_heads((A1 − λ·A2) v) ) · (1 − λ_init) )

    Each head gets full-width q and k in both groups (the ASDA release layout), so the q and k projections are
    2·dim wide. λ is either fixed (the paper's ablation) or learnable:
    λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init. The branch scale (1 − λ_init) is separate from a fixed λ, so the λ
    ablation changes only λ: ``lambda_init=None`` means 0.05 for a fixed λ (the release's constant) and
    0.8 − 0.6·exp(−0.3·layer_index) for a learnable one; a number fixes it.
    With a fixed λ = 0 the layer is exactly single-softmax attention over (q1, k1, v) followed by norm, the
    constant (1 − λ_init) and out_proj.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        diff_lambda: float = 0.3,
        learnable_lambda: bool = False,
        layer_index: int = 0,
        diff_norm: str = "layernorm",
        qkv_bias: bool = True,
        lambda_init: float | None = None,
    ):
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} not divisible by num_heads {num_heads}"
        if not learnable_lambda and not 0.0 <= diff_lambda < 1.0:
            raise ValueError(f"diff_lambda={diff_lambda!r} is not allowed: expected a number in [0, 1)")
        if lambda_init is not None and not 0.0 <= lambda_init < 1.0:
            raise ValueError(f"lambda_init={lambda_init!r} is not allowed: expected a number in [0, 1)")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.learnable_lambda = learnable_lambda
        # One fused projection: [q1 | q2 | k1 | k2 | v], each dim wide.
        self.qkv = nn.Linear(dim, 5 * dim, bias=qkv_bias)
        if lambda_init is None:
            lambda_init = 0.8 - 0.6 * math.exp(-0.3 * layer_index) if learnable_lambda else FIXED_LAMBDA_INIT
        self.lambda_init = float(lambda_init)
        if learnable_lambda:
            self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
                nn.Parameter(torch.randn(self.head_dim) * 0.1) for _ in range(4)
            )
            self.diff_lambda = None
        else:
            self.diff_lambda = float(diff_lambda)
        if diff_norm == "layernorm":
            self.norm = nn.LayerNorm(dim)
        elif diff_norm == "headwise_rms":
            self.norm = HeadwiseRMSNorm(dim, num_heads)
        else:
            raise ValueError(f"diff_norm={diff_norm!r} is not allowed: expected 'layernorm' or 'headwise_rms'")
        self.out_proj = nn.Linear(dim, dim)

    def lambda_value(self) -> torch.Tensor:
        """The current λ as a 0-d float32 tensor (differentiable when learnable)."""
        if not self.learnable_lambda:
            return torch.tensor(self.diff_lambda, device=self.qkv.weight.device)
        lam_1 = torch.exp(torch.dot(self.lambda_q1.float(), self.lambda_k1.float()))
        lam_2 = torch.exp(torch.dot(self.lambda_q2.float(), self.lambda_k2.float()))
        return lam_1 - lam_2 + self.lambda_init

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(q1, k1, q2, k2, v), each (B, H, N, d)."""
        q1, q2, k1, k2, v = self.qkv(x).chunk(5, dim=-1)
        return tuple(_split_heads(t, self.num_heads) for t in (q1, k1, q2, k2, v))

    def _finish(self, o: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.norm(_merge_heads(o)) * (1.0 - self.lambda_init))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        q1, k1, q2, k2, v = self.project_qkv(x)
        mask = _sdpa_mask(key_padding_mask)
        # (A1 − λA2) v = A1 v − λ (A2 v): two fused-kernel calls, no N x N map in memory.
        o = F.scaled_dot_product_attention(q1, k1, v, attn_mask=mask)  # (B, H, N, d)
        if self.learnable_lambda or self.diff_lambda != 0.0:
            # A fixed λ multiplies as a Python number: no tensor is made (nor copied to the device) per call.
            lam = self.lambda_value().to(o.dtype) if self.learnable_lambda else self.diff_lambda
            o = o - lam * F.scaled_dot_product_attention(q2, k2, v, attn_mask=mask)
        return self._finish(o)

    def attention_maps(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A1, A2, λ): both (B, H, N, N) softmax maps in float32 and λ as a 0-d tensor. For analysis only."""
        q1, k1, q2, k2, _ = self.project_qkv(x)
        return (
            _explicit_softmax(q1, k1, key_padding_mask),
            _explicit_softmax(q2, k2, key_padding_mask),
            self.lambda_value(),
        )

    def forward_explicit(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The same function as ``forward`` through the explicit maps (reference for tests and plots)."""
        a1, a2, lam = self.attention_maps(x, key_padding_mask)
        v = self.project_qkv(x)[-1]
        o = ((a1 - lam * a2) @ v.to(a1.dtype)).to(v.dtype)
        return self._finish(o)


def build_attention(
    kind: str,
    dim: int,
    num_heads: int,
    *,
    diff_lambda: float = 0.3,
    learnable_lambda: bool = False,
    layer_index: int = 0,
    diff_norm: str = "layernorm",
    qkv_bias: bool = True,
    lambda_init: float | None = None,
) -> nn.Module:
    """The attention layer named ``kind`` ("differential" or "standard")."""
    if kind == "standard":
        return StandardAttention(dim, num_heads, qkv_bias=qkv_bias)
    if kind == "differential":
        return DifferentialAttention(
            dim, num_heads, diff_lambda=diff_lambda, learnable_lambda=learnable_lambda,
            layer_index=layer_index, diff_norm=diff_norm, qkv_bias=qkv_bias, lambda_init=lambda_init,
        )
    raise ValueError(f"attention={kind!r} is not allowed: expected 'differential' or 'standard'")
