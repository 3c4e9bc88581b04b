"""The evidence behind the paper's claim: where attention goes, and how the losses went.

The utterance query's attention over the patch grid — A1, A2 and A1 − λ·A2 for differential attention, A for
standard attention — drawn for a few held-out clips, and measured, where the data set knows where each clip's
labelled event is (the synthetic set does), over many (``attention_evidence``): per layer, the share of the positive
mass that lands on the event's patches, and the negative mass the subtraction puts on the other patches (the noise
it cancels), padded patches left out of both, beside the share a uniform map would give.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import ASDAConfig, ASDAEncoder

FRAMES_PER_SECOND = 100  # 10 ms frame shift


def _query_rows(a: torch.Tensor, cls_idx: int | None) -> torch.Tensor:
    """(B, H, N, N) map -> (B, P) head-averaged weights of the utterance query over the patch tokens."""
    a = a.float().mean(dim=1)  # (B, N, N)
    if cls_idx is None:
        return a.mean(dim=1)  # no CLS: the mean over all queries ('mean' utterance vector)
    row = a[:, cls_idx]
    return torch.cat([row[:, :cls_idx], row[:, cls_idx + 1:]], dim=1)


def event_patch_mask(events: np.ndarray, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """(B, 2) event (start, end) seconds -> (B, P) bool, True for patches whose time column overlaps the event."""
    T, F = grid
    seconds_per_column = patch_size / FRAMES_PER_SECOND
    starts = torch.arange(T) * seconds_per_column
    ev = torch.as_tensor(events, dtype=torch.float32)
    cols = (starts[None, :] < ev[:, 1:2]) & (starts[None, :] + seconds_per_column > ev[:, 0:1])  # (B, T)
    return cols.repeat_interleave(F, dim=1)


@torch.no_grad()
def attention_summary(encoder: ASDAEncoder, fbank: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per layer: the utterance query's weights over patches for "a1", "a2", "effective" (A1 − λA2 or A), λ."""
    maps, cls_idx = encoder.attention_maps(fbank)
    layers = []
    for m in maps:
        entry = {"a1": _query_rows(m["a1"], cls_idx)}
        if "a2" in m:
            entry["a2"] = _query_rows(m["a2"], cls_idx)
            entry["lam"] = m["lam"].float()
            entry["effective"] = entry["a1"] - entry["lam"] * entry["a2"]
        else:
            entry["effective"] = entry["a1"]
        layers.append(entry)
    return layers


ATTENTION_CLIPS = 512  # clips the attention evidence is measured on (fewer where the split has fewer)


def content_patch_mask(frames: torch.Tensor | np.ndarray, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """(B,) frames of each clip's own content -> (B, P) bool, True for patches whose time column is mostly content
    (its first half holds clip frames): the columns of padding after a short clip are False."""
    T, F = grid
    starts = torch.arange(T) * patch_size
    own = torch.as_tensor(np.asarray(frames), dtype=torch.long)
    return (starts[None, :] + patch_size // 2 < own[:, None]).repeat_interleave(F, dim=1)


def clip_attention_measures(layers: list[dict[str, torch.Tensor]], event: torch.Tensor,
                            content: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per clip (B,) and per layer: "share_i" / "share_a1_i", the share of the positive mass of the effective map
    (A1 − λ·A2, or A) / of A1 that lies on the event's patches; "negative_i", the negative mass of the effective map
    on the content patches off the event (0 for A1 and standard attention); "uniform", the event's share of the
    content patches. Padding counts in none of them."""
    on, off = (event & content).float(), (~event & content).float()
    out = {"uniform": on.sum(1) / content.float().sum(1).clamp_min(1)}
    for i, layer in enumerate(layers):
        for key, w in (("share", layer["effective"]), ("share_a1", layer["a1"])):
            positive = w.clamp_min(0)
            out[f"{key}_{i}"] = (positive * on).sum(1) / (positive * (on + off)).sum(1).clamp_min(1e-12)
        out[f"negative_{i}"] = (-layer["effective"].clamp_max(0) * off).sum(1)
    return out


@torch.no_grad()
def attention_evidence(encoder: ASDAEncoder, clips: dict[str, np.ndarray], batch_size: int = 64) -> dict[str, float]:
    """The attention metrics of ``encoder`` over ``clips`` ("fbank", "event", "frames"), mean over the clips with a
    known event: ``attn_event_share`` (last layer, effective map), ``attn_event_share_a1``,
    ``attn_negative_off_event``, the same per layer (``_layer{i}``), ``attn_event_share_uniform`` and
    ``attn_clips`` (how many clips the means are over). Empty where no clip has a known event."""
    config = encoder.config
    known = np.all(np.isfinite(clips["event"]), axis=1)
    if not known.any():
        return {}
    sums: dict[str, float] = {}
    encoder = encoder.eval()
    indices = np.flatnonzero(known)
    for start in range(0, len(indices), batch_size):
        chosen = indices[start:start + batch_size]
        fbank = torch.as_tensor(clips["fbank"][chosen])
        grid = (fbank.shape[1] // config.patch_size, config.num_mel_bins // config.patch_size)
        event = event_patch_mask(clips["event"][chosen], grid, config.patch_size)
        content = content_patch_mask(clips["frames"][chosen], grid, config.patch_size)
        for key, values in clip_attention_measures(attention_summary(encoder, fbank), event, content).items():
            sums[key] = sums.get(key, 0.0) + float(values.sum())
    n = int(known.sum())
    depth = len(encoder.blocks)
    out: dict[str, float] = {"attn_clips": float(n), "attn_event_share_uniform": sums["uniform"] / n}
    for i in range(depth):
        out[f"attn_event_share_layer{i}"] = sums[f"share_{i}"] / n
        out[f"attn_event_share_a1_layer{i}"] = sums[f"share_a1_{i}"] / n
        out[f"attn_negative_off_event_layer{i}"] = sums[f"negative_{i}"] / n
    last = depth - 1
    out.update(attn_event_share=out[f"attn_event_share_layer{last}"],
               attn_event_share_a1=out[f"attn_event_share_a1_layer{last}"],
               attn_negative_off_event=out[f"attn_negative_off_event_layer{last}"])
    return out


def patch_grid_image(weights: torch.Tensor | np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(P,) weights over the time-major patch grid (index = t·F + f) -> the (F, T) image, image[f, t]: drawn with
    ``origin="lower"``, frequency runs up and time to the right, as in the log-mel drawn from ``fbank.T``."""
    T, F = grid
    w = weights.detach().float().cpu().numpy() if isinstance(weights, torch.Tensor) else np.asarray(weights)
    assert w.shape == (T * F,), f"expected {T * F} weights for a {T}x{F} patch grid, got {w.shape}"
    return w.reshape(T, F).T  # (T, F) -> (F, T)


EVENT_STYLE = {"color": "white", "linestyle": "-", "linewidth": 1.0}  # outlined in black: seen on every colour
EVENT_LABEL = "labelled event: start and end"
LOGMEL_LABEL = "log-mel (normalised, as fed to the encoder)"
ATTENTION_LABEL = "attention weight of the utterance query (mean over heads)"


def _event_style() -> dict[str, Any]:
    """EVENT_STYLE with the black outline that keeps a white line visible on a light map too."""
    from matplotlib import patheffects

    return {**EVENT_STYLE, "path_effects": [patheffects.Stroke(linewidth=2.6, foreground="black"), patheffects.Normal()]}


def event_handle():
    """The legend's entry for the event marks that ``draw_logmel`` and ``draw_patch_map`` draw."""
    from matplotlib.lines import Line2D

    return Line2D([], [], label=EVENT_LABEL, **_event_style())


def _mark_event(ax, event: np.ndarray) -> None:
    """The labelled event's start and end (seconds) as two vertical lines; nothing for a clip without one."""
    if np.all(np.isfinite(event)):
        for edge in event:
            ax.axvline(float(edge), **_event_style())


def draw_logmel(ax, fbank: np.ndarray, event: np.ndarray):
    """A (frames, mel) log-mel with time on x in seconds and frequency on y in mel bins, the event's start and
    end marked; returns the image (for a colour bar)."""
    frames, mels = fbank.shape
    image = ax.imshow(np.asarray(fbank).T, origin="lower", aspect="auto", cmap="magma",
                      extent=(0, frames / FRAMES_PER_SECOND, 0, mels), interpolation="nearest")
    _mark_event(ax, event)
    return image


def draw_patch_map(ax, weights: torch.Tensor, grid: tuple[int, int], patch_size: int, event: np.ndarray, *,
                   vmax: float | None = None):
    """An attention map over the patch grid, oriented and scaled like ``draw_logmel`` (a patch covers
    ``patch_size`` frames and mel bins), so it lines up with the log-mel of the same clip; the event's start and end
    marked. A diverging scale symmetric about 0 (A1 − λ·A2 can be negative), ± ``vmax`` (default: the map's own
    largest magnitude; a figure of several maps passes one for all so that a colour means one weight everywhere).
    Returns the image (for a colour bar)."""
    T, F = grid
    image = patch_grid_image(weights, grid)
    vmax = vmax or float(np.abs(image).max()) or 1.0
    drawn = ax.imshow(image, origin="lower", aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax,
                      extent=(0, T * patch_size / FRAMES_PER_SECOND, 0, F * patch_size), interpolation="nearest")
    _mark_event(ax, event)
    return drawn


def attention_grid(clips: dict[str, np.ndarray], panels: list[tuple[str, Any]], grid: tuple[int, int],
                   patch_size: int):
    """A figure of one row per clip: its log-mel, then each of ``panels`` ((title, (B, P) weights over the patch
    grid)) on the log-mel's axes (time in seconds right, mel bin up, ticks on the outer panels). Every map shares
    one colour scale, symmetric about 0, shown by one colour bar; the log-mel has its own. The event's start and
    end are marked and named in a legend. The caller titles and captions it."""
    from pipelines.plotting import plt

    rows = len(clips["fbank"])
    fig, axes = plt.subplots(rows, 1 + len(panels), figsize=(2.8 * (1 + len(panels)) + 0.4, 1.7 * rows + 1.4),
                             sharex=True, sharey=True, squeeze=False, layout="constrained")
    weights = [np.asarray(w.detach().float().cpu() if isinstance(w, torch.Tensor) else w) for _, w in panels]
    vmax = max(float(np.abs(w).max()) for w in weights) or 1.0
    for r in range(rows):
        mel = draw_logmel(axes[r, 0], clips["fbank"][r], clips["event"][r])
        maps = [draw_patch_map(axes[r, c], w[r], grid, patch_size, clips["event"][r], vmax=vmax)
                for c, w in enumerate(weights, start=1)]
        axes[r, 0].set_ylabel(f"clip {r + 1}\nmel bin", fontsize=8)
    for c, title in enumerate(["log-mel", *(t for t, _ in panels)]):
        axes[0, c].set_title(title, fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("time (s)", fontsize=8)
    for ax in axes.flat:
        ax.tick_params(labelsize=7)
    fig.colorbar(mel, ax=axes[:, 0], location="bottom", shrink=0.9).set_label(LOGMEL_LABEL, fontsize=8)
    fig.colorbar(maps[-1], ax=axes[:, 1:], location="bottom", shrink=0.9).set_label(ATTENTION_LABEL, fontsize=8)
    if np.all(np.isfinite(clips["event"]), axis=1).any():
        fig.legend(handles=[event_handle()], loc="outside upper right", fontsize=8, frameon=False)
    return fig


def attention_figure(encoder: ASDAEncoder, clips: dict[str, np.ndarray], title: str = ""):
    """A figure: one row per clip — the log-mel with the event's start and end marked, then the last layer's
    utterance-query attention over the patch grid (A1, A2, A1 − λA2 for differential attention; A for standard),
    each panel on the log-mel's axes and on one colour scale (``attention_grid``), with its caption."""
    from pipelines.plotting import add_caption

    config: ASDAConfig = encoder.config
    fbank = torch.as_tensor(clips["fbank"])
    last = attention_summary(encoder.eval(), fbank)[-1]
    panels = [("A1", "a1"), ("A2", "a2"), ("A1 − λ·A2", "effective")] if "a2" in last else [("A", "a1")]
    if "lam" in last:
        panels[-1] = (f"A1 − λ·A2 (λ = {float(last['lam'].mean()):.2f})", "effective")
    grid = (fbank.shape[1] // config.patch_size, config.num_mel_bins // config.patch_size)
    fig = attention_grid(clips, [(label, last[key]) for label, key in panels], grid, config.patch_size)
    fig.suptitle(title or f"utterance-query attention, last layer ({config.attention})", fontsize=9)
    add_caption(fig, f"Rows: held-out clips. Left: the clip's log-mel. Then the last layer's attention of the "
                     f"utterance query over the patch grid, averaged over heads, each cell one patch of "
                     f"{config.patch_size} frames × {config.patch_size} mel bins on the log-mel's axes; one colour "
                     f"scale for every map (red positive, blue negative: A1 − λ·A2 can be). White lines outlined in "
                     f"black: the start and end of the clip's labelled event, where the data knows it.")
    return fig


def figure_clips(data: str | Path, split: str | None, limit: int,
                 target_length: int | None = None) -> dict[str, np.ndarray]:
    """A few held-out clips: the named split, else valid, test, train — preferring clips with a known event.
    ``target_length`` None: the data set's own length (its card's)."""
    from .data.card import feed_length, load_card
    from .data.feed import read_clips

    card = load_card(data)
    length = feed_length(card, target_length, data)
    for name in ([split] if split else ["valid", "test", "train"]):
        if name in card["splits"]:
            clips = read_clips(data, name, target_length=length, labels="none", limit=max(limit, 1) * 4)
            known = np.all(np.isfinite(clips["event"]), axis=1)
            order = np.r_[np.flatnonzero(known), np.flatnonzero(~known)][:limit]
            return {k: v[order] for k, v in clips.items()}
    raise ValueError(f"split {split!r} not in {data}; it has {sorted(card['splits'])}")


LOSS_LABELS = {"loss": "total: frame + α · utterance", "loss_frame": "frame term", "loss_utterance": "utterance term"}


def loss_curve_figure(history: dict[str, list[tuple[int, float]]], title: str = "pretraining losses"):
    """The pretraining losses against the update (log scale), each named for what it is (``LOSS_LABELS``), the
    legend beside the axes rather than over the curves."""
    from pipelines.plotting import plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5), layout="constrained")
    for key, points in history.items():
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, label=LOSS_LABELS.get(key, key))
    ax.set_xlabel("update")
    ax.set_ylabel("loss (log scale)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    ax.set_title(title, fontsize=9)
    return fig


def log_pretraining_artifacts(run_id: str, config: ASDAConfig, settings, checkpoint: str | Path) -> dict[str, Any]:
    """Loss curves, the attention figure (each a PNG and an SVG) and the event-share metrics of a finished run,
    into its MLflow run."""
    from mlflow import MlflowClient

    from model import load_encoder
    from pipelines.plotting import log_figure

    client = MlflowClient()
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
               for key in ("loss", "loss_frame", "loss_utterance")}
    log_figure(client, run_id, loss_curve_figure(history, title=f"{settings.name}: losses"),
               "figures/loss_curves.png")
    results: dict[str, Any] = {}
    if not (settings.figure_clips or settings.attention_clips):
        return results
    encoder = load_encoder(checkpoint, "student").eval()  # once, for the figure and the measurements
    if settings.figure_clips:
        clips = figure_clips(settings.data, settings.figure_split, settings.figure_clips, config.target_length)
        fig = attention_figure(encoder, clips, title=f"{settings.name}: utterance-query attention, last layer")
        log_figure(client, run_id, fig, "figures/attention.png")
    if settings.attention_clips:
        clips = evidence_clips(settings.data, settings.figure_split, settings.attention_clips, config.target_length)
        results = attention_evidence(encoder, clips)
        for key, value in results.items():
            client.log_metric(run_id, key, value, step=settings.steps)
    return results


def evidence_clips(data: str | Path, split: str | None, limit: int,
                   target_length: int | None = None) -> dict[str, np.ndarray]:
    """The first ``limit`` clips of the named split, else of valid, test or train, in stored order (``asda
    prepare`` stores a split shuffled, so they are a fixed random sample of it), with their frame counts."""
    from .data.card import feed_length, load_card
    from .data.feed import read_clips

    card = load_card(data)
    length = feed_length(card, target_length, data)
    name = split or next((s for s in ("valid", "test", "train") if s in card["splits"]), None)
    if name not in card["splits"]:
        raise ValueError(f"split {split!r} not in {data}; it has {sorted(card['splits'])}")
    return read_clips(data, name, target_length=length, labels="none", limit=limit)
