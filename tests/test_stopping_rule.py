"""--stop_at_heldout_level (diffusers_unlearn/stopping.py): the rule, its refusal without held-out data, the
report, resumption after a stop, two methods, two processes, and its behaviour on the DDPM toy."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import train_unlearn_ddpm as script  # noqa: E402
from diffusers_unlearn import stopping  # noqa: E402
from diffusers_unlearn.stopping import HeldoutLevelRule  # noqa: E402
from test_train_ddpm import base_args, workspace  # noqa: E402,F401  (the tiny model and image folders)


def run(args):
    script.main(script.parse_args(args))


def report_of(out: Path) -> dict:
    return json.loads((out / "unlearning_report.json").read_text())


def checkpoints(out: Path) -> list[str]:
    return sorted((p.name for p in out.iterdir() if p.name.startswith("checkpoint-")), key=lambda n: int(n.split("-")[1]))


@pytest.fixture
def rising_forget_loss(monkeypatch):
    """The rule's measurement replaced by a forget loss that rises by 0.1 per validation toward a held-out level
    of 0.25, so the stopping step is known: with margin 0 the third validation (0.3 >= 0.25) stops."""
    calls = []

    def measure(self, forget_losses, heldout_losses):
        calls.append((len(forget_losses), len(heldout_losses)))
        return {"forget_loss_median": 0.1 * len(calls), "heldout_level": 0.25, "mia_auc": 0.5}

    monkeypatch.setattr(HeldoutLevelRule, "measure", measure)
    return calls


def test_rule_decision_and_measure():
    rule = HeldoutLevelRule(margin=0.0)
    assert rule.reason({"step": 3, "forget_loss_median": 0.24, "heldout_level": 0.25}) is None
    assert "step 3" in rule.reason({"step": 3, "forget_loss_median": 0.25, "heldout_level": 0.25})
    assert HeldoutLevelRule(margin=0.1).reason({"step": 3, "forget_loss_median": 0.23, "heldout_level": 0.25})
    assert rule.reason({"step": 3}) is None and rule.reason(None) is None  # a validation without the losses
    # At the level, but a validation sample is still a copy of a forget item: not yet.
    assert rule.reason({"step": 3, "forget_loss_median": 0.3, "heldout_level": 0.25, "memorization_rate": 0.01}) is None
    assert rule.reason({"step": 3, "forget_loss_median": 0.3, "heldout_level": 0.25, "memorization_rate": 0.0})
    level = rule.measure(torch.tensor([0.3]), torch.tensor([0.1, 0.2, 0.4, 0.5, 0.6]))
    assert level["forget_loss_median"] == pytest.approx(0.3) and level["heldout_level"] == pytest.approx(0.4)
    assert level["mia_auc"] == pytest.approx(0.6)  # 3 of 5 held-out losses are above the forget item's
    summary = rule.summary([{"step": 2}, {"step": 4, "stopped": "why"}])
    assert summary["stopped_at_step"] == 4 and summary["reason"] == "why" and summary["margin"] == 0.0
    assert rule.summary([{"step": 2}])["stopped_at_step"] is None


@pytest.mark.parametrize("margin", ["-0.1", "1.0"])
def test_margin_out_of_range_is_refused(workspace, tmp_path, margin, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(base_args(workspace, tmp_path / "out", "--stop_at_heldout_level", "--heldout_level_margin", margin))
    assert "--heldout_level_margin must be in [0, 1)" in capsys.readouterr().err


def test_refused_without_heldout_data(workspace, tmp_path, capsys):
    args = base_args(workspace, tmp_path / "out", "--stop_at_heldout_level")
    i = args.index("--heldout_data_dir")
    del args[i : i + 2]
    with pytest.raises(SystemExit) as info:
        script.parse_args(args)  # at parse time: before any model or image is loaded
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--stop_at_heldout_level needs held-out data" in err and "--heldout_data_dir" in err
    assert not (tmp_path / "out").exists()
    script.parse_args(args[:-1])  # without the flag the same command is accepted


def test_sd_script_refuses_without_heldout_data(tmp_path, capsys):
    import train_unlearn_sd

    folder = tmp_path / "forget"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(SystemExit):
        train_unlearn_sd.parse_args([
            "--pretrained_model_name_or_path", str(model), "--forget_data_dir", str(folder),
            "--output_dir", str(tmp_path / "out"), "--stop_at_heldout_level",
        ])
    assert "--stop_at_heldout_level needs held-out data" in capsys.readouterr().err
    # The toy has held-out data built in: accepted.
    args = train_unlearn_sd.parse_args(["--output_dir", str(tmp_path / "toy"), "--stop_at_heldout_level"])
    assert args.stop_at_heldout_level and args.heldout_level_margin == stopping.DEFAULT_MARGIN


@pytest.mark.parametrize("method", ["siss", "naive_deletion"])
def test_stops_when_level_reached_and_records_it(workspace, tmp_path, rising_forget_loss, method):
    out = tmp_path / method
    flags = ["--method", method] + (["--siss_scaling_norm", "0.5"] if method == "siss" else [])
    args = base_args(workspace, out, "--max_train_steps", "12", "--checkpointing_steps", "100",
                     "--stop_at_heldout_level", "--heldout_level_margin", "0")
    i = args.index("--siss_scaling_norm")
    del args[i : i + 2]
    run(args + flags)
    report = report_of(out)
    assert report["method"] == method
    assert report["stopping"]["stopped_at_step"] == 6 and "step 6" in report["stopping"]["reason"]
    assert report["stopping"]["margin"] == 0.0
    steps = [entry["step"] for entry in report["validation"]]
    assert steps == [2, 4, 6]  # no validation (no training) after the stop
    assert [entry.get("stopped") is not None for entry in report["validation"]] == [False, False, True]
    assert report["validation"][-1]["forget_loss_median"] == pytest.approx(0.3)
    assert rising_forget_loss == [(2, 4)] * 3  # the forget set's 2 images and the 4 held-out ones
    # The stopping step is checkpointed, and the saved adapter is the stopped model.
    assert checkpoints(out) == ["checkpoint-6"]
    final = load_file(str(out / "pytorch_lora_weights.safetensors"))
    at_stop = load_file(str(out / "checkpoint-6" / "pytorch_lora_weights.safetensors"))
    assert final.keys() == at_stop.keys() and all(torch.equal(final[k], at_stop[k]) for k in final)


def test_without_the_flag_training_runs_to_the_end(workspace, tmp_path, rising_forget_loss):
    out = tmp_path / "out"
    run(base_args(workspace, out, "--max_train_steps", "8", "--checkpointing_steps", "100"))
    report = report_of(out)
    assert report["stopping"] is None and [e["step"] for e in report["validation"]] == [2, 4, 6]
    assert rising_forget_loss == []  # the losses are not measured without the rule


def test_level_not_reached_runs_to_max_steps(workspace, tmp_path, monkeypatch):
    monkeypatch.setattr(HeldoutLevelRule, "measure", lambda self, f, h: {"forget_loss_median": 0.1, "heldout_level": 1.0, "mia_auc": 0.0})
    out = tmp_path / "out"
    run(base_args(workspace, out, "--max_train_steps", "6", "--stop_at_heldout_level"))
    report = report_of(out)
    assert report["stopping"]["stopped_at_step"] is None and "not reached" in report["stopping"]["reason"]
    assert [e["step"] for e in report["validation"]] == [2, 4]


def test_resume_after_a_stop_trains_no_further(workspace, tmp_path, rising_forget_loss):
    out = tmp_path / "out"
    common = ["--checkpointing_steps", "100", "--stop_at_heldout_level", "--heldout_level_margin", "0"]
    run(base_args(workspace, out, "--max_train_steps", "12", *common))
    stopped = load_file(str(out / "pytorch_lora_weights.safetensors"))
    calls = len(rising_forget_loss)
    # Resumed with a larger budget: the checkpoint's history holds the stop, so no step and no validation runs.
    run(base_args(workspace, out, "--max_train_steps", "20", *common, "--resume_from_checkpoint", "latest"))
    assert len(rising_forget_loss) == calls
    assert checkpoints(out) == ["checkpoint-6"]
    resumed = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(stopped[k], resumed[k]) for k in stopped)
    report = report_of(out)
    assert report["stopping"]["stopped_at_step"] == 6 and [e["step"] for e in report["validation"]] == [2, 4, 6]


def test_two_processes_stop_together(workspace, tmp_path):
    """Margin 0.99 stops at the first validation on the tiny model (any loss >= 1% of the held-out level). The
    decision is made on rank 0 only; if rank 1 did not get it, it would train on alone and the run would hang."""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29537",
        str(ROOT / "train_unlearn_ddpm.py"),
        *base_args(workspace, out, "--max_train_steps", "8", "--checkpointing_steps", "100",
                   "--stop_at_heldout_level", "--heldout_level_margin", "0.99"),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = report_of(out)
    assert report["num_processes"] == 2 and report["stopping"]["stopped_at_step"] == 2
    assert checkpoints(out) == ["checkpoint-2"]


def test_sd_script_stops_and_records_it(tmp_path_factory, tmp_path, rising_forget_loss):
    """train_unlearn_sd.py on the tiny random SD pipeline: the same rule, the same record and checkpoint."""
    import test_train_sd
    import train_unlearn_sd

    sd_workspace = test_train_sd.workspace.__wrapped__(tmp_path_factory)
    out = tmp_path / "sd"
    train_unlearn_sd.main(train_unlearn_sd.parse_args(test_train_sd.base_args(
        sd_workspace, out, "--max_train_steps", "10", "--checkpointing_steps", "100",
        "--stop_at_heldout_level", "--heldout_level_margin", "0",
    )))
    report = report_of(out)
    assert report["stopping"]["stopped_at_step"] == 6
    assert [e["step"] for e in report["validation"]] == [2, 4, 6]
    assert rising_forget_loss == [(2, 2)] * 3  # the two forget images and the two held-out ones
    assert checkpoints(out) == ["checkpoint-6"]


def test_toy_erasediff_stops_near_the_heldout_level(tmp_path):
    """Behaviour on the DDPM toy (64 evaluation samples instead of the docs' 2,048): EraseDiff, which left to run
    drives the canary's loss far above the held-out digits' (MIA AUC 0.000 after 300 steps, docs/results.md), stops
    within a few steps of reaching the held-out level, and the final model is the stopped one."""
    out = tmp_path / "toy"
    run(["--method", "erasediff", "--output_dir", str(out), "--max_train_steps", "60", "--checkpointing_steps", "1000",
         "--validation_steps", "2", "--num_validation_images", "16", "--num_eval_samples", "64",
         "--stop_at_heldout_level"])
    report = report_of(out)
    stop = report["stopping"]["stopped_at_step"]
    assert stop is not None and stop < 60
    entry = report["validation"][-1]
    assert entry["step"] == stop and entry["forget_loss_median"] >= 0.95 * entry["heldout_level"]
    before_stop = report["validation"][-2]  # the previous validation had not reached the level (or had copies)
    assert before_stop["forget_loss_median"] < 0.95 * before_stop["heldout_level"] or before_stop["memorization_rate"] > 0
    after = report["metrics"]["after"]
    assert after["mia_auc"] == pytest.approx(entry["mia_auc"])  # the evaluation's losses, on the stopped model
    assert after["forget_loss"] > 5 * report["metrics"]["before"]["forget_loss"]  # the canary was forgotten ...
    assert after["forget_loss"] < 2 * after["heldout_loss"]  # ... without running away (uncalibrated: 7x)


# --- --stop_at_retrained_level: the level from the model retrained without the forget data ----------------------


def test_retrained_reference_rule():
    rule = HeldoutLevelRule(margin=0.0, reference="retrained")
    level = rule.measure(torch.tensor([0.3]), torch.tensor([0.8]))
    assert level == {"forget_loss_median": pytest.approx(0.3), "retrained_level": pytest.approx(0.8)}  # no AUC without held-out
    with_heldout = rule.measure(torch.tensor([0.3]), torch.tensor([0.8]), torch.tensor([0.1, 0.2, 0.4, 0.5, 0.6]))
    assert with_heldout["mia_auc"] == pytest.approx(0.6) and with_heldout["retrained_level"] == pytest.approx(0.8)
    assert rule.reason({"step": 5, **level}) is None
    assert "retrained model's level 0.8 at step 7" in rule.reason({"step": 7, "forget_loss_median": 0.8, "retrained_level": 0.8})
    assert rule.summary([])["rule"] == "retrained_level"
    with pytest.raises(ValueError, match="reference"):
        HeldoutLevelRule(reference="keep")


@pytest.mark.parametrize("extra, message", [
    (["--stop_at_retrained_level"], "--stop_at_retrained_level needs the retrained model"),
    (["--stop_at_retrained_level", "--stop_at_heldout_level", "--retrained_model_name_or_path", "x/y"], "not both"),
])
def test_retrained_level_refusals(workspace, tmp_path, extra, message, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(base_args(workspace, tmp_path / "out", *extra))
    assert message in capsys.readouterr().err


def test_ddpm_script_takes_the_level_from_the_retrained_model(workspace, tmp_path, level_spy):
    seen = level_spy
    out = tmp_path / "out"
    # The base model as its own "retrained" model: the level is the base model's forget loss.
    run(base_args(workspace, out, "--max_train_steps", "4", "--checkpointing_steps", "100",
                  "--retrained_model_name_or_path", str(workspace / "model"), "--stop_at_retrained_level"))
    report = report_of(out)
    assert report["stopping"]["rule"] == "retrained_level"
    assert len(seen) == len(report["validation"]) >= 1
    retrained_loss = report["retrained_model"]["metrics"]["forget_loss"]
    assert all(level.mean().item() == pytest.approx(retrained_loss) for level in seen)
    assert all(entry["retrained_level"] == pytest.approx(seen[0].median().item()) for entry in report["validation"])
    assert all("mia_auc" in entry for entry in report["validation"])  # the held-out AUC is still logged


def test_class_unlearning_refuses_the_level_rules(workspace, tmp_path, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--forget_dataset_name", "toy-digits", "--forget_class", "1", "--stop_at_heldout_level",
                           "--output_dir", str(tmp_path / "out")])
    assert "with --forget_class (class unlearning) run without them" in capsys.readouterr().err
    # The toy's canary (its own label in toy-digits) is data unlearning: accepted.
    args = script.parse_args(["--stop_at_heldout_level", "--output_dir", str(tmp_path / "toy")])
    assert args.stop_at_heldout_level
