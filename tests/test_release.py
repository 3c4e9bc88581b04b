"""What the public release (MyParadise21/ASDA) computes, pinned: each test is written from the release's formulas
or tensors and fails on the plausible wrong variant (fine-tuning's recipe and augmentation: test_finetune_recipe)."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_fairseq_import import D, release_forward, release_weights, save_fairseq, spectrogram, with_ema

from model import ASDA, ASDAClassifier, ASDAConfig, ASDAEncoder, load_encoder, param_groups_weight_decay
from model.config import RELEASE
from model.fairseq import import_fairseq
from model.head import param_groups_layer_decay

SMALL = ASDAConfig.tiny(embed_dim=64, depth=3, num_heads=4, target_length=64, average_top_k_layers=2,
                        decoder_layers=1, num_students=2)


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.3, 0.5])
def test_each_lambda_cell_computes_the_releases_attention_with_its_lambda(tmp_path, lam):
    """out_proj(LayerNorm(A1·v − λ·A2·v) · (1 − 0.05)), written from the release's qk / v tensors, with λ the
    cell's: the same imported weights under each λ give the release forward of that λ."""
    w = release_weights("asda")
    import_fairseq(save_fairseq(tmp_path / "asda.pt", with_ema(w)), tmp_path / "out.pt")
    imported = load_encoder(tmp_path / "out.pt")
    encoder = ASDAEncoder(dataclasses.replace(imported.config, diff_lambda=lam)).eval()
    encoder.load_state_dict(imported.state_dict())
    x = spectrogram()
    with torch.no_grad():
        utterance, patches = encoder.extract_features(x)
        ref_utterance, ref_patches = release_forward(w, x, kind="asda", lam=lambda i: lam)
        other = release_forward(w, x, kind="asda", lam=lambda i: lam + 0.2)[1]
    torch.testing.assert_close(patches, ref_patches, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(utterance, ref_utterance, atol=2e-5, rtol=1e-4)
    assert (patches - other).abs().max() > 1e-3  # the test tells λ from λ + 0.2


def _release_targets(encoder: ASDAEncoder, fbank: torch.Tensor, top_k: int, before_residual: bool = True):
    """EAT/ASDA's make_targets from the blocks written out: t = fc2(gelu(fc1(norm1(x + attn(x))))) per block, the
    top-K layers' t instance-normalised over the patches, averaged, then layer-normalised per patch."""
    tokens = encoder.embed(fbank)
    cls = encoder.cls_token + encoder.pos_embed.cls_code(tokens.shape[1])
    x = encoder.norm_input(torch.cat([cls.expand(len(tokens), -1, -1), tokens], 1))
    layers = []
    for block in encoder.blocks:
        x = block.norm1(x + block.attn(x))
        t = block.mlp.fc2(F.gelu(block.mlp.fc1(x)))
        x = block.norm2(x + t)
        layers.append((t if before_residual else x)[:, 1:])
    y = [F.instance_norm(t.transpose(1, 2)).transpose(1, 2) for t in layers[-top_k:]]
    y = sum(y) / len(y)
    return F.layer_norm(y, y.shape[-1:])


def test_teacher_targets_are_the_top_k_blocks_mlp_outputs_before_the_residual():
    torch.manual_seed(0)
    model = ASDA(SMALL).eval()
    x = torch.randn(2, 64, 128)
    with torch.no_grad():
        got = model.teacher_targets(x)
        expected = _release_targets(model.teacher, x, SMALL.average_top_k_layers)
        after_residual = _release_targets(model.teacher, x, SMALL.average_top_k_layers, before_residual=False)
        all_layers = _release_targets(model.teacher, x, SMALL.depth)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert (got - after_residual).abs().max() > 1e-2 and (got - all_layers).abs().max() > 1e-2


def _time_code(column: int, dim: int) -> torch.Tensor:
    """The sin-cos code of a time column over ``dim`` channels: sin(c·ω_i) then cos(c·ω_i), ω_i = 10000^(−2i/dim)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2) / (dim / 2))
    return torch.tensor(np.concatenate([np.sin(column * omega), np.cos(column * omega)]), dtype=torch.float32)


@pytest.mark.parametrize("position, column", [("head", -1), ("middle", 2)])
def test_the_cls_gets_the_time_code_of_its_column_and_no_frequency_code(position, column):
    """sincos2d: head = time column −1 (one before the first patch), middle = the middle time column of the full
    layout (4 columns at 64 frames: column 2); the frequency half is zero."""
    encoder = ASDAEncoder(dataclasses.replace(SMALL, cls_position=position))
    patches = SMALL.num_patches  # 4 time columns x 8 frequency rows
    code = encoder.pos_embed.cls_code(patches)
    half = D // 2
    assert torch.equal(code[:half], torch.zeros(half))
    torch.testing.assert_close(code[half:], _time_code(column, half), atol=1e-6, rtol=0)
    if column >= 0:  # the same time code as that column's patches
        torch.testing.assert_close(code[half:], encoder.pos_embed.codes(patches)[column * 8, half:])


def test_drop_path_rises_linearly_from_zero_at_the_first_block_to_its_rate_at_the_last():
    encoder = ASDAEncoder(ASDAConfig(drop_path=0.1, depth=12))
    rates = [block.drop_path.p if hasattr(block.drop_path, "p") else 0.0 for block in encoder.blocks]
    np.testing.assert_allclose(rates, np.linspace(0, 0.1, 12), atol=1e-12)


def _decayed(groups, model) -> set[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}


def test_weight_decay_spares_biases_norms_and_vectors_and_the_cls_only_where_the_preset_says():
    """The release decays every parameter of more than one dimension, its CLS (1, 1, D) included; the base preset
    spares the CLS and the learned positions as EAT/MAE do. Fine-tuning's head: its weight decays, its norm and
    bias do not."""
    for preset, cls_decays in (("base", False), ("release", True)):
        config = ASDAConfig.preset(preset, embed_dim=64, depth=2, num_heads=4, average_top_k_layers=2,
                                   decoder_groups=16)
        model = ASDA(config)
        decayed = _decayed(param_groups_weight_decay(model, 0.05), model)
        assert ("student.cls_token" in decayed) is cls_decays
        assert all(p.ndim > 1 for n, p in model.named_parameters() if n in decayed)
        assert all(n in decayed or p.ndim == 1 or n.endswith("cls_token")
                   for n, p in model.named_parameters() if p.requires_grad and not n.endswith(".bias"))
        classifier = ASDAClassifier(config, 5)
        decayed = _decayed(param_groups_layer_decay(classifier, 0.05, 0.65), classifier)
        assert "head.linear.weight" in decayed and not {"head.linear.bias", "head.norm.weight"} & decayed
        assert ("encoder.cls_token" in decayed) is cls_decays


def test_the_release_preset_is_what_the_fairseq_import_builds_for_an_asda_checkpoint(tmp_path):
    w = release_weights("asda")
    import_fairseq(save_fairseq(tmp_path / "asda.pt", with_ema(w)), tmp_path / "out.pt")
    imported = load_encoder(tmp_path / "out.pt").config
    preset = ASDAConfig.preset("release")
    for field, value in RELEASE.items():
        if field not in ("loss_reduction", "alpha"):  # the objective is not in an encoder checkpoint
            assert getattr(imported, field) == value == getattr(preset, field), field
    assert (preset.embed_dim, preset.depth, preset.num_heads, preset.loss_reduction, preset.alpha) == (
        768, 12, 12, "release", 0.5)
    assert (preset.diff_lambda, preset.lambda_init) == (0.1, 0.05)


def test_the_release_presets_cls_is_drawn_from_a_unit_normal():
    torch.manual_seed(0)
    wide = ASDAEncoder(ASDAConfig.preset("release", depth=1, average_top_k_layers=1)).cls_token.detach().flatten()
    assert 0.9 < float(wide.std()) < 1.1 and float(wide.abs().max()) > 2.0  # untruncated: 768 draws pass 2σ
    base = ASDAEncoder(ASDAConfig(depth=1, average_top_k_layers=1)).cls_token.detach().flatten()
    assert 0.015 < float(base.std()) < 0.025
