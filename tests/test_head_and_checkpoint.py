import hashlib

import pytest
import torch

from model import (
    ASDA,
    ASDAClassifier,
    ASDAConfig,
    ASDAEncoder,
    load_checkpoint,
    load_encoder,
    param_groups_layer_decay,
    param_groups_weight_decay,
    save_checkpoint,
)

TINY = ASDAConfig.tiny(depth=3, average_top_k_layers=3, target_length=64)


def test_classifier_gives_logits_per_class():
    clf = ASDAClassifier(TINY, num_classes=7)
    assert clf(torch.randn(2, 64, 128)).shape == (2, 7)


def test_layer_decay_scales_block_i_by_decay_to_the_depth_minus_i():
    clf = ASDAClassifier(TINY, num_classes=3)
    groups = param_groups_layer_decay(clf, weight_decay=0.05, layer_decay=0.65)
    scale_of = {}
    for g in groups:
        for p in g["params"]:
            scale_of[id(p)] = (g["lr_scale"], g["weight_decay"])
    named = dict(clf.named_parameters())
    for i in range(3):
        assert scale_of[id(named[f"encoder.blocks.{i}.mlp.fc1.weight"])] == (pytest.approx(0.65 ** (3 - i)), 0.05)
        assert scale_of[id(named[f"encoder.blocks.{i}.mlp.fc1.bias"])][1] == 0.0
    assert scale_of[id(named["head.linear.weight"])] == (1.0, 0.05)
    assert scale_of[id(named["encoder.patch_embed.proj.weight"])][0] == 1.0
    assert scale_of[id(named["encoder.cls_token"])] == (1.0, 0.0)
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_no_weight_decay_on_biases_norms_and_lambda_vectors():
    model = ASDA(ASDAConfig.tiny(learnable_lambda=True))
    decay, no_decay = param_groups_weight_decay(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim > 1 for p in decay["params"])
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "student.blocks.0.attn.lambda_q1" in no_decay_names
    assert "student.blocks.0.norm1.weight" in no_decay_names
    assert not any(n.startswith("teacher.") for n in no_decay_names | {names[id(p)] for p in decay["params"]})


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = ASDA(TINY)
    model.update_teacher()
    path = save_checkpoint(tmp_path / "ckpt" / "model.pt", model, TINY, step=5)
    state, config = load_checkpoint(path)
    assert config == TINY and state["step"] == 5
    restored = ASDA(config)
    restored.load_state_dict(state["model"])
    for (n, a), b in zip(model.state_dict().items(), restored.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    assert not list(tmp_path.glob("ckpt/*.tmp"))
    torch.load(path, weights_only=True)  # loadable by anyone with the safe loader


def test_load_encoder_picks_student_or_teacher(tmp_path):
    model = ASDA(TINY)
    with torch.no_grad():
        model.student.cls_token.add_(1.0)
    path = save_checkpoint(tmp_path / "m.pt", model, TINY)
    assert torch.equal(load_encoder(path, "student").cls_token, model.student.cls_token)
    assert torch.equal(load_encoder(path, "teacher").cls_token, model.teacher.cls_token)
    clf_path = save_checkpoint(tmp_path / "c.pt", ASDAClassifier(TINY, 3), TINY)
    assert load_encoder(clf_path).cls_token.shape == (1, 1, TINY.embed_dim)


def test_corrupt_or_missing_checkpoint_names_the_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_checkpoint_changed_after_saving_is_refused_naming_the_file(tmp_path):
    config = ASDAConfig.tiny(depth=1, average_top_k_layers=1)
    path = save_checkpoint(tmp_path / "final.pt", ASDAEncoder(config), config, step=3)
    assert (tmp_path / "final.pt.sha256").read_text().strip() == hashlib.sha256(path.read_bytes()).hexdigest()
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):  # same size, a torch.load that may still succeed
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"checkpoint {path} is corrupt: its sha256 differs"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="is corrupt"):
        load_encoder(path)
