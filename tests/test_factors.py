"""Each factor a grid varies changes the computation it names, and nothing else: same weights, same input,
different output — and the parts the factor must not touch stay equal."""

import dataclasses
import math

import pytest
import torch

from model import ASDA, ASDAConfig, ASDAEncoder, read_out
from model.asda import objective_terms

SMALL = ASDAConfig.tiny(embed_dim=64, depth=2, num_heads=4, target_length=128, average_top_k_layers=2,
                        decoder_layers=1, num_students=2)


def _shared(config: ASDAConfig, reference: torch.nn.Module, cls=ASDAEncoder) -> torch.nn.Module:
    """A module of ``config`` carrying the weights of ``reference``."""
    model = cls(config)
    model.load_state_dict(reference.state_dict())
    return model.eval()


def _fbank(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, SMALL.target_length, 128, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pos_embed", ["sincos2d", "learned1d"])
def test_cls_head_and_middle_are_different_functions_with_shared_weights(pos_embed):
    torch.manual_seed(0)
    head = ASDAEncoder(dataclasses.replace(SMALL, pos_embed=pos_embed, cls_position="head")).eval()
    middle = _shared(dataclasses.replace(SMALL, pos_embed=pos_embed, cls_position="middle"), head)
    x = _fbank()
    with torch.no_grad():
        u_head, u_middle = head.extract_features(x)[0], middle.extract_features(x)[0]
    assert (u_head - u_middle).abs().max() > 1e-2 * u_head.abs().max()


def test_cls_none_drops_the_cls_token_and_pools_the_patches_with_the_same_weights():
    """cls_position: none takes the CLS token out of the sequence (the only weight it lacks) and makes the
    utterance vector the mean of the patch outputs; every other weight computes as it does with a CLS at the head."""
    torch.manual_seed(0)
    head = ASDAEncoder(dataclasses.replace(SMALL, cls_position="head")).eval()
    mean = ASDAEncoder(dataclasses.replace(SMALL, cls_position="none")).eval()
    missing, unexpected = mean.load_state_dict(head.state_dict(), strict=False)
    assert (missing, unexpected) == ([], ["cls_token"])
    x = _fbank()
    with torch.no_grad():
        utterance, patches = mean.extract_features(x)
        tokens = head.norm_input(head.embed(x))  # the head encoder's blocks over the patches alone
        for block in head.blocks:
            tokens, _ = block(tokens)
        u_head = head.extract_features(x)[0]
    assert torch.equal(patches, tokens) and torch.allclose(utterance, patches.mean(1))
    assert (u_head - utterance).abs().max() > 1e-2 * u_head.abs().max()


def test_cls_position_mean_is_read_as_none_with_a_warning_naming_the_readout():
    """An older config's cls_position "mean" still loads (as "none"), and the warning says where the release's mean
    pooling now lives."""
    with pytest.warns(UserWarning, match=r"cls_position='mean' is now called 'none'.*read-out 'mean'"):
        config = ASDAConfig.from_dict({**SMALL.to_dict(), "cls_position": "mean"})
    assert config.cls_position == "none" and config == dataclasses.replace(SMALL, cls_position="none")


def test_the_mean_readout_keeps_the_cls_in_the_sequence_and_averages_the_patch_outputs():
    """The release's PredictionMode.MEAN_POOLING: the model runs with its CLS (so the patch outputs are those of
    the CLS model), and the clip vector is the mean of the patch outputs, not of every token; the CLS read-out is
    the CLS's output. Same weights, same input: the two read-outs differ."""
    torch.manual_seed(0)
    head = ASDAEncoder(dataclasses.replace(SMALL, cls_position="head")).eval()
    x = _fbank()
    with torch.no_grad():
        tokens = head.norm_input(torch.cat([head.cls_token.expand(len(x), -1, -1)
                                            + head.pos_embed.cls_code(head.embed(x).shape[1]), head.embed(x)], 1))
        for block in head.blocks:
            tokens, _ = block(tokens)
        utterance, patches = head.extract_features(x)
        mean = read_out(utterance, patches, "mean")
    assert torch.allclose(mean, tokens[:, 1:].mean(1), atol=1e-6)
    assert not torch.allclose(mean, tokens.mean(1), atol=1e-3)  # the CLS's own output is not averaged in
    assert torch.allclose(read_out(utterance, patches, "cls"), tokens[:, 0], atol=1e-6)
    assert (mean - utterance).abs().max() > 1e-2
    with pytest.raises(ValueError, match=r"readout='max' is not allowed: expected one of \['cls', 'mean'\]"):
        read_out(utterance, patches, "max")


def test_cls_position_moves_only_the_cls_code_with_the_fixed_table():
    torch.manual_seed(0)
    head = ASDAEncoder(dataclasses.replace(SMALL, cls_position="head"))
    middle = _shared(dataclasses.replace(SMALL, cls_position="middle"), head)
    x = _fbank()
    assert torch.equal(head.embed(x), middle.embed(x))  # patch codes are the same
    assert not torch.allclose(head.pos_embed.cls_code(64), middle.pos_embed.cls_code(64))


@pytest.mark.parametrize("pos_embed", ["sincos2d", "learned1d"])
def test_the_cls_code_comes_from_the_full_layout_so_student_and_teacher_agree(pos_embed):
    enc = ASDAEncoder(dataclasses.replace(SMALL, pos_embed=pos_embed, cls_position="middle"))
    tokens = enc.embed(_fbank())  # (2, 64, D): 8 time columns x 8 frequency rows, the full input
    seen = []
    enc.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0][:, enc.cls_index(args[0].shape[1])]))
    enc.forward_tokens(tokens)
    enc.forward_tokens(tokens[:, :10], num_patches=tokens.shape[1])  # a masked view of the same input
    torch.testing.assert_close(seen[0], seen[1])


def test_learned_table_gives_the_cls_its_own_slot():
    enc = ASDAEncoder(dataclasses.replace(SMALL, pos_embed="learned1d", cls_position="middle"))
    P, F = SMALL.num_patches, SMALL.grid[1]
    middle_row = (SMALL.grid[0] // 2) * F
    assert enc.pos_embed.table.shape[0] == P + 1
    assert enc.pos_embed.cls_row(P) == middle_row
    zeros = torch.zeros(1, P, SMALL.embed_dim)
    rows = enc.pos_embed(zeros)[0]
    torch.testing.assert_close(rows[middle_row - 1], enc.pos_embed.table[middle_row - 1])  # before: own index
    torch.testing.assert_close(rows[middle_row], enc.pos_embed.table[middle_row + 1])  # after: one up


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5])
def test_lambda_changes_only_the_subtracted_map(lam):
    """Every λ cell computes out_proj(norm(A1 v − λ A2 v) · (1 − 0.05)) with the same weights."""
    torch.manual_seed(0)
    reference = ASDAEncoder(dataclasses.replace(SMALL, diff_lambda=0.3))
    enc = _shared(dataclasses.replace(SMALL, diff_lambda=lam), reference)
    attn = enc.blocks[0].attn
    assert attn.lambda_init == reference.blocks[0].attn.lambda_init == 0.05
    x = torch.randn(2, 9, SMALL.embed_dim, dtype=torch.float64)
    attn.double()
    a1, a2, _ = attn.attention_maps(x)
    v = attn.project_qkv(x)[-1]
    o = ((a1 - lam * a2) @ v).transpose(1, 2).reshape(2, 9, SMALL.embed_dim)
    torch.testing.assert_close(attn(x), attn.out_proj(attn.norm(o) * 0.95))


def test_lambda_cells_give_different_features_with_shared_weights():
    torch.manual_seed(0)
    reference = ASDAEncoder(dataclasses.replace(SMALL, diff_lambda=0.0)).eval()
    x = _fbank()
    with torch.no_grad():
        outs = [_shared(dataclasses.replace(SMALL, diff_lambda=lam), reference).extract_features(x)[0]
                for lam in (0.0, 0.3, 0.5)]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


def _losses(config: ASDAConfig, reference: ASDA, seed: int = 3) -> dict[str, torch.Tensor]:
    model = _shared(config, reference, cls=ASDA)
    torch.manual_seed(seed)  # the same masks and mask noise
    with torch.no_grad():
        return model(_fbank(1))


def test_alpha_weighs_the_utterance_term_and_touches_nothing_else():
    torch.manual_seed(0)
    reference = ASDA(SMALL)
    a, b = _losses(dataclasses.replace(SMALL, alpha=0.5), reference), _losses(dataclasses.replace(SMALL, alpha=2.0),
                                                                            reference)
    assert torch.equal(a["loss_frame"], b["loss_frame"]) and torch.equal(a["loss_utterance"], b["loss_utterance"])
    torch.testing.assert_close(b["loss"] - a["loss"], 1.5 * a["loss_utterance"])


def test_student_count_changes_the_views_not_the_targets():
    torch.manual_seed(0)
    reference = ASDA(SMALL)
    x = _fbank(1)
    targets = [_shared(dataclasses.replace(SMALL, num_students=s), reference, cls=ASDA).teacher_targets(x)
               for s in (1, 4)]
    assert torch.equal(*targets)
    one, four = (_losses(dataclasses.replace(SMALL, num_students=s, loss_reduction="mean"), reference)
                 for s in (1, 4))
    assert not torch.equal(one["loss"], four["loss"])


def test_release_reduction_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    clones, patches, dim = 3, 6, 4
    pred, target = torch.randn(clones, patches, dim, generator=g), torch.randn(clones, patches, dim, generator=g)
    mask = torch.rand(clones, patches, generator=g) > 0.4
    u, ut = torch.randn(clones, dim, generator=g), torch.randn(clones, dim, generator=g)
    frame_sum, masked = 0.0, 0
    for i in range(clones):
        for p in range(patches):
            if mask[i, p]:
                masked += 1
                frame_sum += sum((pred[i, p, c] - target[i, p, c]).item() ** 2 for c in range(dim)) / math.sqrt(dim)
    utt_sum = sum((u[i, c] - ut[i, c]).item() ** 2 for i in range(clones) for c in range(dim)) / math.sqrt(dim)
    frame, utt = objective_terms(pred, target, mask, u, ut, "release")
    assert frame.item() == pytest.approx(frame_sum / masked, rel=1e-6)
    assert utt.item() == pytest.approx(utt_sum, rel=1e-6)
    frame_mean, utt_mean = objective_terms(pred, target, mask, u, ut, "mean")
    assert frame_mean.item() == pytest.approx(frame_sum / masked / dim, rel=1e-6)
    assert utt_mean.item() == pytest.approx(utt_sum / (clones * dim), rel=1e-6)


def test_release_reduction_weighs_the_utterance_term_by_clips_times_clones():
    torch.manual_seed(0)
    reference = ASDA(SMALL)
    release, mean = (_losses(dataclasses.replace(SMALL, loss_reduction=r), reference) for r in ("release", "mean"))
    D, clips, clones = SMALL.embed_dim, 2, SMALL.num_students
    torch.testing.assert_close(release["loss_frame"], D * mean["loss_frame"])
    torch.testing.assert_close(release["loss_utterance"], clips * clones * D * mean["loss_utterance"])
