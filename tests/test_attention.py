import math

import pytest
import torch

from model import DifferentialAttention, StandardAttention

DIM, HEADS = 64, 4


def _x(B=2, N=17, dtype=torch.float64):
    return torch.randn(B, N, DIM, dtype=dtype)


def _padding(B=2, N=17):
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[0, -5:] = True  # first sample: last 5 keys are padding
    return mask


@pytest.mark.parametrize("learnable", [False, True], ids=["fixed", "learnable"])
@pytest.mark.parametrize("norm", ["layernorm", "headwise_rms"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_sdpa_path_equals_explicit_maps_in_float64(learnable, norm, padded):
    attn = DifferentialAttention(DIM, HEADS, diff_lambda=0.3, learnable_lambda=learnable, layer_index=3,
                                 diff_norm=norm).double()
    x, kpm = _x(), (_padding() if padded else None)
    torch.testing.assert_close(attn(x, key_padding_mask=kpm), attn.forward_explicit(x, key_padding_mask=kpm))


def test_forward_is_the_documented_formula():
    attn = DifferentialAttention(DIM, HEADS, diff_lambda=0.5).double()
    x = _x()
    a1, a2, lam = attn.attention_maps(x)
    assert a1.shape == a2.shape == (2, HEADS, 17, 17) and lam.dim() == 0
    v = attn.project_qkv(x)[-1]
    o = ((a1 - lam * a2).double() @ v).transpose(1, 2).reshape(2, 17, DIM)
    expected = attn.out_proj(attn.norm(o) * (1 - attn.lambda_init))
    torch.testing.assert_close(attn(x), expected)


def test_lambda_zero_is_single_softmax_attention_by_hand():
    attn = DifferentialAttention(DIM, HEADS, diff_lambda=0.0).double()
    x = _x()
    q1, k1, _, _, v = attn.project_qkv(x)
    weights = torch.softmax(q1 @ k1.transpose(-2, -1) / math.sqrt(DIM // HEADS), dim=-1)
    o = (weights @ v).transpose(1, 2).reshape(2, 17, DIM)
    torch.testing.assert_close(attn(x), attn.out_proj(attn.norm(o) * (1 - 0.05)))


def test_lambda_zero_gives_q2_k2_no_gradient():
    attn = DifferentialAttention(DIM, HEADS, diff_lambda=0.0)
    attn(_x(dtype=torch.float32)).square().sum().backward()
    grad = attn.qkv.weight.grad  # rows: [q1 | q2 | k1 | k2 | v]
    q1, q2, k1, k2, v = grad.split(DIM, dim=0)
    assert torch.count_nonzero(q2) == 0 and torch.count_nonzero(k2) == 0
    assert all(torch.count_nonzero(g) > 0 for g in (q1, k1, v))


def test_padded_keys_do_not_change_valid_outputs():
    attn = DifferentialAttention(DIM, HEADS, diff_lambda=0.3).double()
    x, kpm = _x(), _padding()
    y = attn(x, key_padding_mask=kpm)
    x2 = x.clone()
    x2[0, -5:] = torch.randn(5, DIM, dtype=torch.float64) * 10
    y2 = attn(x2, key_padding_mask=kpm)
    torch.testing.assert_close(y[0, :-5], y2[0, :-5])


def test_learnable_lambda_follows_its_reparameterisation():
    for layer in (0, 5, 11):
        attn = DifferentialAttention(DIM, HEADS, learnable_lambda=True, layer_index=layer)
        assert attn.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.3 * layer))
        expected = (torch.exp(attn.lambda_q1 @ attn.lambda_k1) - torch.exp(attn.lambda_q2 @ attn.lambda_k2)
                    + attn.lambda_init)
        torch.testing.assert_close(attn.lambda_value(), expected)
    attn(_x(dtype=torch.float32)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in (attn.lambda_q1, attn.lambda_k1, attn.lambda_q2, attn.lambda_k2))


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5])
def test_fixed_lambda_keeps_the_release_branch_scale(lam):
    attn = DifferentialAttention(DIM, HEADS, diff_lambda=lam)
    assert attn.lambda_init == 0.05 and float(attn.lambda_value()) == pytest.approx(lam)


def test_lambda_init_given_fixes_the_branch_scale_for_every_layer():
    layers = [DifferentialAttention(DIM, HEADS, learnable_lambda=True, layer_index=i, lambda_init=0.2)
              for i in range(3)]
    assert [a.lambda_init for a in layers] == [0.2, 0.2, 0.2]


def test_standard_attention_sdpa_equals_explicit_softmax():
    attn = StandardAttention(DIM, HEADS).double()
    x, kpm = _x(), _padding()
    a = attn.attention_maps(x, key_padding_mask=kpm)
    v = attn.project_qkv(x)[-1]
    expected = attn.out_proj((a.double() @ v).transpose(1, 2).reshape(2, 17, DIM))
    torch.testing.assert_close(attn(x, key_padding_mask=kpm), expected)


def test_differential_attention_has_the_release_parameter_layout():
    attn = DifferentialAttention(768, 12)
    assert attn.qkv.weight.shape == (5 * 768, 768)  # q and k 2·D wide each, v D wide
    assert attn.project_qkv(torch.randn(1, 3, 768))[0].shape == (1, 12, 3, 64)


def test_bad_lambda_is_rejected():
    with pytest.raises(ValueError, match=r"diff_lambda=1.2.*\[0, 1\)"):
        DifferentialAttention(DIM, HEADS, diff_lambda=1.2)
