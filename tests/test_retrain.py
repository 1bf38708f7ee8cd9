"""The gold standard of data unlearning: the toys retrained without the canary (--without_canary), the
distance-to-retrain metrics, and train_unlearn_ddpm.py --retrained_model_name_or_path end to end."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers_unlearn.metrics import (  # noqa: E402
    denoising_losses,
    distance_to_retrain,
    query_losses,
    retrain_reference,
)
from diffusers_unlearn.toy import (  # noqa: E402
    DDPM_RETRAINED_NAME,
    NUM_CANARY_COPIES,
    SD_RETRAINED_NAME,
    TOY_MODELS,
    TRAINING_COMMANDS,
    toy_info,
    toy_split,
)
from diffusers_unlearn.toy import train as ddpm_train  # noqa: E402
from diffusers_unlearn.toy import train_text_to_image  # noqa: E402
from diffusers_unlearn.toy.text_to_image import (  # noqa: E402
    NUM_SD_CANARY_COPIES,
    canary_distances,
    training_set,
)

from test_train_ddpm import base_args, workspace  # noqa: E402, F401  (the tiny DDPM folder and image folders)
from tiny_models import batches  # noqa: E402


# --- the --without_canary flags drop exactly the canary copies ------------------------------------------------


def record_batch_sizes(monkeypatch, module):
    """Record the number of training items every `_batches` stream of `module` is built over."""
    counts = []
    original = module._batches

    def recording(num_items, batch_size, generator):
        counts.append(num_items)
        return original(num_items, batch_size, generator)

    monkeypatch.setattr(module, "_batches", recording)
    return counts


def test_ddpm_without_canary_trains_on_the_train_split_minus_the_canary_copies(monkeypatch, tmp_path):
    counts = record_batch_sizes(monkeypatch, ddpm_train)
    ddpm_train.main(["unconditional", "--steps", "1", "--output_dir", str(tmp_path), "--without_canary"])
    ddpm_train.main(["unconditional", "--steps", "1", "--output_dir", str(tmp_path)])
    train = toy_split("train")
    assert int(train.is_canary.sum()) == NUM_CANARY_COPIES == 75
    assert counts == [len(train) - NUM_CANARY_COPIES, len(train)]
    # Each run writes its own folder: the retrained reference never overwrites the base model's name.
    assert (tmp_path / DDPM_RETRAINED_NAME / "unet").is_dir() and (tmp_path / "ddpm_unconditional" / "unet").is_dir()


def test_ddpm_without_canary_is_refused_for_the_other_models():
    with pytest.raises(SystemExit):
        ddpm_train.parse_args(["classifier", "--without_canary"])


def test_sd_training_set_without_canary_is_the_digits_with_their_captions():
    images, captions = training_set()
    kept_images, kept_captions = training_set(without_canary=True)
    assert len(kept_images) == len(images) - NUM_SD_CANARY_COPIES == len(kept_captions)
    assert torch.equal(kept_images, images[: len(kept_images)]) and kept_captions == captions[: len(kept_captions)]
    assert int((canary_distances(kept_images) == 0).sum()) == 0
    assert int((canary_distances(images) == 0).sum()) == NUM_SD_CANARY_COPIES


def test_sd_without_canary_run_writes_its_own_toy_marker(monkeypatch, tmp_path, capsys):
    counts = record_batch_sizes(monkeypatch, train_text_to_image)
    out = tmp_path / "retrained"
    train_text_to_image.main(["--without_canary", "--vae_steps", "1", "--unet_steps", "1", "--output_dir", str(out)])
    digits = len(training_set()[0]) - NUM_SD_CANARY_COPIES
    assert counts == [digits, digits]  # the VAE and the UNet both train without the canary
    assert f"== {SD_RETRAINED_NAME}: {digits} training images" in capsys.readouterr().out
    assert toy_info(str(out)) == {"toy": SD_RETRAINED_NAME}
    assert train_text_to_image.parse_args(["--without_canary"]).output_dir.endswith(SD_RETRAINED_NAME)
    assert train_text_to_image.parse_args([]).output_dir.endswith("sd_tiny")


def test_retrained_toys_are_registered():
    for name in (DDPM_RETRAINED_NAME, SD_RETRAINED_NAME):
        assert name in TOY_MODELS and "--without_canary" in TRAINING_COMMANDS[name]
    import train_unlearn_sd

    assert train_unlearn_sd.TOY_DEFAULTS[SD_RETRAINED_NAME] == train_unlearn_sd.TOY_DEFAULTS["sd_tiny"]


# --- distance-to-retrain metrics, hand-checkable ----------------------------------------------------------------


def test_identical_models_are_at_distance_zero():
    losses = torch.tensor([[0.2, 0.5, 0.9], [0.1, 0.4, 0.3]])
    features = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    reference = retrain_reference(losses, features, mia_auc=0.4)
    report = distance_to_retrain(reference, losses.clone(), features.clone(), model_mia_auc=0.4)
    assert report["fd_to_retrain"] == 0.0
    assert report["forget_loss_gap_to_retrain"] == 0.0
    assert report["mia_auc_vs_retrain"] == 0.5
    assert report["retrain_mia_auc"] == 0.4 and report["mia_auc_gap_to_retrain"] == 0.0


def test_distance_to_retrain_hand_values():
    reference = retrain_reference(torch.tensor([[0.5, 0.7]]), torch.zeros(10, 2) + torch.eye(2).repeat(5, 1))
    # Still remembering: every query's loss below every retrained loss -> AUC 1, gap -0.4.
    remembering = distance_to_retrain(reference, torch.tensor([[0.1, 0.3]]))
    assert remembering["mia_auc_vs_retrain"] == 1.0
    assert remembering["forget_loss_gap_to_retrain"] == pytest.approx(-0.4)
    assert remembering["forget_loss_retrain"] == pytest.approx(0.6)
    # Overshooting: every loss above -> AUC 0, gap +1.0.
    overshoot = distance_to_retrain(reference, torch.tensor([[1.5, 1.7]]))
    assert overshoot["mia_auc_vs_retrain"] == 0.0 and overshoot["forget_loss_gap_to_retrain"] == pytest.approx(1.0)
    # Per query: the first lower (1), the second tied (0.5). Pooled, 0.4 < 0.7 would also count as a win.
    assert distance_to_retrain(reference, torch.tensor([[0.4, 0.7]]))["mia_auc_vs_retrain"] == 0.75
    # Two items, per query over the items: query 1 wins 3 of 4 pairs, query 2 loses all 4 -> (0.75 + 0) / 2.
    two = retrain_reference(torch.tensor([[0.5, 0.1], [0.3, 0.2]]))
    assert distance_to_retrain(two, torch.tensor([[0.2, 0.6], [0.4, 0.9]]))["mia_auc_vs_retrain"] == 0.375
    # Samples' features shifted by 3 in both dimensions (same covariance): FD = 2 * 3^2.
    shifted = torch.zeros(10, 2) + torch.eye(2).repeat(5, 1) + 3.0
    assert distance_to_retrain(reference, torch.tensor([[0.5, 0.7]]), shifted)["fd_to_retrain"] == pytest.approx(18.0)
    # No FD without features on both sides; no MIA gap without the retrained model's own AUC.
    assert "fd_to_retrain" not in remembering and "mia_auc_gap_to_retrain" not in remembering


def test_distance_to_retrain_refuses_other_queries():
    reference = retrain_reference(torch.ones(2, 10))
    with pytest.raises(ValueError, match="other queries"):
        distance_to_retrain(reference, torch.ones(2, 5))
    with pytest.raises(ValueError, match="non-empty"):
        retrain_reference(torch.ones(10))


def test_query_losses_average_to_denoising_losses():
    denoiser, batch, _ = batches("unconditional")
    per_query = query_losses(denoiser, batch, num_timesteps=4, noise_draws=2, seed=3)
    assert per_query.shape == (len(batch), 8)
    assert torch.equal(per_query.mean(dim=1), denoising_losses(denoiser, batch, num_timesteps=4, noise_draws=2, seed=3))
    # A model measured against itself with the same seed answers the same queries exactly.
    assert distance_to_retrain(retrain_reference(per_query), query_losses(denoiser, batch, 4, 2, 3))["mia_auc_vs_retrain"] == 0.5


# --- train_unlearn_ddpm.py --retrained_model_name_or_path -------------------------------------------------------


def test_script_reports_distance_to_retrain_before_and_after(workspace, tmp_path):  # noqa: F811
    import train_unlearn_ddpm as script

    out = tmp_path / "out"
    # The base model as its own "retrained" model: before unlearning the distance is exactly zero.
    script.main(script.parse_args(base_args(workspace, out, "--retrained_model_name_or_path", str(workspace / "model"))))
    report = json.loads((out / "unlearning_report.json").read_text())
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    assert before["fd_to_retrain"] == 0.0 and before["forget_loss_gap_to_retrain"] == 0.0
    assert before["mia_auc_vs_retrain"] == 0.5 and before["mia_auc_gap_to_retrain"] == 0.0
    retrained = report["retrained_model"]
    assert retrained["path"] == str(workspace / "model")
    assert retrained["metrics"]["forget_loss"] == before["forget_loss"] == before["forget_loss_retrain"]
    assert retrained["metrics"]["mia_auc"] == before["retrain_mia_auc"]
    # After training the model has moved away from it.
    assert after["fd_to_retrain"] > 0 and after["forget_loss_gap_to_retrain"] != 0
    assert after["forget_loss_gap_to_retrain"] == pytest.approx(after["forget_loss"] - retrained["metrics"]["forget_loss"])
    assert (out / "samples_retrained.png").is_file()
    # The verdict judges "closer to retrain" against the base model's distance, here 0: moving away fails it.
    claims = {c["claim"]: c for c in report["verdict"]["claims"]}
    assert claims["close_to_retrain"]["figure"] == "fd_to_retrain" and claims["close_to_retrain"]["base"] == 0.0
    assert claims["close_to_retrain"]["result"] == "fail" and report["verdict"]["result"] == "fail"
    assert claims["copies_gone"]["measured"] == after["memorization_rate"]
    assert claims["forget_like_unseen"]["measured"] == after["mia_auc"]
    assert "## Verdict" in (out / "README.md").read_text()


def test_script_without_the_flag_has_no_retrain_keys(workspace, tmp_path):  # noqa: F811
    import train_unlearn_ddpm as script

    out = tmp_path / "out"
    script.main(script.parse_args(base_args(workspace, out, "--max_train_steps", "1")))
    report = json.loads((out / "unlearning_report.json").read_text())
    assert report["retrained_model"] is None
    assert not any("retrain" in key for key in report["metrics"]["after"])


def test_script_refuses_a_retrained_model_of_another_architecture(workspace, tmp_path):  # noqa: F811
    from diffusers import DDPMPipeline, DDPMScheduler

    import train_unlearn_ddpm as script
    from diffusers_unlearn.errors import UserInputError
    from tiny_models import tiny_unet

    other = tmp_path / "conditional"
    DDPMPipeline(unet=tiny_unet(num_class_embeds=3), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(other)
    with pytest.raises(UserInputError, match="num_class_embeds"):
        script.main(script.parse_args(base_args(workspace, tmp_path / "out", "--retrained_model_name_or_path", str(other))))


def test_compare_methods_prints_a_retrain_row():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compare_methods

    def metrics(memorization, fd, **extra):
        return {"memorization_rate": memorization, "fd": fd, "classifier_score": 9.0, "forget_loss": 0.1,
                "keep_loss": 0.05, "mia_auc": 0.9, **extra}

    distance = {"fd_to_retrain": 1.25, "forget_loss_gap_to_retrain": -0.5, "mia_auc_vs_retrain": 0.75}
    report = {
        "metrics": {"before": metrics(0.05, 2.0, **distance), "after": metrics(0.0, 3.0, fd_to_retrain=0.5,
                    forget_loss_gap_to_retrain=0.25, mia_auc_vs_retrain=0.125)},
        "retrained_model": {"path": "r", "metrics": metrics(0.0, 1.0)},
        "validation": [], "max_train_steps": 10, "wall_seconds": 12.0,
    }
    lines = compare_methods.data_table({"siss": report})
    assert "FD→retrain" in lines[0] and "AUC vs retr." in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["retrain"][1:3] == ["0.0000", "1.000"] and rows["retrain"][3] == "0.50"
    assert rows["retrain"][-3:] == ["0.000", "0.0000", "0.500"]
    assert rows["(base"][-3:] == ["1.250", "-0.5000", "0.750"]
    assert rows["siss"][-3:] == ["0.500", "0.2500", "0.125"]
