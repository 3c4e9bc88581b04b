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
    fbank_noise,
    gain_shift,
    label_smoothing,
    mixup,
    optimiser_step,
    roll_gain,
    spec_augment,
)
from pipelines.recipes import RECIPES, resolve

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
                                specaug_freq=0.5, noise=False)

    def run(stages):
        torch.manual_seed(3)  # the Beta draw
        return stages(torch.Generator().manual_seed(7))

    got, _ = run(lambda g: augment(x, y, torch.full((6,), 32), settings, norm_std=1.0, generator=g))
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


def test_roll_gain_rolls_each_clips_own_frames_and_shifts_them_by_log_gain_over_std_leaving_the_padding():
    """Row 0 has 6 frames of its own and 4 of padding, row 1 all 10: the frames are rolled within the clip and
    shifted by one constant, the padding (the release pads after its fbank) stays as it was."""
    x = torch.arange(10.0).view(1, 10, 1).expand(2, 10, 3).contiguous()
    x[0, 6:] = -7.0  # padding, as normalised zeros would be
    out = roll_gain(x, torch.tensor([6, 10]), norm_std=2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[0, 6:], x[0, 6:])
    for row, n in ((0, 6), (1, 10)):
        own = out[row, :n]
        shift = own - own.round()  # |ln g| / 2 < 0.5 for g in [0.5, 1.5]
        assert torch.allclose(shift, shift[0, 0].expand_as(shift), atol=1e-6)
        assert sorted((own - shift).round()[:, 0].tolist()) == list(range(n))
        rolled = (own - shift).round()[:, 0]
        assert torch.equal(rolled, torch.roll(torch.arange(float(n)), int((rolled == 0).nonzero()[0])))


def test_a_waveform_gain_moves_normalised_log_mel_by_log_gain_over_std_not_twice_that():
    """The release scales the waveform before its fbank: computed through model.fbank, the normalised log-mel of
    g·w minus that of w is ln g / std wherever the band has energy (Kaldi floors silent bands)."""
    from model import fbank

    torch.manual_seed(0)
    wave = torch.randn(16000) * 0.1
    mean, std = -4.0, 4.5
    for g in (0.6, 1.4):
        moved = fbank(wave * g, 16000, target_length=96, mean=mean, std=std) - fbank(wave, 16000, target_length=96,
                                                                                    mean=mean, std=std)
        floored = (moved == 0).all(0)  # mel bands no FFT bin falls in at 128 bins: Kaldi's floor, both times
        assert floored.sum() <= 4
        shift = gain_shift(torch.tensor(g), std)
        assert torch.allclose(moved[:, ~floored], shift.expand(96, int((~floored).sum())), atol=1e-4)
        assert (moved[:, ~floored] - 2 * shift).abs().min() > 0.05  # |ln g| / std: 0.11 and 0.075


def test_spec_augment_draws_its_masks_as_torchaudios_iid_frequency_then_time_masking():
    """The release: FrequencyMasking(128 x ratio, iid_masks=True), then TimeMasking(T x ratio, iid_masks=True), on
    (B, 1, F, T). With the same global seed the masks are the same, bit for bit."""
    import torchaudio

    x = torch.randn(8, 64, 128) + 3.0  # (B, T, F): no zeros of its own
    for time, freq in ((0.2, 0.2), (0.4, 0.4)):
        torch.manual_seed(5)
        got = spec_augment(x, time, freq)
        torch.manual_seed(5)
        spec = x.transpose(1, 2).unsqueeze(1)  # (B, 1, F, T)
        spec = torchaudio.transforms.FrequencyMasking(128 * freq, iid_masks=True)(spec)
        spec = torchaudio.transforms.TimeMasking(64 * time, iid_masks=True)(spec)
        assert torch.equal(got, spec.squeeze(1).transpose(1, 2))
    torch.manual_seed(0)
    widths = [(spec_augment(x, 0.0, 0.4)[i, 0] == 0).sum().item() for _ in range(50) for i in range(8)]
    assert max(widths) <= int(128 * 0.4) and max(widths) > 40  # widths up to ⌊51.2⌋, drawn from [0, 51.2)


def test_fbank_noise_adds_at_most_a_tenth_and_rolls_by_at_most_ten_frames():
    x = torch.zeros(64, 40, 8)
    x[:, 20] = 100.0  # a marker frame
    out = fbank_noise(x, torch.Generator().manual_seed(0))
    marker = out.mean(2).argmax(1) - 20
    assert marker.min() >= -10 and marker.max() <= 9 and len(set(marker.tolist())) > 10
    noise = out - torch.stack([torch.roll(row, int(k), 0) for row, k in zip(x, marker, strict=True)])
    assert noise.min() >= 0 and noise.max() < 0.1 and noise.amax((1, 2)).std() > 0.01  # a scale per clip


def test_label_smoothing_is_off_under_mixup_as_the_releases_mixup_target():
    assert label_smoothing(FinetuneSettings(data="-", label_smoothing=0.1, mixup=0.0)) == 0.1
    assert label_smoothing(FinetuneSettings(data="-", label_smoothing=0.1, mixup=0.8)) == 0.0
    assert RECIPES["spc2"]["label_smoothing"] == 0.1 and RECIPES["spc2"]["mixup"] == 0.8  # as its script says


def test_fine_tuning_does_not_clip_gradients_unless_asked():
    """grad_clip 0 (every recipe's): the step uses the whole gradient; grad_clip 1: it is scaled to norm 1."""
    def step(grad_clip):
        torch.manual_seed(0)
        layer = torch.nn.Linear(4, 1)
        params = list(layer.parameters())
        optimiser = torch.optim.SGD(params, lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda _: 1.0)
        before = [p.detach().clone() for p in params]
        norm = optimiser_step(layer(torch.full((2, 4), 100.0)).sum(), params, optimiser, scheduler, grad_clip)
        moved = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params, strict=True)])
        return float(norm), float(moved.norm())

    norm, moved = step(0.0)
    assert norm > 100 and moved == pytest.approx(norm, rel=1e-5)
    assert step(1.0)[1] == pytest.approx(1.0, rel=1e-5)
    assert all(recipe["grad_clip"] == 0.0 for recipe in RECIPES.values())


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
    assert balanced_draw(FinetuneSettings(data="unused", split="train"), card) is None
    assert balanced_draw(FinetuneSettings(data="unused", split="train"), {**card, "name": "esc50"}) is None
    forced = FinetuneSettings(data="unused", balanced_sampling=True, steps=1, batch_size=4, split="train")
    assert balanced_draw(forced, card) == BalancedDraw(per_pass=20, passes=2)


@pytest.mark.ray
def test_fine_tuning_feeds_the_data_sets_length_not_the_checkpoints(synthetic_prepared, tracking_store, tmp_path,
                                                                     capsys):
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
    # the recipe it resolved (the synthetic set's: none) is logged field by field, the given fields kept
    assert (params["train.recipe"], params["train.grad_clip"], params["train.lr"]) == ("none", "0.0", "0.0002")
    assert (params["train.steps"], params["train.batch_size"], params["train.min_lr_ratio"]) == ("2", "4", "0.005")
    assert "recipe none: lr 0.0002" in capsys.readouterr().out


def _card(name: str) -> dict:
    return {"name": name, "multilabel": name == "audioset", "splits": {"train": 100, "unbalanced": 1000}}


@pytest.mark.parametrize("name, split, recipe", [
    ("audioset", None, "as20k"), ("audioset", "unbalanced", "as2m"), ("esc50", None, "esc50"),
    ("speechcommands", None, "spc2"), ("synthetic", None, "none"), ("folder", None, "none")])
def test_the_data_sets_release_recipe_is_the_default(name, split, recipe):
    settings, chosen, taken = resolve(FinetuneSettings(data="-", split=split), _card(name))
    assert chosen == recipe == settings.recipe
    expected = RECIPES[recipe]
    for field in ("lr", "batch_size", "steps", "warmup_steps", "mixup", "specaug_time", "specaug_freq", "noise"):
        assert getattr(settings, field) == expected[field], field
    assert settings.grad_clip == 0.0 and (split is None) == ("split" in taken)


def test_the_release_recipes_are_its_scripts():
    """finetuning_{AS20K,AS2M,ESC50,SPC2}.sh over config/finetuning.yaml."""
    table = {"as20k": (5e-5, 32, 60_000, 6_000, 0.8, 0.2, "bce"), "as2m": (5e-5, 48, 600_000, 60_000, 0.8, 0.2, "bce"),
             "esc50": (5e-5, 48, 4_000, 400, 0.0, 0.4, "ce"), "spc2": (2e-4, 256, 80_000, 8_000, 0.8, 0.2, "bce_clip")}
    for name, (lr, batch, steps, warmup, mix, mask, loss) in table.items():
        r = RECIPES[name]
        assert (r["lr"], r["batch_size"], r["steps"], r["warmup_steps"], r["mixup"], r["specaug_time"],
                r["specaug_freq"], r["loss"], r["min_lr"]) == (lr, batch, steps, warmup, mix, mask, mask, loss, 1e-6)
    assert RECIPES["spc2"]["noise"] and not any(RECIPES[n]["noise"] for n in ("as20k", "as2m", "esc50"))
    assert RECIPES["as2m"]["split"] == "unbalanced"


def test_a_given_field_overrides_the_recipe_and_the_warm_up_keeps_its_share_of_a_shorter_run():
    settings, _, taken = resolve(FinetuneSettings(data="-", steps=1000, lr=1e-4, mixup=0.0), _card("speechcommands"))
    assert (settings.steps, settings.lr, settings.mixup) == (1000, 1e-4, 0.0)
    assert settings.warmup_steps == 100 and "warmup_steps" in taken  # 8 k of 80 k
    assert settings.batch_size == 256 and settings.min_lr_ratio == pytest.approx(1e-6 / 1e-4)  # 1e-6 absolute
    assert "lr" not in taken and "steps" not in taken
    generic, _, _ = resolve(FinetuneSettings(data="-", recipe="none"), _card("esc50"))
    assert (generic.lr, generic.min_lr_ratio, generic.steps) == (2e-4, 0.005, 200)
    other, name, _ = resolve(FinetuneSettings(data="-", recipe="esc50"), _card("synthetic"))
    assert name == "esc50" and other.specaug_time == 0.4


def test_an_unknown_recipe_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"recipe='as20' is not allowed: expected one of \['auto', 'as20k', 'as2m', "
                                         r"'esc50', 'spc2', 'none'\]"):
        FinetuneSettings(data="-", recipe="as20")
