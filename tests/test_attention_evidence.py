"""The attention on the labelled event, measured as the report states it: positive mass on the event, negative mass
off it, padding left out of both, over many clips."""

import dataclasses

import numpy as np
import pytest
import torch

from model import ASDAConfig, ASDAEncoder
from pipelines.analysis import attention_evidence, clip_attention_measures, content_patch_mask


def test_the_measures_of_one_clip_by_hand():
    """Four patches: the event on the first, the last one padding. Effective map 0.5, 0.3, −0.2, 0.4: the positive
    mass on content is 0.8, 0.5 of it on the event; the subtraction takes 0.2 from the content off the event; the
    padding's 0.4 counts nowhere."""
    layers = [{"effective": torch.tensor([[0.5, 0.3, -0.2, 0.4]]), "a1": torch.tensor([[0.4, 0.3, 0.1, 0.2]])}]
    event = torch.tensor([[True, False, False, False]])
    content = torch.tensor([[True, True, True, False]])
    got = {k: float(v) for k, v in clip_attention_measures(layers, event, content).items()}
    assert got == pytest.approx({"uniform": 1 / 3, "share_0": 0.5 / 0.8, "share_a1_0": 0.4 / 0.8,
                                 "negative_0": 0.2})


def test_a_patch_column_is_content_when_its_first_half_holds_clip_frames():
    # 16-frame columns: 100 frames fill columns 0-5 and 4 frames of column 6 (mostly padding)
    mask = content_patch_mask(np.array([100, 112]), grid=(7, 2), patch_size=16)
    assert mask[0].tolist() == [True] * 12 + [False] * 2 and mask[1].all()


def test_attention_evidence_averages_over_the_clips_with_an_event_and_says_how_many():
    torch.manual_seed(0)
    config = ASDAConfig.tiny(embed_dim=32, depth=2, num_heads=2, target_length=64, average_top_k_layers=2)
    encoder = ASDAEncoder(config).eval()
    clips = {"fbank": np.random.default_rng(0).normal(size=(5, 64, 128)).astype(np.float32),
             "event": np.array([[0.0, 0.2], [0.1, 0.3], [np.nan, np.nan], [0.3, 0.5], [0.2, 0.4]]),
             "frames": np.array([64, 50, 64, 64, 40])}
    out = attention_evidence(encoder, clips, batch_size=2)
    assert out["attn_clips"] == 4 and set(out) >= {"attn_event_share", "attn_negative_off_event",
                                                   "attn_event_share_layer1", "attn_negative_off_event_layer0"}
    assert out["attn_event_share"] == out["attn_event_share_layer1"]
    assert out["attn_negative_off_event"] == 0.0  # near-uniform maps at init: A1 − 0.3·A2 ≈ 0.7 / N everywhere
    sharp = ASDAEncoder(dataclasses.replace(config, diff_lambda=0.9, init_std=1.0)).eval()
    assert attention_evidence(sharp, clips)["attn_negative_off_event"] > 0  # peaked A2: negative weights
    standard = ASDAEncoder(dataclasses.replace(config, attention="standard")).eval()
    assert attention_evidence(standard, clips)["attn_negative_off_event"] == 0.0  # softmax maps are positive
    one_batch = attention_evidence(encoder, clips, batch_size=64)
    assert one_batch == pytest.approx(out)  # the batch size changes nothing
    assert attention_evidence(encoder, {**clips, "event": np.full((5, 2), np.nan)}) == {}
