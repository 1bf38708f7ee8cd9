"""train_unlearn_sd.py --retrained_model_name_or_path: the distance to a model retrained without the forget data."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_unlearn_sd as script  # noqa: E402
from test_train_sd import base_args, workspace  # noqa: E402, F401  (the tiny SD folder and image folders)
from tiny_models import save_tiny_sd3_pipeline  # noqa: E402


def test_base_model_as_its_own_retrained_model(workspace, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    script.main(script.parse_args(base_args(workspace, out, "--retrained_model_name_or_path", str(workspace / "model"))))
    report = json.loads((out / "unlearning_report.json").read_text())
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    retrained = report["retrained_model"]
    assert retrained["path"] == str(workspace / "model")
    # Before unlearning the model is the "retrained" one: the same losses on the same queries.
    assert retrained["metrics"]["forget_loss"] == before["forget_loss"] == before["forget_loss_retrain"]
    assert before["forget_loss_gap_to_retrain"] == 0.0 and before["mia_auc_vs_retrain"] == 0.5
    assert before["retrain_mia_auc"] == retrained["metrics"]["mia_auc"] and before["mia_auc_gap_to_retrain"] == 0.0
    assert "fd_to_retrain" not in before  # no classifier for features outside the toys
    # After training the model answers the queries differently.
    assert after["forget_loss_gap_to_retrain"] == pytest.approx(after["forget_loss"] - retrained["metrics"]["forget_loss"])
    assert after["forget_loss_gap_to_retrain"] != 0.0
    assert (out / "samples_retrained.png").is_file()
    claim = {c["claim"]: c for c in report["verdict"]["claims"]}["close_to_retrain"]
    assert claim["figure"] == "mia_auc_vs_retrain" and claim["measured"] == after["mia_auc_vs_retrain"]
    assert "retrained without the forget data" in (out / "README.md").read_text()


def test_retrained_model_of_another_family_is_refused_before_loading(workspace, tmp_path, capsys):  # noqa: F811
    other = tmp_path / "sd3"
    save_tiny_sd3_pipeline(other)
    with pytest.raises(SystemExit):
        script.parse_args(base_args(workspace, tmp_path / "out", "--retrained_model_name_or_path", str(other)))
    assert "is a sd3 pipeline, the base model a sd one" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(base_args(workspace, tmp_path / "out", "--retrained_model_name_or_path", str(tmp_path / "missing")))
    assert "--retrained_model_name_or_path: no such local folder and not a Hub id" in capsys.readouterr().err


def test_stop_at_retrained_level_uses_the_retrained_losses(workspace, tmp_path, level_spy):  # noqa: F811
    seen = level_spy
    out = tmp_path / "out"
    script.main(script.parse_args(base_args(workspace, out, "--retrained_model_name_or_path", str(workspace / "model"), "--stop_at_retrained_level")))
    report = json.loads((out / "unlearning_report.json").read_text())
    assert report["stopping"]["rule"] == "retrained_level" and seen
    retrained_loss = report["retrained_model"]["metrics"]["forget_loss"]
    assert all(level.mean().item() == pytest.approx(retrained_loss) for level in seen)
    assert all("retrained_level" in entry and "mia_auc" in entry for entry in report["validation"])
