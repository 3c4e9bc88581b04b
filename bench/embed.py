"""Embedding throughput: seconds of audio embedded per second of wall time (the real-time factor) by
``model.embedding`` in one process, per preset and clip length, and the peak memory of one long clip."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

from model import ASDAConfig, ASDAEncoder
from model.embedding import Feeding, embed_waveforms

PEAK_SCRIPT = """
import json, sys, torch
from model import ASDAConfig, ASDAEncoder
from model.embedding import Feeding, embed_waveforms
def peak_mb():
    return int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 1024
torch.set_num_threads(int(sys.argv[3]))
config = ASDAConfig.preset(sys.argv[1])
encoder = ASDAEncoder(config).eval()
wav = torch.randn(1, int(16000 * float(sys.argv[2]))) * 0.1
before = peak_mb()
list(embed_waveforms(encoder, [wav], Feeding(chunk_frames=config.target_length)))
print(json.dumps({"before_mb": before, "growth_mb": peak_mb() - before}))
"""


def bench_embed(presets: tuple[str, ...] = ("tiny", "base"), clip_seconds: tuple[float, ...] = (1.0, 10.0, 60.0),
                total_seconds: float = 120.0, batch_size: int = 8, long_minutes: float = 20.0,
                threads: int | None = None) -> dict:
    """{"results": [{"preset", "clip_s", "clips", "wall_s", "realtime_x", "clips_per_s"}], "peak": [...]}: each
    preset embeds ``total_seconds`` of noise cut into clips of each length (after one warm-up clip), and one
    ``long_minutes`` clip in a fresh process for its peak memory."""
    if threads:
        torch.set_num_threads(threads)
    results, peaks = [], []
    for preset in presets:
        config = ASDAConfig.preset(preset)
        torch.manual_seed(0)
        encoder = ASDAEncoder(config).eval()
        feeding = Feeding(chunk_frames=config.target_length)
        list(embed_waveforms(encoder, [torch.randn(1, 16000)], feeding, batch_size=batch_size))  # warm-up
        for seconds in clip_seconds:
            count = max(1, int(total_seconds // seconds))
            clips = [torch.randn(1, int(16000 * seconds)) * 0.1 for _ in range(count)]
            start = time.perf_counter()
            list(embed_waveforms(encoder, clips, feeding, batch_size=batch_size))
            wall = time.perf_counter() - start
            results.append({"preset": preset, "clip_s": seconds, "clips": count, "wall_s": wall,
                            "realtime_x": count * seconds / wall, "clips_per_s": count / wall,
                            "chunk_frames": config.target_length})
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, preset, str(long_minutes * 60),
                              str(torch.get_num_threads())], capture_output=True, text=True, check=True)
        peaks.append({"preset": preset, "minutes": long_minutes, **json.loads(out.stdout.strip().splitlines()[-1])})
    return {"results": results, "peak": peaks, "threads": torch.get_num_threads(), "batch_size": batch_size}
