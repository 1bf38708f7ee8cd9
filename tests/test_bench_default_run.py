"""benchmarks/bench_default_run.py: its command line, its refusals and what it prints from a report (no run)."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_default_run as bench  # noqa: E402
from diffusers_unlearn.toy import toy_model_path  # noqa: E402
from diffusers_unlearn.verdict import VerdictThresholds, build_verdict  # noqa: E402


def test_command_is_the_script_alone_or_with_a_toy_folder():
    plain = bench.build_command(bench.parse_args([]))
    assert plain[1:] == [os.path.join(bench.ROOT, "train_unlearn_ddpm.py")]
    flow = bench.build_command(bench.parse_args(["--script", "train_unlearn_sd.py", "--toy", "sd3_tiny"]))
    assert flow[2:] == ["--pretrained_model_name_or_path", toy_model_path("sd3_tiny")]


@pytest.mark.parametrize("argv, message", [
    (["--toy", "sd3_tiny"], "use it with --script train_unlearn_sd.py"),
    (["--script", "train_unlearn_sd.py", "--toy", "classifier"], "not a bundled text-to-image toy"),
    (["--script", "train_sd.py"], "invalid choice"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


def test_prints_figures_ratios_and_the_verdict(capsys):
    before = {"memorization_rate": 0.5, "other_prompts_digit_accuracy": 0.99, "mia_auc": 1.0, "num_eval_images_per_prompt": 64}
    after = {"memorization_rate": 0.0156, "other_prompts_digit_accuracy": 0.98, "mia_auc": 0.2}
    report = {"metrics": {"before": before, "after": after}, "verdict": build_verdict(before, after, VerdictThresholds()),
              "per_prompt": {"a handwritten digit seven": {"memorization_rate": {"before": 0.5, "after": 0.0156}}}}
    bench.print_report(report, 45.4, "train_unlearn_sd.py", "sd_tiny")
    out = capsys.readouterr().out
    assert "train_unlearn_sd.py with --pretrained_model_name_or_path <sd_tiny>: 45.4 s wall" in out
    assert "memorization rate after / before: 0.031" in out
    assert "other_prompts_digit_accuracy change: -1.0%" in out
    assert "Verdict: fail" in out and "copies_gone          fail" in out and "forget_like_unseen   fail" in out
    assert '"num_eval_samples": 64' in out
