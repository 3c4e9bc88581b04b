"""The pretraining update shared by the trainer and the benchmarks: the batched student pass computes what the
per-clone one did, the compiled model is the eager one (names, checkpoints, loss), precision and fused AdamW."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from model import ASDA, ASDAConfig, inverse_block_mask, read_state, save_checkpoint, visible_indices
from model.asda import objective_terms
from model.masking import split_indices
from model.pos_embed import SinCos2dPositionalEncoding, sincos_1d
from pipelines.pretrain import PretrainSettings
from pipelines.update import PretrainUpdate, build_optimiser, build_update, compile_model

SMALL = ASDAConfig.tiny(depth=2, average_top_k_layers=2, target_length=64, num_students=3)


def _reference_forward(model: ASDA, fbank: torch.Tensor) -> dict[str, torch.Tensor]:
    """The forward as it was before the student pass was batched, op for op: per-layer instance norms summed in
    Python, the clip repeated per clone, the CLS code computed per call, boolean-mask indexing (nonzero), the
    mask tokens drawn inside the decoder, λ as a tensor. It draws its randomness in the same order (mask, then
    noise), so under the same seed it sees the same views."""
    c = model.config
    B, S, D = fbank.shape[0], c.num_students, c.embed_dim
    with torch.no_grad():
        _, _, layers = model.teacher.forward_tokens(model.teacher.embed(fbank), return_layer_targets=True)
        top = layers[-c.average_top_k_layers:]
        y = sum(F.instance_norm(t.float().transpose(1, 2)) for t in top) / len(top)
        y = F.layer_norm(y.transpose(1, 2), (D,))  # (B, P, D)
    tokens = model.student.embed(fbank)
    P = tokens.shape[1]
    grid = model.student.patch_embed.grid(fbank.shape[1])
    tokens = tokens.repeat_interleave(S, dim=0)  # (B·S, P, D)
    mask = inverse_block_mask(B * S, grid, mask_ratio=c.mask_ratio, block_size=c.mask_block_size,
                              adjust=c.mask_adjust)
    vis = visible_indices(mask)
    visible = tokens.gather(1, vis.unsqueeze(-1).expand(-1, -1, D))
    utterance, patches, _ = model.student.forward_tokens(visible, num_patches=P)
    decoder = model.decoder
    x = torch.randn(B * S, P, D, dtype=patches.dtype) * decoder.noise_std
    x = x.scatter(1, vis.unsqueeze(-1).expand(-1, -1, D), patches).transpose(1, 2).reshape(B * S, D, *grid)
    for block in decoder.blocks:
        x = x + block(x)
    pred = decoder.proj(x.flatten(2).transpose(1, 2))
    frame, utt = objective_terms(pred, y.repeat_interleave(S, dim=0), mask, utterance,
                                 y.mean(dim=1).repeat_interleave(S, dim=0), c.loss_reduction)
    return {"loss": c.alpha * utt + frame, "loss_frame": frame, "loss_utterance": utt}


def _loss_and_grads(model: ASDA, forward, fbank: torch.Tensor, seed: int):
    torch.manual_seed(seed)
    out = forward(fbank)
    model.zero_grad(set_to_none=True)
    out["loss"].backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("overrides", [
    {},
    {"cls_position": "middle", "pos_embed": "learned1d", "loss_reduction": "mean"},
    {"cls_position": "none", "learnable_lambda": True, "diff_norm": "headwise_rms"},
])
def test_the_batched_student_pass_gives_the_same_loss_and_gradients_as_the_per_clone_one(dtype, overrides):
    """Same weights, batch and seed: every loss term and every parameter's gradient equal the reference's.
    In float64 to 1e-12 (only a reordered sum could move them, by ~1e-16; a changed term moves them by far more),
    in float32 to float32 rounding."""
    config = dataclasses.replace(SMALL, **overrides)
    torch.manual_seed(0)
    model = ASDA(config).to(dtype)
    reference = copy.deepcopy(model)
    fbank = torch.randn(2, config.target_length, config.num_mel_bins, dtype=dtype)
    out, grads = _loss_and_grads(model, model, fbank, seed=5)
    ref_out, ref_grads = _loss_and_grads(reference, lambda x: _reference_forward(reference, x), fbank, seed=5)
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-7}
    for key in ("loss", "loss_frame", "loss_utterance"):
        torch.testing.assert_close(out[key], ref_out[key], **tol)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], **tol, msg=name)


def test_views_drawn_before_the_forward_are_the_ones_it_would_draw():
    torch.manual_seed(0)
    model = ASDA(SMALL)
    fbank = torch.randn(2, 64, 128)
    torch.manual_seed(3)
    inside = model(fbank)
    torch.manual_seed(3)
    views = model.draw_views(fbank)
    given = model(fbank, views)
    assert torch.equal(inside["loss"], given["loss"])
    B, S, P = 2, SMALL.num_students, SMALL.num_patches
    keep = int(P * (1 - SMALL.mask_ratio))
    assert views.visible.shape == (B * S, keep) and views.masked.shape == (B * S, P - keep)
    assert views.noise.shape == (B * S, P, SMALL.embed_dim)


def test_split_indices_are_the_kept_and_masked_cells_in_order():
    mask = inverse_block_mask(6, (8, 8), generator=torch.Generator().manual_seed(0))
    keep = int(64 * 0.2)
    visible, masked = split_indices(mask, keep)
    assert torch.equal(visible, visible_indices(mask))
    assert torch.equal(masked, mask.nonzero()[:, 1].view(6, -1))


@pytest.mark.parametrize("cls_position", ["head", "middle"])
def test_the_cached_cls_code_is_the_formula_at_every_length(cls_position):
    enc = SinCos2dPositionalEncoding(128, (16, 8), cls_position)
    for num_patches in (8, 64, 128, 256, 512):  # 256 and 512 lie beyond the table: computed on demand
        column = {"head": -1, "middle": (num_patches // 8) // 2}[cls_position]
        time = sincos_1d(torch.tensor([float(column)]), 64)[0]
        assert torch.equal(enc.cls_code(num_patches), torch.cat([torch.zeros_like(time), time]))


def test_the_model_traces_as_one_graph_so_compile_never_falls_back_to_python():
    """No graph break (fullgraph=True): no data-dependent shape, no host read in the forward."""
    for overrides in ({}, {"cls_position": "middle", "pos_embed": "learned1d"}):
        torch.manual_seed(0)
        model = ASDA(dataclasses.replace(SMALL, depth=1, average_top_k_layers=1, **overrides))
        fbank = torch.randn(2, 64, 128)
        views = model.draw_views(fbank)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        assert torch.equal(compiled(fbank, views)["loss"], model(fbank, views)["loss"])


def test_a_compiled_model_keeps_its_names_and_checkpoints_load_both_ways(tmp_path):
    """The compile plumbing of `asda pretrain --compile` (Dynamo and AOTAutograd without code generation):
    compiled in place, the state dict has no ``_orig_mod.`` prefix; a compiled run's checkpoint loads into an
    eager model and the reverse, and both then compute the same update."""
    config = dataclasses.replace(SMALL, depth=1, average_top_k_layers=1)
    torch.manual_seed(0)
    eager = ASDA(config)
    compiled = compile_model(copy.deepcopy(eager), backend="aot_eager")
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert not any("_orig_mod" in k for k in compiled.state_dict())
    settings = PretrainSettings(data="-", steps=10, warmup_steps=1)
    updates = {name: build_update(m, settings, torch.device("cpu")) for name, m in
               (("eager", eager), ("compiled", compiled))}
    fbank = torch.randn(2, 64, 128)
    for name, update in updates.items():
        torch.manual_seed(7)
        out, _ = update(fbank)
        save_checkpoint(tmp_path / f"{name}.pt", update.model, config, optimizer=update.optimiser.state_dict())
    # Each checkpoint into a model of the other kind, then one more update each: same loss.
    losses = {}
    for written, reader in (("compiled", "eager"), ("eager", "compiled")):
        torch.manual_seed(0)
        model = ASDA(config)
        if reader == "compiled":
            compile_model(model, backend="aot_eager")
        update = build_update(model, settings, torch.device("cpu"))
        state = read_state(tmp_path / f"{written}.pt")
        model.load_state_dict(state["model"])
        update.optimiser.load_state_dict(state["optimizer"])
        torch.manual_seed(8)
        losses[reader] = update(fbank)[0]["loss"]
    torch.testing.assert_close(losses["eager"], losses["compiled"], rtol=1e-5, atol=0)


@pytest.mark.slow
def test_the_compiled_update_matches_the_eager_one_on_the_tiny_preset():
    """torch.compile (Inductor, C++ on CPU) against eager, one update of the tiny preset from the same weights,
    batch and seed: the loss to rtol 1e-5, the gradient norm and the updated weights to float32 rounding.

    Why 1e-5: Inductor fuses and reorders float32 reductions (LayerNorm over 128 channels, softmax, the sums over
    the ~2e5 masked-patch elements of the frame term). A blocked sum of n terms errs by about log2(n)·eps ≈
    18 x 1.2e-7 ≈ 2e-6 relative; 1e-5 leaves 5x room, while any change of the function (a wrong mask, a lost
    term, a different λ) moves the loss by 1e-3 or more. Measured here: 9e-8."""
    config = ASDAConfig.tiny()
    torch.manual_seed(0)
    eager = ASDA(config)
    compiled = copy.deepcopy(eager)
    settings = PretrainSettings(data="-")
    updates = {"eager": build_update(eager, settings, torch.device("cpu")),
               "compiled": build_update(compiled, dataclasses.replace(settings, compile=True), torch.device("cpu"))}
    fbank = torch.randn(4, config.target_length, config.num_mel_bins)
    results = {}
    for name, update in updates.items():
        torch.manual_seed(1)
        results[name] = update(fbank)
    (out_e, norm_e), (out_c, norm_c) = results["eager"], results["compiled"]
    for key in ("loss", "loss_frame", "loss_utterance"):
        torch.testing.assert_close(out_c[key], out_e[key], rtol=1e-5, atol=0)
    torch.testing.assert_close(norm_c, norm_e, rtol=1e-4, atol=0)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_runs_the_update_and_keeps_float32_weights():
    torch.manual_seed(0)
    model = ASDA(SMALL)
    reference = copy.deepcopy(model)
    settings = PretrainSettings(data="-", precision="bf16")
    update = build_update(model, settings, torch.device("cpu"))
    assert update.precision == "bf16"
    fbank = torch.randn(2, 64, 128)
    torch.manual_seed(1)
    out, grad_norm = update(fbank)
    torch.manual_seed(1)
    plain = build_update(reference, dataclasses.replace(settings, precision="fp32"), torch.device("cpu"))(fbank)[0]
    assert torch.isfinite(grad_norm) and all(p.dtype == torch.float32 for p in model.parameters())
    # bf16 keeps 8 bits of mantissa: the same loss to a few percent, and not bitwise (autocast was on).
    torch.testing.assert_close(out["loss"], plain["loss"], rtol=0.05, atol=0)
    assert not torch.equal(out["loss"], plain["loss"])


def test_precision_defaults_to_the_device_and_adamw_is_fused_on_cpu_and_cuda():
    model = ASDA(SMALL)
    update = build_update(model, PretrainSettings(data="-"), torch.device("cpu"))
    assert update.precision == "fp32"
    assert all(g["fused"] for g in update.optimiser.param_groups)
    with torch.device("meta"):
        meta = ASDA(SMALL)
    assert not build_optimiser(meta, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95),
                               device=torch.device("meta")).defaults.get("fused")


@pytest.mark.parametrize("field, value, message", [
    ("compile", "yes", r"compile='yes' is not allowed: expected true or false"),
    ("compile", 1, r"compile=1 is not allowed: expected true or false"),
    ("precision", "fp16", r"precision='fp16' is not allowed: expected one of \('bf16', 'fp32'\)"),
])
def test_bad_compile_and_precision_settings_are_refused_by_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        PretrainSettings(data="-", **{field: value})


def test_an_update_refuses_an_unknown_precision():
    with pytest.raises(ValueError, match=r"precision='fp16' is not allowed"):
        PretrainUpdate(ASDA(SMALL), None, None, torch.device("cpu"), precision="fp16")
