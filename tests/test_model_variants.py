"""Every configurable variant builds, runs, produces finite losses and trains every parameter it should."""

import dataclasses

import pytest
import torch

from model import ASDA, ASDAConfig, ASDAEncoder

SMALL = ASDAConfig.tiny(embed_dim=64, depth=2, num_heads=4, target_length=64, average_top_k_layers=2,
                        decoder_layers=1)

VARIANTS = {
    "standard": dict(attention="standard"),
    "diff-fixed": dict(diff_lambda=0.3),
    "diff-lambda0": dict(diff_lambda=0.0),
    "diff-learnable": dict(learnable_lambda=True),
    "diff-headwise-rms": dict(diff_norm="headwise_rms"),
    "cls-middle": dict(cls_position="middle"),
    "cls-none": dict(cls_position="none"),
    "learned1d": dict(pos_embed="learned1d"),
    "students-1": dict(num_students=1),
    "students-4": dict(num_students=4),
    "students-16": dict(num_students=16),
}


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_variant_shapes_finite_losses_and_gradients(variant):
    config = dataclasses.replace(SMALL, **VARIANTS[variant])
    model = ASDA(config)
    fbank = torch.randn(2, config.target_length, 128)
    out = model(fbank)
    for key in ("loss", "loss_frame", "loss_utterance"):
        assert out[key].dim() == 0 and torch.isfinite(out[key]), key
    torch.testing.assert_close(out["loss"], config.alpha * out["loss_utterance"] + out["loss_frame"])
    out["loss"].backward()

    lambda_zero = config.attention == "differential" and not config.learnable_lambda and config.diff_lambda == 0
    for name, p in model.named_parameters():
        if name.startswith("teacher."):
            assert not p.requires_grad and p.grad is None, name
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if lambda_zero and name.endswith("attn.qkv.weight"):
            # rows [q1 | q2 | k1 | k2 | v]: q2 and k2 cannot get a gradient at λ = 0
            q1, q2, k1, k2, v = p.grad.split(64)
            q2k2, rest = torch.cat([q2, k2]), torch.cat([q1, k1, v])
            assert torch.count_nonzero(q2k2) == 0 and torch.count_nonzero(rest) > 0, name
        else:
            assert torch.count_nonzero(p.grad) > 0, f"{name} received no gradient"

    utterance, patches = model.student.extract_features(fbank)
    assert utterance.shape == (2, 64) and patches.shape == (2, config.num_patches, 64)
    assert torch.isfinite(utterance).all() and torch.isfinite(patches).all()


def test_encoder_accepts_shorter_inputs_than_target_length():
    enc = ASDAEncoder(SMALL)
    utterance, patches = enc.extract_features(torch.randn(3, 32, 128))
    assert utterance.shape == (3, 64) and patches.shape == (3, 2 * 8, 64)


def test_longer_input_than_a_learned_position_table_is_a_clear_error():
    enc = ASDAEncoder(dataclasses.replace(SMALL, pos_embed="learned1d"))
    with pytest.raises(ValueError, match="target_length"):
        enc.extract_features(torch.randn(1, 128, 128))


def test_fixed_sincos_table_extends_to_longer_inputs_and_agrees_on_the_shared_prefix():
    torch.manual_seed(0)
    enc = ASDAEncoder(SMALL).eval()
    x = torch.randn(1, 128, 128)
    longer = dataclasses.replace(SMALL, target_length=128)
    assert torch.equal(enc.pos_embed.codes(8 * 8), ASDAEncoder(longer).pos_embed.codes(8 * 8))
    assert enc.extract_features(x)[1].shape[1] == 8 * 8


def test_wrong_mel_bins_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expected fbank \(B, T, 128\)"):
        ASDAEncoder(SMALL).extract_features(torch.randn(1, 64, 80))


def test_cls_middle_sits_in_the_middle_of_the_sequence():
    enc = ASDAEncoder(dataclasses.replace(SMALL, cls_position="middle"))
    assert enc.cls_index(25) == 12
    # the CLS is inserted after positions: embed gives the patch tokens only
    tokens = enc.embed(torch.randn(1, 64, 128))
    assert tokens.shape == (1, 32, 64)


@pytest.mark.parametrize("attention, low, high", [("differential", 85e6, 93e6), ("standard", 70e6, 86e6)])
def test_base_encoder_parameter_count(attention, low, high):
    with torch.device("meta"):
        enc = ASDAEncoder(ASDAConfig(attention=attention))
    count = sum(p.numel() for p in enc.parameters())
    assert low <= count <= high, count


def test_eat_layout_has_85m_parameters():
    with torch.device("meta"):
        enc = ASDAEncoder(ASDAConfig(attention="standard", mlp_ratio=4.0))
    assert 84e6 <= sum(p.numel() for p in enc.parameters()) <= 86e6


def test_base_model_builds_on_the_meta_device():
    with torch.device("meta"):
        model = ASDA(ASDAConfig())
    decoder = sum(p.numel() for p in model.decoder.parameters())
    assert 2.4e6 <= decoder <= 2.8e6, decoder
