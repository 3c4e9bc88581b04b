"""`asda export` and ``model.load_pretrained``: portable weights that give the checkpoint's features to the bit, a
model card that states only what the run left behind, and refusals that never leave a half-written folder.

Checkpoints here are tiny models written with ``model.save_checkpoint`` (no Ray): a pretraining run's folder is
final.pt plus a checkpoint folder holding the run's settings, as ``asda pretrain`` leaves it; a sweep folder is
sweep.json and trials.json as ``asda sweep`` writes them.
"""

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import (
    ASDA,
    DATASET_STATS,
    ASDAClassifier,
    ASDAConfig,
    feature_settings,
    load_checkpoint,
    load_encoder,
    load_pretrained,
    load_pretrained_classifier,
    save_checkpoint,
)
from model.pretrained import CARD_FILE, CONFIG_FILE, README_FILE, WEIGHTS_FILE
from pipelines.export import export

REPO = Path(__file__).resolve().parents[1]
FILES = {WEIGHTS_FILE, CONFIG_FILE, CARD_FILE, README_FILE}


@pytest.fixture(autouse=True)
def no_tracking_store(tmp_path, monkeypatch):
    """An MLflow store that was never written: the export reads no run (and creates no store)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'absent' / 'mlflow.db'}")


def tiny() -> ASDAConfig:
    return ASDAConfig.preset("tiny")


def spectrogram(config: ASDAConfig, batch: int = 2, seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, config.target_length, config.num_mel_bins, generator=torch.Generator().manual_seed(seed))


def pretraining_checkpoint(path: Path, seed: int = 0, step: int = 40) -> Path:
    """A pretraining run's final.pt whose teacher differs from its student (as after EMA updates)."""
    torch.manual_seed(seed)
    config = tiny()
    model = ASDA(config)
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return save_checkpoint(path, model, config, step=step)


def prepared_data(folder: Path, name: str = "drums") -> dict:
    """A prepared data set's card (dataset.json) with its own normalisation."""
    card = {"schema_version": 4, "name": name, "dataset": name, "num_clips": 40, "splits": {"train": 32, "test": 8},
            "class_names": ["kick", "snare"], "multilabel": False, "target_length": 256, "code_version": "abc1234",
            "normalisation": {"mean": -5.25, "std": 3.5, "source": "train split"}}
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps(card, indent=2))
    return card


def pretraining_run(run_dir: Path, data: Path, seed: int, step: int = 40) -> Path:
    """final.pt and a checkpoint folder beside it that holds the run's settings, as `asda pretrain` leaves them."""
    final = pretraining_checkpoint(run_dir / "final.pt", seed=seed, step=step)
    state, config = load_checkpoint(final)
    model = ASDA(config)
    model.load_state_dict(state["model"])
    settings = {"data": str(data), "seed": seed, "steps": step, "batch_size": 8, "lr": 5e-4, "name": run_dir.name,
                "experiment": "asda", "split": "train", "target_length": None}
    save_checkpoint(run_dir / f"checkpoint_{step:07d}" / "model.pt", model, config, step=step, epoch=1,
                    settings=settings)
    return final


def sweep_folder(root: Path, data: Path) -> tuple[Path, list[Path]]:
    """A finished sweep: two seeds of cell diff_lambda=0.5 (0.5 and 0.7), the centre, a cell that scored the same
    pretraining with another read-out, and a random-init baseline."""
    folder = root / "paper-1a2b3c4d5e"
    checkpoints = [pretraining_run(folder / "runs" / f"paper-diff_lambda0p5-s{s}", data, seed=s) for s in (0, 1)]
    centre = pretraining_run(folder / "runs" / "paper-centre-s0", data, seed=7)

    def row(cell, seed, value, checkpoint, **extra):
        return {"cell": cell, "factor": cell.split("=")[0], "value": cell.split("=")[-1], "seed": seed,
                "overrides": {"diff_lambda": 0.5}, "evaluation": {"readout": "cls"}, "metric": "probe_accuracy",
                "metric_value": value, "checkpoint": str(checkpoint), "run_id": None, "error": None,
                "tasks": {"speech": value / 2}, **extra}

    rows = [row("diff_lambda=0.5", 0, 0.5, checkpoints[0]), row("diff_lambda=0.5", 1, 0.7, checkpoints[1]),
            row("centre", 0, 0.9, centre),
            row("readout=mean", 0, 0.4, checkpoints[0], shares_pretraining_of="diff_lambda=0.5")]
    (folder / "trials.json").write_text(json.dumps(rows, indent=2))
    (folder / "sweep.json").write_text(json.dumps({"sweep_id": "paper-1205-101010", "grid": "sweeps/grids/paper.yaml",
                                                   "fingerprint": "1a2b3c4d5e", "finished": True}))
    (folder / "baseline.json").write_text(json.dumps([{"cell": "baseline", "seed": s, "metric": "probe_accuracy",
                                                       "metric_value": v} for s, v in ((0, 0.2), (1, 0.3))]))
    return folder, checkpoints


# --------------------------------------------------------------------------------------------- bit identity


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_exported_weights_give_the_checkpoints_features_to_the_bit(tmp_path, which):
    checkpoint = pretraining_checkpoint(tmp_path / "run" / "final.pt")
    export(checkpoint, tmp_path / "out", which=which)
    x = spectrogram(tiny())
    with torch.no_grad():
        expected = load_encoder(checkpoint, which).eval().extract_features(x)
        encoder = load_pretrained(tmp_path / "out")
        assert not encoder.training
        got = encoder.extract_features(x)
        other = load_encoder(checkpoint, "teacher" if which == "student" else "student").eval().extract_features(x)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert not torch.equal(got[0], other[0])  # the export took the encoder asked for, not the other one
    assert set(p.name for p in (tmp_path / "out").iterdir()) == FILES
    assert json.loads((tmp_path / "out" / CARD_FILE).read_text())["source"]["encoder"] == (
        "EMA teacher" if which == "teacher" else "student")


def test_a_fine_tuned_classifier_exports_its_encoder_and_head_to_the_bit(tmp_path):
    torch.manual_seed(3)
    config = ASDAConfig.preset("tiny", drop_path=0.1)
    classifier = ASDAClassifier(config, num_classes=5, readout="mean")
    with torch.no_grad():
        classifier.head.linear.bias.normal_()
    checkpoint = save_checkpoint(tmp_path / "ft" / "checkpoint_0000012" / "model.pt", classifier, config,
                                 step=12, num_classes=5, readout="mean")
    export(checkpoint, tmp_path / "out")
    x = spectrogram(config)
    reference = ASDAClassifier(config, 5, readout="mean")
    reference.load_state_dict(load_checkpoint(checkpoint)[0]["model"])
    with torch.no_grad():
        encoder_bits = load_encoder(checkpoint).eval().extract_features(x)
        exported_bits = load_pretrained(tmp_path / "out").extract_features(x)
        logits, exported_logits = reference.eval()(x), load_pretrained_classifier(tmp_path / "out")(x)
    assert all(torch.equal(a, b) for a, b in zip(exported_bits, encoder_bits, strict=True))
    assert torch.equal(exported_logits, logits)
    card = json.loads((tmp_path / "out" / CARD_FILE).read_text())
    assert card["source"]["kind"] == "fine-tuned classifier"
    assert card["source"]["head"] == {"num_classes": 5, "readout": "mean"} and card["updates"] == 12


def test_an_imported_release_checkpoint_exports_to_its_features_to_the_bit_with_unknowns_said(tmp_path):
    from test_fairseq_import import release_weights, save_fairseq

    from model.fairseq import import_fairseq

    release = save_fairseq(tmp_path / "asda_release.pt", release_weights("asda"))
    imported = tmp_path / "imported.pt"
    import_fairseq(release, imported)
    card = export(imported, tmp_path / "out")
    encoder = load_pretrained(tmp_path / "out")
    x = torch.randn(2, encoder.config.target_length, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = load_encoder(imported).eval().extract_features(x)
        got = encoder.extract_features(x)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert card["source"]["kind"] == "imported release" and card["source"]["imported_from"]["release"] == "ASDA"
    for fact in ("data", "recipe", "evaluation", "sweep", "updates", "training_run", "random_init_baseline"):
        assert card[fact] == "unknown", fact
    assert card["seeds"] == {"this": "unknown", "cell": "unknown"}
    settings = feature_settings(tmp_path / "out")
    assert (settings["mean"], settings["std"]) == DATASET_STATS["audioset"]
    assert "SPEC defaults" in settings["source"] and "unknown" in settings["source"]
    with pytest.raises(ValueError, match="holds the student of the ASDA release alone"):
        export(imported, tmp_path / "teacher", which="teacher")


# --------------------------------------------------------------------------------------------- the card


def test_the_card_names_the_data_its_fingerprint_and_the_sweep_cells_spread_over_seeds(tmp_path):
    data_card = prepared_data(tmp_path / "prepared" / "drums")
    folder, checkpoints = sweep_folder(tmp_path / "sweeps", tmp_path / "prepared" / "drums")
    card = export(checkpoints[0], tmp_path / "out")  # the sweep is found above the checkpoint
    assert card == {**export(checkpoints[0], tmp_path / "named", sweep=folder), "out": str(tmp_path / "out"),
                    "exported": card["exported"]}
    canonical = json.dumps(data_card, sort_keys=True, separators=(",", ":")).encode()
    assert card["data"]["name"] == "drums"
    assert card["data"]["fingerprint"] == hashlib.sha256(canonical).hexdigest()
    assert card["source"]["sha256"] == hashlib.sha256(checkpoints[0].read_bytes()).hexdigest()
    assert card["updates"] == 40 and card["seeds"] == {"this": 0, "cell": [0, 1]}
    own, other = card["evaluation"]
    assert (own["cell"], own["metric"], own["this_seed"], own["n"], own["seeds"]) == (
        "diff_lambda=0.5", "probe_accuracy", 0.5, 2, [0, 1])
    assert own["mean"] == pytest.approx(0.6) and own["std"] == pytest.approx(math.sqrt(0.02))
    assert own["tasks"]["speech"]["mean"] == pytest.approx(0.3) and own["tasks"]["speech"]["n"] == 2
    assert (other["cell"], other["this_seed"], other["n"], other["std"]) == ("readout=mean", 0.4, 1, None)
    assert card["random_init_baseline"]["mean"] == pytest.approx(0.25)
    assert card["sweep"]["sweep_id"] == "paper-1205-101010" and card["recipe"]["cell"] == "diff_lambda=0.5"
    assert card["recipe"]["steps"] == 40 and card["recipe"]["objective"]["num_students"] == tiny().num_students
    settings = feature_settings(tmp_path / "out")
    assert (settings["mean"], settings["std"], settings["target_length"]) == (-5.25, 3.5, tiny().target_length)
    assert settings["sample_rate"] == 16000 and settings["num_mel_bins"] == 128
    readme = (tmp_path / "out" / README_FILE).read_text()
    assert "drums" in readme and "0.6000" in readme and card["data"]["fingerprint"] in readme


def test_a_checkpoint_outside_any_sweep_has_unknown_evaluation_and_a_named_sweep_must_hold_it(tmp_path):
    prepared_data(tmp_path / "prepared" / "drums")
    folder, _ = sweep_folder(tmp_path / "sweeps", tmp_path / "prepared" / "drums")
    loose = pretraining_run(tmp_path / "elsewhere" / "run", tmp_path / "prepared" / "drums", seed=3)
    card = export(loose, tmp_path / "out")
    assert card["evaluation"] == "unknown" and card["sweep"] == "unknown"
    assert card["seeds"] == {"this": 3, "cell": "unknown"} and card["data"]["name"] == "drums"
    with pytest.raises(ValueError, match="is not in --sweep"):
        export(loose, tmp_path / "named", sweep=folder)
    with pytest.raises(ValueError, match="not a finished sweep folder"):
        export(loose, tmp_path / "named", sweep=tmp_path)


def test_a_run_whose_data_is_gone_gets_the_spec_normalisation_and_says_so(tmp_path):
    checkpoint = pretraining_run(tmp_path / "run", tmp_path / "prepared" / "deleted", seed=0)
    card = export(checkpoint, tmp_path / "out")
    assert card["data"] == {"path": str(tmp_path / "prepared" / "deleted"), "name": "unknown",
                            "fingerprint": "unknown"}
    assert (card["features"]["mean"], card["features"]["std"]) == DATASET_STATS["audioset"]
    assert "SPEC defaults" in card["features"]["source"]
    assert any("could not be read" in note for note in card["notes"])


# --------------------------------------------------------------------------------------------- refusals


def test_export_refuses_a_missing_or_corrupt_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=r"does not exist: asda export takes a checkpoint file"):
        export(tmp_path / "nowhere.pt", tmp_path / "out")
    checkpoint = pretraining_checkpoint(tmp_path / "run" / "final.pt")
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 0xFF
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"final.pt is corrupt.*asda export takes this project's checkpoints"):
        export(checkpoint, tmp_path / "out")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not an ASDA checkpoint"):
        export(foreign, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_teacher_where_there_is_none_and_an_unknown_choice(tmp_path):
    config = tiny()
    checkpoint = save_checkpoint(tmp_path / "ft.pt", ASDAClassifier(config, 3), config, num_classes=3)
    with pytest.raises(ValueError, match="which='teacher' is not allowed.*fine-tuned classifier"):
        export(checkpoint, tmp_path / "out", which="teacher")
    with pytest.raises(ValueError, match="which='ema' is not allowed: expected one of"):
        export(checkpoint, tmp_path / "out", which="ema")


def test_export_refuses_a_non_empty_out_without_force_and_replaces_only_an_earlier_export_with_force(tmp_path):
    checkpoint = pretraining_checkpoint(tmp_path / "run" / "final.pt")
    out = tmp_path / "out"
    export(checkpoint, out)
    (out / "stale.txt").write_text("from an earlier export")
    with pytest.raises(ValueError, match="exists and is not empty; pass --force"):
        export(checkpoint, out, which="teacher")
    export(checkpoint, out, which="teacher", force=True)
    assert set(p.name for p in out.iterdir()) == FILES
    assert json.loads((out / CARD_FILE).read_text())["source"]["encoder"] == "EMA teacher"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not an earlier export.*--force replaces only an export's folder"):
        export(checkpoint, tmp_path / "mine", force=True)
    inside = pretraining_checkpoint(out / "final.pt")  # a checkpoint kept in an earlier export's folder
    with pytest.raises(ValueError, match="holds the checkpoint being exported"):
        export(inside, out, force=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine" and inside.is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file; name a folder"):
        export(checkpoint, tmp_path / "file", force=True)
    (tmp_path / "empty").mkdir()
    export(checkpoint, tmp_path / "empty")  # an empty folder is no export to lose
    assert set(p.name for p in (tmp_path / "empty").iterdir()) == FILES


def test_a_failed_export_leaves_no_half_written_folder(tmp_path, monkeypatch):
    import pipelines.export as module

    checkpoint = pretraining_checkpoint(tmp_path / "run" / "final.pt")
    export(checkpoint, tmp_path / "kept")
    before = {p.name: p.read_bytes() for p in (tmp_path / "kept").iterdir()}
    monkeypatch.setattr(module, "render_readme", lambda card, config: 1 / 0)  # fails after the weights are written
    with pytest.raises(ZeroDivisionError):
        export(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ZeroDivisionError):
        export(checkpoint, tmp_path / "kept", which="teacher", force=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "kept").iterdir()} == before  # the earlier export, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "run"]  # no staging folder left behind


# --------------------------------------------------------------------------------------------- loading


def test_load_pretrained_names_a_missing_file_and_weights_that_do_not_fit(tmp_path):
    checkpoint = pretraining_checkpoint(tmp_path / "run" / "final.pt")
    out = tmp_path / "out"
    export(checkpoint, out)
    with pytest.raises(ValueError, match="holds an encoder without a classifier head"):
        load_pretrained_classifier(out)
    document = json.loads((out / CONFIG_FILE).read_text())
    document["model"]["depth"] = 3
    document["model"]["average_top_k_layers"] = 3
    (out / CONFIG_FILE).write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"does not fit the encoder config.json describes: unexpected \['blocks.3"):
        load_pretrained(out)
    document["model"]["depth"], document["model"]["embed_dim"] = 4, 64
    (out / CONFIG_FILE).write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"shaped differently \(weights vs config\)"):
        load_pretrained(out)
    (out / WEIGHTS_FILE).write_bytes((out / WEIGHTS_FILE).read_bytes()[:-8])
    with pytest.raises(ValueError, match="does not match the sha256 in config.json"):
        load_pretrained(out)
    (out / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="lacks model.safetensors"):
        load_pretrained(out)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_pretrained(tmp_path / "nowhere")


def test_the_pretrained_module_imports_neither_ray_mlflow_nor_pipelines(tmp_path):
    export(pretraining_checkpoint(tmp_path / "run" / "final.pt"), tmp_path / "out")
    code = ("import sys; from model.pretrained import load_pretrained; "
            f"encoder = load_pretrained({str(tmp_path / 'out')!r}); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow', 'pipelines', 'sweeps'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------- command line


def test_the_export_command_writes_a_loadable_folder_and_refuses_a_full_one(tmp_path, capsys):
    from pipelines.cli import main

    checkpoint = pretraining_checkpoint(tmp_path / "run" / "final.pt")
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "out"), "--which", "teacher"]) == 0
    assert f"wrote {tmp_path / 'out'}: model.safetensors" in capsys.readouterr().out
    x = spectrogram(tiny())
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path / "out").extract_features(x)[0],
                           load_encoder(checkpoint, "teacher").eval().extract_features(x)[0])
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "out")]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "out"), "--force"]) == 0
