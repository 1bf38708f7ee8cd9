"""VDU's protocol in train_unlearn_ddpm.py: a digit class forgotten by the bundled *unconditional* toy DDPM, counted
among its unconditional samples (PUL), with the FD to the real digits of the other classes; the canary run is left
as it was. Few samples and DDIM steps: these test the plumbing, docs/results.md has the figures."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_unlearn_ddpm as script  # noqa: E402

from diffusers_unlearn.metrics import pul  # noqa: E402

SMALL = ["--max_train_steps", "1", "--train_batch_size", "8", "--num_eval_samples", "32", "--num_validation_images", "4",
         "--ddpm_num_inference_steps", "10", "--validation_steps", "100"]


def run(out, *extra):
    script.main(script.parse_args(["--output_dir", str(out), *SMALL, *extra]))
    return json.loads((out / "unlearning_report.json").read_text())


def test_a_class_of_the_unconditional_toy_is_counted_among_its_samples(tmp_path):
    out = tmp_path / "out"
    report = run(out, "--method", "vdu", "--forget_dataset_name", "toy-digits", "--forget_class", "1")
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    assert report["forget_class"] == 1 and report["num_keep_items"] == 0  # VDU: the class's images only
    assert report["class_min_confidence"] == 0.5 and report["copy_detector"] is None
    assert before["forget_class_count"] > 0  # the base toy draws ones from these seeds, so PUL is defined
    for metrics in (before, after):
        assert metrics["forget_class_rate"] == metrics["forget_class_count"] / metrics["num_samples"]
        assert "memorization_rate" not in metrics  # a whole class is not a copy of one image
        assert metrics["fd"] > 0  # to the other classes' real digits, although there is no keep set
    assert before["pul"] is None and after["pul"] == pul(before["forget_class_count"], after["forget_class_count"])
    claim = report["verdict"]["claims"][0]
    assert claim["claim"] == "class_forgotten" and claim["measured"] == after["pul"]
    assert not list(out.glob("forget_class_samples_*.png"))  # the class is counted in the ordinary samples


def test_the_fd_reference_is_the_other_classes_real_digits():
    from diffusers_unlearn.toy.data import toy_split

    args = script.parse_args(["--output_dir", "unused", "--method", "vdu", "--forget_dataset_name", "toy-digits", "--forget_class", "8"])
    images = script.other_class_images(args, 8, 1)
    train = toy_split("train")
    assert len(images) == int(((train.labels != 8) & ~train.is_canary).sum())


def test_the_canary_run_is_still_a_copy_removal(tmp_path):
    report = run(tmp_path / "out")
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    assert report["forget_class"] == 10 and report["class_min_confidence"] is None
    assert report["copy_detector"] is not None and report["memorization_threshold"] is not None
    for metrics in (before, after):
        assert "memorization_rate" in metrics and "fd" in metrics
        assert not {"pul", "forget_class_rate", "forget_class_count"} & set(metrics)
    assert report["verdict"]["claims"][0]["claim"] == "copies_gone"

