"""What differential attention costs: one attention layer's forward + backward at the base width.

Versions, all built at the same width and measured in one process, interleaved:

- ``standard``: the EAT layer, ``model.StandardAttention`` (one fused SDPA call).
- ``differential``: the project's training path, ``model.DifferentialAttention`` (two fused SDPA calls).
- ``naive``: differential attention the way the released code computes it: both softmax maps materialised as
  one (B, 2H, N, N) tensor, softmax in float32, then ``(A1 − λ·A2) @ V``. Kept here only as the baseline.
- ``stacked`` (not measured by default): the training path's alternative of one SDPA call over 2H stacked heads
  with V repeated, recorded as an attempt in docs/benchmarks.md.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from model.attention import DifferentialAttention, StandardAttention, _merge_heads

SEQ_LENS = (103, 513, 1025)  # a student's visible patches + CLS, the teacher's full view, a 20 s clip
VERSIONS = ("standard", "differential", "naive")
ALL_VERSIONS = (*VERSIONS, "stacked")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class NaiveDifferentialAttention(DifferentialAttention):
    """Differential attention through explicit maps, as the released ASDA / Differential Transformer code does."""

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x.shape
        H, d = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).split([2 * D, 2 * D, D], dim=-1)
        q = q.reshape(B, N, 2 * H, d).transpose(1, 2) * d ** -0.5  # heads 0..H-1: group 1, H..2H-1: group 2
        k = k.reshape(B, N, 2 * H, d).transpose(1, 2)
        v = v.reshape(B, N, H, d).transpose(1, 2)
        scores = q @ k.transpose(-2, -1)  # (B, 2H, N, N)
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        maps = torch.softmax(scores, dim=-1, dtype=torch.float32).type_as(scores).view(B, 2, H, N, N)
        lam = self.lambda_value().to(maps.dtype)
        o = (maps[:, 0] - lam * maps[:, 1]) @ v  # (B, H, N, d)
        return self._finish(o)


class StackedDifferentialAttention(DifferentialAttention):
    """Differential attention as one SDPA call over 2H heads (q1|q2 against k1|k2, V repeated)."""

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x.shape
        H, d = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).split([2 * D, 2 * D, D], dim=-1)
        q = q.reshape(B, N, 2 * H, d).transpose(1, 2)
        k = k.reshape(B, N, 2 * H, d).transpose(1, 2)
        v = v.reshape(B, N, H, d).transpose(1, 2)
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, torch.cat([v, v], dim=1), attn_mask=mask)  # (B, 2H, N, d)
        lam = self.lambda_value().to(o.dtype)
        return self.out_proj(self.norm(_merge_heads(o[:, :H] - lam * o[:, H:])) * (1.0 - self.lambda_init))


def build_layer(name: str, dim: int, num_heads: int, diff_lambda: float) -> torch.nn.Module:
    if name == "standard":
        return StandardAttention(dim, num_heads)
    cls = {"differential": DifferentialAttention, "naive": NaiveDifferentialAttention,
           "stacked": StackedDifferentialAttention}.get(name)
    if cls is None:
        raise ValueError(f"attention version {name!r} is not known: expected one of {', '.join(ALL_VERSIONS)}")
    return cls(dim, num_heads, diff_lambda=diff_lambda)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, autocast_dtype: torch.dtype | None) -> None:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = layer(x)
    out.backward(grad)


def bench_attention(
    *,
    device: str = "cpu",
    dtype: str | None = None,
    seq_lens: tuple[int, ...] = SEQ_LENS,
    batch: int | None = None,
    dim: int = 768,
    num_heads: int = 12,
    diff_lambda: float = 0.3,
    repeats: int = 5,
    warmup: int = 2,
    versions: tuple[str, ...] = VERSIONS,
    seed: int = 0,
) -> dict:
    """Median forward + backward milliseconds (and GPU peak memory) of each version at each sequence length.

    Parameters and activations stay float32; with ``dtype`` bfloat16/float16 the layer runs under autocast, as the
    trainer does on GPU. ``peak_mem_mb`` is the memory one step allocates on top of what was live before it
    (activations, gradients, workspaces); it is ``None`` on CPU, where no allocator statistics exist.
    """
    dev = torch.device(device)
    dtype = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not allowed: expected one of {', '.join(DTYPES)}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    for name in versions:
        if name not in ALL_VERSIONS:
            raise ValueError(f"attention version {name!r} is not known: expected one of {', '.join(ALL_VERSIONS)}")
    batch = batch or (8 if dev.type == "cuda" else 2)
    autocast_dtype = None if dtype == "float32" else DTYPES[dtype]
    results = []
    for seq_len in seq_lens:
        torch.manual_seed(seed)
        layers = {name: build_layer(name, dim, num_heads, diff_lambda).to(dev).train() for name in versions}
        x = torch.randn(batch, seq_len, dim, device=dev, requires_grad=True)
        grad = torch.randn(batch, seq_len, dim, device=dev)
        times: dict[str, list[float]] = {name: [] for name in versions}
        peaks: dict[str, float | None] = {}
        for name, layer in layers.items():
            for _ in range(warmup):
                _step(layer, x, grad, autocast_dtype)
            peaks[name] = None
            if dev.type == "cuda":
                _sync(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                before = torch.cuda.memory_allocated(dev)
                _step(layer, x, grad, autocast_dtype)
                _sync(dev)
                peaks[name] = (torch.cuda.max_memory_allocated(dev) - before) / 2**20
        for _ in range(repeats):  # interleaved, so drift in machine load hits every version alike
            for name, layer in layers.items():
                _sync(dev)
                start = time.perf_counter()
                _step(layer, x, grad, autocast_dtype)
                _sync(dev)
                times[name].append(time.perf_counter() - start)
        for name in versions:
            results.append({"name": name, "seq_len": seq_len, "batch": batch,
                            "median_ms": statistics.median(times[name]) * 1000, "peak_mem_mb": peaks[name]})
        del layers, x, grad
    return {
        "device": dev.type if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dim": dim,
        "heads": num_heads,
        "diff_lambda": diff_lambda,
        "repeats": repeats,
        "results": results,
        "ratios": ratios(results),
    }


def ratios(results: list[dict]) -> list[dict]:
    """Per sequence length: differential time (and peak memory) over naive and over standard."""
    by = {(r["name"], r["seq_len"]): r for r in results}
    out = []
    for seq_len in sorted({r["seq_len"] for r in results}):
        diff = by.get(("differential", seq_len))
        if diff is None:
            continue
        row = {"seq_len": seq_len}
        for other in ("naive", "standard"):
            ref = by.get((other, seq_len))
            if ref is None:
                continue
            row[f"time_over_{other}"] = diff["median_ms"] / ref["median_ms"]
            if diff["peak_mem_mb"] is not None and ref["peak_mem_mb"]:
                row[f"mem_over_{other}"] = diff["peak_mem_mb"] / ref["peak_mem_mb"]
        out.append(row)
    return out
