"""Fine-tuning follows the release's recipe (SPEC §5): one test per property of it."""

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import ASDAClassifier, ASDAConfig
from pipelines.data.feed import (
    BalancedDraw,
    balanced_keep,
    class_weights,
    clip_weights,
    inclusion_scale,
)
from pipelines.finetune import (
    FinetuneSettings,
    augment,
    balanced_draw,
    build_optimiser,
    classification_loss,
    default_loss,
    mixup,
    roll_gain,
    spec_augment,
)

TINY = ASDAConfig.tiny(depth=3, average_top_k_layers=3, target_length=64, pos_embed="learned1d")


def _lr_scale_by_name(optimiser, model) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["lr"] / 1e-3 for g in optimiser.param_groups for p in g["params"]}


def test_layer_decay_scales_the_blocks_only_everything_else_trains_at_the_base_rate():
    model = ASDAClassifier(TINY, num_classes=5)
    settings = FinetuneSettings(data="unused", checkpoint="pretrained.pt", lr=1e-3, layer_decay=0.65)
    scale = _lr_scale_by_name(build_optimiser(model, settings, depth=3), model)
    for i in range(3):
        assert scale[f"encoder.blocks.{i}.mlp.fc1.weight"] == pytest.approx(0.65 ** (3 - i))
    outside = [n for n in scale if ".blocks." not in n]
    assert {n.split(".")[1] for n in outside} >= {"patch_embed", "cls_token", "pos_embed", "norm_input", "linear"}
    assert all(scale[n] == pytest.approx(1.0) for n in outside), {n: scale[n] for n in outside}


def test_fine_tuning_from_scratch_has_no_layer_decay():
    model = ASDAClassifier(TINY, num_classes=5)
    settings = FinetuneSettings(data="unused", checkpoint=None, lr=1e-3, layer_decay=0.65)
    scale = _lr_scale_by_name(build_optimiser(model, settings, depth=3), model)
    assert all(v == pytest.approx(1.0) for v in scale.values()), scale


def test_mixup_runs_before_spec_augment_so_masked_bands_stay_zero():
    x, y = torch.randn(6, 32, 16), torch.eye(6)
    settings = FinetuneSettings(data="unused", mixup=0.8, mixup_prob=1.0, roll_gain=False, specaug_time=0.5,
                                specaug_freq=0.5)

    def run(stages):
        torch.manual_seed(3)  # the Beta draw
        return stages(torch.Generator().manual_seed(7))

    got, _ = run(lambda g: augment(x, y, settings, norm_std=1.0, generator=g))
    mixed_then_masked = run(lambda g: spec_augment(mixup(x, y, 0.8, 1.0, g)[0], 0.5, 0.5, g))
    masked_then_mixed = run(lambda g: mixup(spec_augment(x, 0.5, 0.5, g), y, 0.8, 1.0, g)[0])
    assert torch.equal(got, mixed_then_masked)
    assert not torch.equal(got, masked_then_mixed)


def test_mixup_is_applied_with_its_probability():
    x, y = torch.randn(4, 8, 4), torch.eye(4)
    generator = torch.Generator().manual_seed(0)
    mixed = sum(not torch.equal(mixup(x, y, 0.8, 0.9, generator)[0], x) for _ in range(2000))
    assert abs(mixed / 2000 - 0.9) < 0.03  # 4.5 standard deviations of a binomial share
    assert all(torch.equal(mixup(x, y, 0.8, 0.0, generator)[0], x) for _ in range(50))
    assert all(torch.equal(mixup(x, y, 0.0, 1.0, generator)[0], x) for _ in range(50))


def test_mixup_mixes_inputs_and_targets_with_the_reversed_batch_by_one_beta_weight():
    x, y = torch.randn(5, 8, 4), torch.eye(5)
    out_x, out_y = mixup(x, y, 0.8, 1.0, torch.Generator().manual_seed(1))
    lam = float(out_y[0, 0])  # clip 0 keeps lam of its own one-hot label, gets 1 - lam of clip 4's
    assert 0 < lam < 1
    torch.testing.assert_close(out_y, lam * y + (1 - lam) * y.flip(0))
    torch.testing.assert_close(out_x, lam * x + (1 - lam) * x.flip(0))
    assert out_y.sum(1).allclose(torch.ones(5))  # mixed, not smoothed


def test_roll_gain_rolls_in_time_and_shifts_by_log_gain_over_std():
    x = torch.arange(10.0).view(1, 10, 1).expand(1, 10, 3).contiguous()
    out = roll_gain(x, norm_std=2.0, generator=torch.Generator().manual_seed(0))
    shift = out - out.round()  # the gain's shift is one constant, |ln g| / 2 < 0.5 for g in [0.5, 1.5]
    assert torch.allclose(shift, shift[0, 0, 0].expand_as(shift), atol=1e-6)
    assert sorted((out - shift).round().flatten().tolist()) == sorted(x.flatten().tolist())


def test_head_is_layernorm_eps_1e_6_and_a_linear_from_a_std_002_normal_with_zero_bias():
    head = ASDAClassifier(ASDAConfig.tiny(embed_dim=768, depth=1, average_top_k_layers=1), num_classes=527).head
    assert head.norm.eps == 1e-6
    assert torch.equal(head.norm.weight, torch.ones(768)) and torch.equal(head.norm.bias, torch.zeros(768))
    weight = head.linear.weight.detach()
    assert weight.std().item() == pytest.approx(0.02, rel=0.02)  # 405k draws: the std is within 0.3 %
    assert weight.mean().abs().item() < 2e-4
    assert torch.equal(head.linear.bias, torch.zeros(527))


def _bce(logits, targets):
    p = torch.sigmoid(logits)
    return -(targets * torch.log(p) + (1 - targets) * torch.log(1 - p))


def test_audioset_bce_is_summed_and_divided_by_the_batchs_positive_labels():
    logits = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])  # 3 positive labels
    expected = _bce(logits, targets).sum() / 3
    assert classification_loss(logits, targets, "bce", 0.0) == pytest.approx(expected.item(), rel=1e-6)


def test_speech_commands_bce_is_summed_over_classes_and_averaged_over_clips():
    logits = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]])
    targets = torch.tensor([[0.7, 0.3, 0.0], [0.3, 0.7, 0.0]])  # mixed targets
    expected = _bce(logits, targets).sum() / 2
    assert classification_loss(logits, targets, "bce_clip", 0.0) == pytest.approx(expected.item(), rel=1e-6)


def test_esc50_cross_entropy_smooths_labels_by_a_tenth():
    logits = torch.randn(4, 50)
    index = torch.tensor([0, 7, 49, 3])
    expected = F.cross_entropy(logits, index, label_smoothing=0.1)
    got = classification_loss(logits, F.one_hot(index, 50).float(), "ce", 0.1)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_the_default_loss_follows_the_data_set():
    def card(name, multilabel=False):
        return {"name": name, "multilabel": multilabel}

    assert default_loss(card("audioset", True), mixup=0.8) == "bce"
    assert default_loss(card("speechcommands"), mixup=0.8) == "bce_clip"
    assert default_loss(card("speechcommands"), mixup=0.0) == "ce"
    assert default_loss(card("esc50"), mixup=0.0) == "ce"
    assert default_loss(card("synthetic", True), mixup=0.0) == "bce"


def test_class_balanced_weights_sum_a_clips_class_weights_of_1000_over_count():
    labels = [[0], [0, 1], [2], [0]]
    weights = class_weights([3, 1, 1])
    np.testing.assert_allclose(weights, [1000 / 3.01, 1000 / 1.01, 1000 / 1.01])
    np.testing.assert_allclose(clip_weights(labels, weights),
                               [1000 / 3.01, 1000 / 3.01 + 1000 / 1.01, 1000 / 1.01, 1000 / 3.01])


def test_a_balanced_pass_keeps_rare_classes_and_about_per_pass_clips_reproducibly():
    labels = [[0]] * 1000 + [[1]] * 10
    ids = [f"clip{i}" for i in range(len(labels))]
    weights = class_weights([1000, 10])
    scale = inclusion_scale(clip_weights(labels, weights), per_pass=100)
    # Rare clips are certain (c * 1000 / 10.01 >= 1), so 10 + 1000 * c * 1000 / 1000.01 = 100.
    assert scale == pytest.approx(0.09 * 1000.01 / 1000, rel=1e-6)
    keep = balanced_keep(ids, labels, weights=weights, scale=scale, seed=0, pass_index=0)
    assert keep[1000:].all() and abs(keep.sum() - 100) < 30  # Binomial(1000, 0.09) + 10: sd 9
    again = balanced_keep(ids, labels, weights=weights, scale=scale, seed=0, pass_index=0)
    order = list(range(len(ids)))
    random.Random(0).shuffle(order)
    shuffled = balanced_keep([ids[i] for i in order], [labels[i] for i in order], weights=weights, scale=scale,
                             seed=0, pass_index=0)
    assert np.array_equal(keep, again) and np.array_equal(keep[order], shuffled)
    other = balanced_keep(ids, labels, weights=weights, scale=scale, seed=0, pass_index=1)
    assert not np.array_equal(keep, other)


def test_balanced_sampling_is_on_by_default_only_for_audiosets_unbalanced_split():
    card = {"name": "audioset", "splits": {"train": 20, "unbalanced": 1000}}
    settings = FinetuneSettings(data="unused", split="unbalanced", steps=10, batch_size=48, clips_per_pass=200)
    assert balanced_draw(settings, card) == BalancedDraw(per_pass=200, passes=4)  # 480 draws in passes of 200, + 1
    assert balanced_draw(FinetuneSettings(data="unused"), card) is None
    assert balanced_draw(FinetuneSettings(data="unused"), {**card, "name": "esc50"}) is None
    forced = FinetuneSettings(data="unused", balanced_sampling=True, steps=1, batch_size=4)
    assert balanced_draw(forced, card) == BalancedDraw(per_pass=20, passes=2)


@pytest.mark.ray
def test_fine_tuning_feeds_the_data_sets_length_not_the_checkpoints(synthetic_prepared, tracking_store, tmp_path):
    """A checkpoint pretrained on 128 frames fine-tunes on the synthetic set's 256 (the sincos table extends), in
    class-balanced passes; the run records the length it fed."""
    from mlflow import MlflowClient

    from model import ASDA, save_checkpoint
    from pipelines.data.card import load_card
    from pipelines.finetune import finetune

    card_length = load_card(synthetic_prepared)["target_length"]
    config = ASDAConfig.tiny(embed_dim=64, depth=2, num_heads=4, average_top_k_layers=2, num_students=2,
                             decoder_layers=1, target_length=card_length // 2)
    checkpoint = save_checkpoint(tmp_path / "pretrained.pt", ASDA(config), config)
    settings = FinetuneSettings(data=str(synthetic_prepared), storage=str(tmp_path / "runs"), name="ft-length",
                                checkpoint=str(checkpoint), steps=2, batch_size=4, warmup_steps=1, log_every=1,
                                checkpoint_every=2, in_process=True, balanced_sampling=True, clips_per_pass=16)
    result = finetune(config, settings)
    params = MlflowClient().get_run(result["run_id"]).data.params
    assert params["data.target_length"] == str(card_length) == str(2 * config.target_length)
    assert params["model.target_length"] == str(config.target_length)
    assert 0 <= result["eval_accuracy"] <= 1
