"""The pretraining objective: EMA teacher, targets, determinism and that it learns."""

import dataclasses

import pytest
import torch

from model import ASDA, ASDAConfig, ema_decay

TINY = ASDAConfig.tiny(depth=2, average_top_k_layers=2, target_length=128, num_students=4)


@pytest.mark.parametrize(
    "step, expected",
    [(0, 0.9998), (50_000, (0.9998 + 0.99999) / 2), (100_000, 0.99999), (200_000, 0.99999)],
)
def test_ema_decay_anneals_linearly_then_stays(step, expected):
    assert ema_decay(step, 0.9998, 0.99999, 100_000) == pytest.approx(expected, abs=1e-12)


def test_model_decay_follows_its_update_count():
    model = ASDA(ASDAConfig.tiny(ema_decay_start=0.9, ema_decay_end=0.99, ema_anneal_steps=10))
    assert model.ema_decay == pytest.approx(0.9)
    for _ in range(5):
        model.update_teacher()
    assert model.ema_decay == pytest.approx(0.945)
    assert int(model.num_updates) == 5


def test_teacher_never_receives_gradients():
    model = ASDA(TINY)
    model(torch.randn(2, 128, 128))["loss"].backward()
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    assert all(p.grad is not None for p in model.student.parameters())


def test_update_teacher_moves_it_toward_the_student_by_one_minus_decay():
    model = ASDA(TINY)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    before = [t.clone() for t in model.teacher.parameters()]
    gap_before = sum((t - s).pow(2).sum() for t, s in zip(before, model.student.parameters(), strict=True))
    d = model.update_teacher()
    for t0, t, s in zip(before, model.teacher.parameters(), model.student.parameters(), strict=True):
        torch.testing.assert_close(t, d * t0 + (1 - d) * s)
    gap_after = sum((t - s).pow(2).sum() for t, s in zip(model.teacher.parameters(), model.student.parameters(), strict=True))
    assert gap_after < gap_before


def test_teacher_targets_are_layer_normalised_per_patch():
    model = ASDA(TINY)
    y = model.teacher_targets(torch.randn(2, 128, 128))
    assert y.shape == (2, TINY.num_patches, TINY.embed_dim) and y.dtype == torch.float32
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, y.shape[1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(2, y.shape[1]), atol=1e-3, rtol=0)


def _loss_after_init(seed):
    torch.manual_seed(seed)
    model = ASDA(TINY)
    return model(torch.randn(2, 128, 128))["loss"]


def test_same_seed_gives_the_same_loss():
    assert torch.equal(_loss_after_init(7), _loss_after_init(7))
    assert not torch.equal(_loss_after_init(7), _loss_after_init(8))


@pytest.mark.parametrize("reduction", ["release", "mean"])
def test_loss_falls_on_a_fixed_batch(reduction):
    """With the teacher held fixed the students must learn to predict its targets from the visible patches."""
    torch.manual_seed(0)
    model = ASDA(dataclasses.replace(TINY, loss_reduction=reduction))
    t, f = torch.arange(128.0)[:, None], torch.arange(128.0)[None, :]
    batch = torch.stack([torch.sin(t / (3 + i) + f / (5 + 2 * i)) for i in range(4)])
    batch = batch + 0.1 * torch.randn_like(batch)  # structured spectrogram-like patterns, not white noise
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(60):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append((out["loss"].item(), out["loss_frame"].item()))
    first, last = (torch.tensor(losses[:5]).mean(0), torch.tensor(losses[-5:]).mean(0))
    assert last[1] < 0.75 * first[1] and last[0] < 0.9 * first[0], (first, last)


def _attention_logit_std(config: ASDAConfig) -> float:
    torch.manual_seed(0)
    attn = ASDA(config).student.blocks[0].attn
    x = torch.nn.functional.layer_norm(torch.randn(4, 64, config.embed_dim), (config.embed_dim,))
    q1, k1 = attn.project_qkv(x)[:2]
    return float((q1 @ k1.transpose(-2, -1) / q1.shape[-1] ** 0.5).std())


def test_width_aware_init_gives_a_narrow_model_the_base_widths_attention_logit_spread():
    """At 768 wide, N(0, 0.02) weights give attention logits of std ~0.3; at 128 wide the same std gives ~0.05
    (near-uniform attention). init_std=None scales with the width so a narrow model starts like the base."""
    wide = ASDAConfig.tiny(init_std=None)
    assert wide.linear_init_std == pytest.approx(0.02 * (768 / 128) ** 0.5) and ASDAConfig().linear_init_std == 0.02
    assert 0.2 < _attention_logit_std(wide) < 0.45
    assert _attention_logit_std(ASDAConfig.tiny()) < 0.08  # the tiny preset keeps 0.02 (measured: README)


def test_ema_anneal_fraction_sizes_the_teacher_schedule_to_the_run():
    tiny = ASDAConfig.tiny()
    assert tiny.for_run(200).ema_anneal_steps == 200 and tiny.for_run(60).ema_anneal_steps == 60
    assert ASDAConfig().for_run(200).ema_anneal_steps == 100_000  # the release's fixed anneal
    assert ema_decay(200, tiny.ema_decay_start, tiny.ema_decay_end, tiny.for_run(200).ema_anneal_steps) == tiny.ema_decay_end == 0.999
