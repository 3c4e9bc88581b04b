"""`asda import --from fairseq`: released EAT / ASDA checkpoints onto ASDAEncoder.

The checkpoints here are built with the releases' parameter names and shapes (EAT models/images.py, base.py,
modules.py; ASDA ASDA/models/modules.py) at a small width, saved as fairseq saves them (a dict with "model" and a
"cfg" that pickles the release's own enum), and the imported encoder is compared with a forward pass written below
directly from those tensors.
"""

import enum
import json
import math
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import load_checkpoint, load_encoder
from model.checkpoint import save_checkpoint
from model.fairseq import Placeholder, import_fairseq, load_fairseq_checkpoint, map_weights
from model.pos_embed import SinCos2dPositionalEncoding
from pipelines.cli import main

D, DEPTH, HEADS, PATCH = 64, 2, 4, 16
COLUMNS = 16  # time columns of the release's positional table (max_length; 768 in the release)
FRAMES = 64  # 4 time columns x 8 frequency rows = 32 patches
ENC = "modality_encoders.IMAGE."


# --------------------------------------------------------------------------------------------- the release
def release_positions(columns: int, dim: int) -> torch.Tensor:
    """The release's table (models/mae.py, get_2d_sincos_pos_embed_flexible) in numpy float32: (1, columns·8, dim),
    time-major rows, channels [frequency sin | frequency cos | time sin | time cos]."""
    def one(half: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(half // 2, dtype=np.float32)
        omega /= half / 2.0
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    freq, time = np.meshgrid(np.arange(8, dtype=np.float32), np.arange(columns, dtype=np.float32))
    table = np.concatenate([one(dim // 2, freq), one(dim // 2, time)], axis=1)
    return torch.from_numpy(table).float().unsqueeze(0)


def release_weights(kind: str, *, dim: int = D, depth: int = DEPTH, heads: int = HEADS, learnable: bool = False,
                    subln: bool = False, decoder_layers: int = 2, seed: int = 0, meta: bool = False) -> dict:
    """A student state dict with the release's names and shapes (no _ema); ``meta``: shapes only, except the
    positional table."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.05, mean=0.0):
        if meta:
            return torch.empty(*shape, device="meta")
        return mean + torch.randn(*shape, generator=g) * std

    hidden = int(dim * (4.0 if kind == "eat" else 3.5))
    w = {f"{ENC}local_encoder.proj.weight": r(dim, 1, PATCH, PATCH), f"{ENC}local_encoder.proj.bias": r(dim),
         f"{ENC}extra_tokens": r(1, 1, dim, std=1.0),
         f"{ENC}fixed_positional_encoder.positions": release_positions(COLUMNS if not meta else 768, dim),
         f"{ENC}context_encoder.norm.weight": r(dim, mean=1.0), f"{ENC}context_encoder.norm.bias": r(dim)}
    for i in range(depth):
        b = f"blocks.{i}."
        for n in ("norm1", "norm2"):
            w[f"{b}{n}.weight"], w[f"{b}{n}.bias"] = r(dim, mean=1.0), r(dim)
        w[f"{b}mlp.fc1.weight"], w[f"{b}mlp.fc1.bias"] = r(hidden, dim, std=0.1), r(hidden)
        w[f"{b}mlp.fc2.weight"], w[f"{b}mlp.fc2.bias"] = r(dim, hidden, std=0.1), r(dim)
        w[f"{b}attn.proj.weight"], w[f"{b}attn.proj.bias"] = r(dim, dim, std=0.1), r(dim)
        if kind == "eat":
            w[f"{b}attn.qkv.weight"], w[f"{b}attn.qkv.bias"] = r(3 * dim, dim, std=0.3), r(3 * dim)
            continue
        w[f"{b}attn.qk.weight"], w[f"{b}attn.qk.bias"] = r(4 * dim, dim, std=0.3), r(4 * dim)
        w[f"{b}attn.v.weight"], w[f"{b}attn.v.bias"] = r(dim, dim, std=0.3), r(dim)
        if subln:
            w[f"{b}attn.subln.weight"] = r(dim // heads, mean=1.0)
        else:
            w[f"{b}attn.norm.weight"], w[f"{b}attn.norm.bias"] = r(dim, mean=1.0), r(dim)
        if learnable:
            for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                w[f"{b}attn.{n}"] = r(dim // heads, std=0.1)
    for j in range(decoder_layers):  # Decoder2d: Conv2d(D, D, 3, groups 16), SamePad2d, LayerNorm without affine
        w[f"{ENC}decoder.blocks.{j}.0.weight"], w[f"{ENC}decoder.blocks.{j}.0.bias"] = r(dim, dim // 16, 3, 3), r(dim)
    w[f"{ENC}decoder.proj.weight"], w[f"{ENC}decoder.proj.bias"] = r(dim, dim), r(dim)
    return w


def with_ema(student: dict, *, blocks_only: bool = False, seed: int = 1) -> dict:
    """The student plus its EMA teacher under _ema (Data2VecMultiModel.state_dict): the model without decoders
    (ema_encoder_only false, as EAT pretrains) or the blocks alone; values differ from the student's."""
    g = torch.Generator().manual_seed(seed)
    ema = {}
    for k, v in student.items():
        if ".decoder." in k:
            continue
        if blocks_only and not k.startswith("blocks."):
            continue
        moved = v if "positions" in k else v + 0.01 * torch.randn(v.shape, generator=g)
        ema[k[len("blocks."):] if blocks_only else k] = moved
    return {**student, "_ema": ema}


class RunsCode:
    """Pickles as a call of os.system: loading this must never run it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def save_fairseq(path, weights, *, dim=D, depth=DEPTH, heads=HEADS, cfg=True, layer_norm_first=False, extra=None):
    """Save as fairseq's trainer does: {"args": None, "cfg": to_container(cfg), "model": ..., ...}; the cfg holds
    an enum of the release's own module, which is gone when the file is read."""
    module = types.ModuleType("eat_release_models")

    class Modality(enum.Enum):
        AUDIO = 1
        IMAGE = 2
        TEXT = 3

    Modality.__module__, Modality.__qualname__ = module.__name__, "Modality"
    module.Modality = Modality
    sys.modules[module.__name__] = module
    try:
        config = {
            "common": {"seed": 1, "fp16": True},
            "task": {"_name": "mae_image_pretraining", "target_length": FRAMES},
            "model": {"_name": "data2vec_multi", "embed_dim": dim, "depth": depth, "num_heads": heads,
                      "mlp_ratio": 4.0, "norm_eps": 1e-6, "layer_norm_first": layer_norm_first,
                      "supported_modality": Modality.IMAGE, "clone_batch": 16, "cls_loss": 1.0,
                      "modalities": {"image": {"type": Modality.IMAGE, "patch_size": PATCH, "in_chans": 1,
                                               "target_length": FRAMES, "num_extra_tokens": 1, "prenet_depth": 0}}},
        }
        torch.save({"args": None, "cfg": config if cfg else None, "model": weights, "criterion": None,
                    "optimizer_history": [{"criterion_name": "ModelCriterion", "optimizer_name": "FairseqAdam",
                                           "lr_scheduler_state": {"best": None}, "num_updates": 10}],
                    "task_state": {}, "extra_state": {"previous_training_time": 1.5, **(extra or {})}}, path)
    finally:
        del sys.modules[module.__name__]
    return path


# --------------------------------------------------------------------------------------------- release forward
def release_attention(w, b, x, heads, kind, lam, lam_init, subln):
    """AltAttention of EAT (qkv) or ASDA (qk + v, two softmax maps, norm, · (1 − λ_init)), then proj."""
    B, N, C = x.shape
    d = C // heads

    def split(t):  # (B, N, C) -> (B, H, N, d)
        return t.reshape(B, N, heads, d).permute(0, 2, 1, 3)

    if kind == "eat":
        qkv = F.linear(x, w[f"{b}attn.qkv.weight"], w[f"{b}attn.qkv.bias"])
        qkv = qkv.reshape(B, N, 3, heads, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q * d ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        o = (attn @ v).transpose(1, 2).reshape(B, N, C)
    else:
        qk = F.linear(x, w[f"{b}attn.qk.weight"], w[f"{b}attn.qk.bias"]).reshape(B, N, 2, 2 * C).permute(2, 0, 1, 3)
        (q1, q2), (k1, k2) = (map(split, t.chunk(2, dim=-1)) for t in (qk[0], qk[1]))
        v = split(F.linear(x, w[f"{b}attn.v.weight"], w[f"{b}attn.v.bias"]))
        a1 = ((q1 * d ** -0.5) @ k1.transpose(-2, -1)).softmax(dim=-1)
        a2 = ((q2 * d ** -0.5) @ k2.transpose(-2, -1)).softmax(dim=-1)
        o = (a1 - lam * a2) @ v  # (B, H, N, d)
        if subln:  # the Differential Transformer's per-head RMSNorm
            o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * w[f"{b}attn.subln.weight"]
            o = o.transpose(1, 2).reshape(B, N, C) * (1 - lam_init)
        else:
            o = o.transpose(1, 2).reshape(B, N, C)
            o = F.layer_norm(o, (C,), w[f"{b}attn.norm.weight"], w[f"{b}attn.norm.bias"], 1e-5) * (1 - lam_init)
    return F.linear(o, w[f"{b}attn.proj.weight"], w[f"{b}attn.proj.bias"])


def release_forward(w, fbank, *, kind, heads=HEADS, lam=lambda i: 0.1, lam_init=lambda i: 0.05, subln=False):
    """ImageEncoder + Data2VecMultiModel blocks (layer_norm_first false) on (B, T, 128): (CLS output, patches)."""
    x = F.conv2d(fbank.unsqueeze(1), w[f"{ENC}local_encoder.proj.weight"], w[f"{ENC}local_encoder.proj.bias"],
                 stride=PATCH)  # (B, D, T/16, 8)
    x = x.flatten(2).transpose(1, 2)  # (B, P, D), time-major
    x = x + w[f"{ENC}fixed_positional_encoder.positions"][:, : x.shape[1]]
    x = torch.cat([w[f"{ENC}extra_tokens"].expand(len(x), -1, -1), x], dim=1)  # CLS first, no position
    C = x.shape[-1]
    x = F.layer_norm(x, (C,), w[f"{ENC}context_encoder.norm.weight"], w[f"{ENC}context_encoder.norm.bias"], 1e-6)
    depth = len({k.split(".")[1] for k in w if k.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}."
        x = x + release_attention(w, b, x, heads, kind, lam(i), lam_init(i), subln)
        r = x = F.layer_norm(x, (C,), w[f"{b}norm1.weight"], w[f"{b}norm1.bias"], 1e-6)
        x = F.linear(F.gelu(F.linear(x, w[f"{b}mlp.fc1.weight"], w[f"{b}mlp.fc1.bias"])),
                     w[f"{b}mlp.fc2.weight"], w[f"{b}mlp.fc2.bias"])
        x = F.layer_norm(r + x, (C,), w[f"{b}norm2.weight"], w[f"{b}norm2.bias"], 1e-6)
    return x[:, 0], x[:, 1:]


def spectrogram(batch=2, frames=FRAMES, seed=3):
    return torch.randn(batch, frames, 128, generator=torch.Generator().manual_seed(seed))


def assert_same_features(encoder, w, **release):
    x = spectrogram()
    with torch.no_grad():
        utterance, patches = encoder.extract_features(x)
        ref_utterance, ref_patches = release_forward(w, x, **release)
    assert patches.shape == ref_patches.shape == (2, FRAMES // PATCH * 8, D)
    torch.testing.assert_close(utterance, ref_utterance, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(patches, ref_patches, atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------- tests
def test_eat_student_loads_into_standard_attention_and_gives_the_release_features(tmp_path):
    w = release_weights("eat")
    src = save_fairseq(tmp_path / "eat.pt", with_ema(w))
    report = import_fairseq(src, tmp_path / "out.pt")
    encoder = load_encoder(tmp_path / "out.pt")
    c = encoder.config
    assert (c.attention, c.embed_dim, c.depth, c.num_heads, c.mlp_ratio, c.patch_size) == ("standard", D, DEPTH,
                                                                                           HEADS, 4.0, PATCH)
    assert (c.pos_embed, c.cls_position, c.layer_norm_eps, c.target_length) == ("sincos2d", "head", 1e-6, FRAMES)
    assert report["release"] == "EAT" and report["which"] == "student"
    assert_same_features(encoder, w, kind="eat")
    # The documented CLS difference: the stored CLS is the release's minus the positional code ours adds to it.
    code = SinCos2dPositionalEncoding(D, c.grid, "head").cls_code(c.num_patches)
    torch.testing.assert_close(encoder.cls_token.detach()[0, 0], w[f"{ENC}extra_tokens"][0, 0] - code)
    assert code.abs().max() > 0.5 and any("CLS" in d for d in report["differences"])


def test_asda_weights_load_into_differential_attention_with_the_release_constants(tmp_path):
    w = release_weights("asda")
    report = import_fairseq(save_fairseq(tmp_path / "asda.pt", with_ema(w)), tmp_path / "out.pt")
    encoder = load_encoder(tmp_path / "out.pt")
    c = encoder.config
    assert (c.attention, c.diff_lambda, c.lambda_init, c.learnable_lambda, c.diff_norm) == (
        "differential", 0.1, 0.05, False, "layernorm")
    assert c.mlp_ratio == 3.5  # the weights decide; the cfg's mlp_ratio 4.0 is what ASDA's AltBlock ignores
    assert report["release"] == "ASDA" and any("mlp_ratio" in n for n in report["notes"])
    qkv = encoder.blocks[1].attn.qkv.weight.detach()  # [q1 | q2 | k1 | k2 | v]
    torch.testing.assert_close(qkv, torch.cat([w["blocks.1.attn.qk.weight"], w["blocks.1.attn.v.weight"]]))
    assert_same_features(encoder, w, kind="asda")


def test_learnable_lambda_and_subln_map_onto_the_reparametrisation(tmp_path):
    """λ vectors and the per-head RMSNorm: each layer's λ is exp(λq1·λk1) − exp(λq2·λk2) + λ_init(layer)."""
    w = release_weights("asda", learnable=True, subln=True)
    import_fairseq(save_fairseq(tmp_path / "asda.pt", w), tmp_path / "out.pt")
    encoder = load_encoder(tmp_path / "out.pt")
    assert encoder.config.learnable_lambda and encoder.config.diff_norm == "headwise_rms"

    def lam_init(i):
        return 0.8 - 0.6 * math.exp(-0.3 * i)

    def lam(i):
        a = {n: w[f"blocks.{i}.attn.{n}"] for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")}
        return float(torch.exp((a["lambda_q1"] * a["lambda_k1"]).sum()) - torch.exp((a["lambda_q2"] * a["lambda_k2"]).sum())
                     + lam_init(i))

    for i, block in enumerate(encoder.blocks):
        assert block.attn.lambda_init == pytest.approx(lam_init(i))
        assert float(block.attn.lambda_value().detach()) == pytest.approx(lam(i), rel=1e-6)
    assert lam(0) != pytest.approx(lam(1))  # the layers' λ differ, so a mix-up would show
    assert_same_features(encoder, w, kind="asda", lam=lam, lam_init=lam_init, subln=True)


def test_every_checkpoint_key_is_accounted_for_and_the_report_is_written_beside(tmp_path, capsys):
    w = with_ema(release_weights("eat"))
    src = save_fairseq(tmp_path / "eat.pt", w)
    assert main(["import", "--from", "fairseq", str(src), "--out", str(tmp_path / "out.pt")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "out.pt.import.json").read_text())
    decoder = [k for k in w if ".decoder." in k]
    flat_total = len(w) - 1 + len(w["_ema"])
    assert report["checkpoint_keys"] == flat_total
    unused = report["unused"]
    assert set(unused) == {"_ema", f"{ENC}decoder"}
    assert unused["_ema"]["count"] == len(w["_ema"]) and "teacher" in unused["_ema"]["reason"]
    assert unused[f"{ENC}decoder"]["count"] == len(decoder) and "decoder" in unused[f"{ENC}decoder"]["reason"]
    accounted = report["mapped"]["checkpoint_keys"] + len(report["checked"]) + sum(g["count"] for g in unused.values())
    assert accounted == flat_total
    assert report["unfilled"] == []
    assert report["mapped"]["encoder_parameters"] == len(load_encoder(tmp_path / "out.pt").state_dict())
    assert list(report["checked"]) == [f"{ENC}fixed_positional_encoder.positions"]
    assert "eat_release_models.Modality" in report["placeholders"]
    assert f"{ENC}decoder: {len(decoder)} keys" in printed and "_ema:" in printed


def test_a_fine_tuned_checkpoint_gives_its_encoder_and_leaves_its_head(tmp_path):
    """EAT_audio_classification.py keeps the encoder under model. beside fc_norm and head."""
    w = release_weights("eat", decoder_layers=0)
    tuned = {f"model.{k}": v for k, v in w.items() if ".decoder." not in k}
    tuned.update({"fc_norm.weight": torch.ones(D), "fc_norm.bias": torch.zeros(D),
                  "head.weight": torch.zeros(527, D), "head.bias": torch.zeros(527)})
    report = import_fairseq(save_fairseq(tmp_path / "tuned.pt", tuned), tmp_path / "out.pt")
    assert report["kind"] == "fine-tuned"
    assert {g: u["count"] for g, u in report["unused"].items()} == {"fc_norm": 2, "head": 2}
    assert "head" in report["unused"]["head"]["reason"]
    assert_same_features(load_encoder(tmp_path / "out.pt"), w, kind="eat")


@pytest.mark.parametrize("blocks_only", [False, True])
def test_which_teacher_imports_the_ema_weights(tmp_path, blocks_only):
    student = release_weights("asda")
    w = with_ema(student, blocks_only=blocks_only)
    src = save_fairseq(tmp_path / "asda.pt", w)
    report = import_fairseq(src, tmp_path / "teacher.pt", which="teacher")
    encoder = load_encoder(tmp_path / "teacher.pt")
    ema = w["_ema"]
    block = "0.mlp.fc1.weight" if blocks_only else "blocks.0.mlp.fc1.weight"
    torch.testing.assert_close(encoder.blocks[0].mlp.fc1.weight.detach(), ema[block])
    conv = encoder.patch_embed.proj.weight.detach()
    if blocks_only:  # the release's teacher runs on the student's embedding
        torch.testing.assert_close(conv, student[f"{ENC}local_encoder.proj.weight"])
        assert report["notes"] and "student" in report["notes"][0]
    else:
        torch.testing.assert_close(conv, ema[f"{ENC}local_encoder.proj.weight"])
        assert report["unused"]["blocks"]["reason"].startswith("student")
        assert_same_features(encoder, ema, kind="asda")
    assert load_checkpoint(tmp_path / "teacher.pt")[0]["imported_from"]["which"] == "teacher"


@pytest.mark.parametrize("kind, params", [("eat", 85.3), ("asda", 92.4)])
def test_the_base_models_shapes_map_onto_the_base_encoder(kind, params):
    """Base width, depth and heads (shapes only, on the meta device): the config is the base model's and every
    encoder parameter gets a tensor of its shape."""
    w = release_weights(kind, dim=768, depth=12, heads=12, decoder_layers=6, meta=True)
    state = {"model": w, "cfg": {"model": {"num_heads": 12, "norm_eps": 1e-6, "layer_norm_first": False,
                                           "modalities": {"image": {"target_length": 1024}}}}}
    config, filled, report = map_weights(state)
    assert (config.embed_dim, config.depth, config.num_heads, config.target_length) == (768, 12, 12, 1024)
    assert config.mlp_ratio == (4.0 if kind == "eat" else 3.5)
    assert config.attention == ("standard" if kind == "eat" else "differential")
    from model import ASDAEncoder

    with torch.device("meta"):
        expected = {k: v.shape for k, v in ASDAEncoder(config).state_dict().items()}
    assert {k: v.shape for k, v in filled.items()} == expected
    assert round(sum(v.numel() for v in filled.values()) / 1e6, 1) == params
    assert report["unused"][f"{ENC}decoder"]["count"] == 2 * 6 + 2


def test_pickled_code_never_runs_and_pickled_classes_become_placeholders(tmp_path):
    marker = tmp_path / "ran"
    src = save_fairseq(tmp_path / "eat.pt", release_weights("eat"), extra={"hook": RunsCode(marker)})
    state, replaced = load_fairseq_checkpoint(src)
    assert not marker.exists()
    assert isinstance(state["extra_state"]["hook"], Placeholder)
    assert isinstance(state["cfg"]["model"]["supported_modality"], Placeholder)
    assert {"posix.system", "eat_release_models.Modality"} <= set(replaced)
    assert isinstance(state["model"]["blocks.0.attn.qkv.weight"], torch.Tensor)
    import_fairseq(src, tmp_path / "out.pt")
    assert not marker.exists()


def test_without_a_cfg_heads_are_assumed_and_an_override_sets_them(tmp_path):
    w = release_weights("eat")
    src = save_fairseq(tmp_path / "eat.pt", w, cfg=False)
    assumed = import_fairseq(src, tmp_path / "a.pt")
    assert assumed["config"]["num_heads"] == D // 64 and any("num_heads" in n for n in assumed["notes"])
    report = import_fairseq(src, tmp_path / "b.pt", overrides=[f"num_heads={HEADS}"])
    assert report["inferred"]["num_heads"] == "command-line override"
    assert report["config"]["target_length"] == 1024  # the release's default when no cfg says otherwise
    assert_same_features(load_encoder(tmp_path / "b.pt"), w, kind="eat")


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("not a checkpoint"), "is not a PyTorch checkpoint"),
    (lambda p: torch.save({"weights": torch.zeros(2)}, p), "is not a fairseq checkpoint"),
    (lambda p: save_fairseq(p, {"encoder.layers.0.weight": torch.zeros(2)}), "has no EAT/ASDA encoder weights"),
    (lambda p: save_fairseq(p, {**release_weights("eat"), "norm.weight": torch.ones(D), "norm.bias": torch.zeros(D)},
                            layer_norm_first=True), "pre-LN"),
    (lambda p: save_fairseq(p, {k: v for k, v in release_weights("eat").items() if k != "blocks.1.mlp.fc2.weight"}),
     "blocks.1.mlp.fc2.weight"),
    (lambda p: save_fairseq(p, {k: v for k, v in release_weights("asda").items()
                                if "positions" not in k}), "no fixed positional table"),
])
def test_what_cannot_be_imported_is_refused_naming_the_file(tmp_path, make, message):
    src = tmp_path / "release.pt"
    make(src)
    with pytest.raises(ValueError, match=message) as err:
        import_fairseq(src, tmp_path / "out.pt")
    assert str(src) in str(err.value)
    assert not (tmp_path / "out.pt").exists()


def test_refusals_of_the_command_line(tmp_path, capsys):
    src = save_fairseq(tmp_path / "eat.pt", release_weights("eat"))
    out = tmp_path / "out.pt"
    assert main(["import", "--from", "fairseq", str(src), "--out", str(out), "--which", "teacher"]) == 2
    assert "no EMA teacher" in capsys.readouterr().err
    assert main(["import", "--from", "fairseq", str(src), "--out", str(out)]) == 0
    assert main(["import", "--from", "fairseq", str(src), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["import", "--from", "fairseq", str(out), "--out", str(tmp_path / "again.pt")]) == 2
    assert "already an ASDA checkpoint" in capsys.readouterr().err
    assert main(["import", "--from", "fairseq", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "missing.pt does not exist" in capsys.readouterr().err


@pytest.mark.ray
def test_an_imported_checkpoint_works_with_probe_and_finetune(tmp_path, synthetic_prepared, tracking_store, capsys):
    """The end-to-end check: import with the command line, then asda probe --checkpoint on a prepared set, and
    the fine-tuning classifier built from the same file."""
    src = save_fairseq(tmp_path / "asda.pt", with_ema(release_weights("asda")))
    out = tmp_path / "imported" / "asda.pt"
    assert main(["import", "--from", "fairseq", str(src), "--out", str(out)]) == 0
    assert main(["probe", "--data", str(synthetic_prepared), "--checkpoint", str(out)]) == 0
    assert "eval_accuracy" in capsys.readouterr().out
    from pipelines.finetune import build_classifier

    _, config = load_checkpoint(out)
    classifier = build_classifier(config, 8, str(out), "student")
    torch.testing.assert_close(classifier.encoder.blocks[0].attn.out_proj.weight,
                               load_encoder(out).blocks[0].attn.out_proj.weight)


def test_an_asda_checkpoint_of_this_project_is_not_mistaken_for_a_release(tmp_path):
    from model import ASDAConfig, ASDAEncoder

    config = ASDAConfig.tiny()
    save_checkpoint(tmp_path / "ours.pt", ASDAEncoder(config), config)
    with pytest.raises(ValueError, match="already an ASDA checkpoint"):
        load_fairseq_checkpoint(tmp_path / "ours.pt")
