"""benchmarks/compare_methods.py's digit-by-digit class unlearning: the table, the target count, --reuse."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import compare_methods  # noqa: E402


def class_report(pul, fd_before, fd_after, rate_before=1.0, rate_after=0.0, digit=1, method="siss", stopped=None):
    """A train_unlearn_ddpm.py class-unlearning report with only the fields the tables read."""
    return {
        "method": method, "forget_class": digit, "seed": 0, "max_train_steps": 300, "num_eval_samples": 256,
        "metrics": {
            "before": {"forget_class_rate": rate_before, "fd": fd_before, "pul": None},
            "after": {"forget_class_rate": rate_after, "fd": fd_after, "pul": pul},
        },
        "validation": [{"step": 25, "forget_class_rate": 0.5}, {"step": 50, "forget_class_rate": 0.0}],
        "stopping": None if stopped is None else {"stopped_at_step": stopped, "margin": 0.05},
        "wall_seconds": 12.3,
    }


def test_class_target_is_pul_and_fd_ratio():
    assert compare_methods.meets_class_target(class_report(90.0, 2.0, 2.3))  # both at the limit
    assert compare_methods.meets_class_target(class_report(100.0, 2.0, 1.0))  # better quality than the base
    assert not compare_methods.meets_class_target(class_report(89.9, 2.0, 2.0))
    assert not compare_methods.meets_class_target(class_report(100.0, 2.0, 2.31))
    assert not compare_methods.meets_class_target(class_report(None, 2.0, 2.0))  # base never drew the class


def test_class_sweep_table_rows_and_counts():
    sweep = {
        0: {"siss": class_report(100.0, 3.0, 2.7, digit=0), "erasediff": class_report(100.0, 3.0, 4.0, digit=0, method="erasediff")},
        3: {"siss": class_report(50.0, 2.0, 2.0, rate_after=0.5, digit=3), "erasediff": class_report(95.0, 2.0, 2.2, digit=3, method="erasediff", stopped=75)},
    }
    lines = compare_methods.class_sweep_table(sweep)
    assert lines[0].split()[:2] == ["digit", "method"] and "keep FD before" in lines[0] and lines[0].split()[-1] == "target"
    rows = [line.split() for line in lines[1:5]]
    # digit, method, rate before, rate after, PUL, keep FD before, keep FD after, FD/base, first 0, steps, wall s, target
    assert rows[0] == ["0", "siss", "1.0000", "0.0000", "100.0", "3.000", "2.700", "0.90", "50", "300", "12", "yes"]
    assert rows[1][1] == "erasediff" and rows[1][7] == "1.33" and rows[1][-1] == "no"
    assert rows[2][:5] == ["3", "siss", "1.0000", "0.5000", "50.0"] and rows[2][-1] == "no"
    assert rows[3][9] == "75" and rows[3][-1] == "yes"  # stopped by the calibrated rule at step 75
    assert "PUL >= 90" in lines[5] and "FD/base <= 1.15" in lines[5]
    assert lines[6].split() == ["siss", "1/2", "(missed:", "3)"]
    assert lines[7].split() == ["erasediff", "1/2", "(missed:", "0)"]
    assert compare_methods.class_target_counts(sweep) == {"siss": ([0], [3]), "erasediff": ([3], [0])}


def test_reuse_needs_the_same_settings():
    args = compare_methods.train_unlearn_ddpm.parse_args([
        "--method", "siss", "--max_train_steps", "300", "--num_eval_samples", "256", "--output_dir", "unused",
        "--forget_dataset_name", "toy-digits", "--forget_class", "1", "--keep_dataset_name", "toy-digits",
    ])
    assert compare_methods.same_settings(class_report(100.0, 2.0, 2.0), args)
    assert not compare_methods.same_settings(class_report(100.0, 2.0, 2.0, digit=2), args)
    assert not compare_methods.same_settings(class_report(100.0, 2.0, 2.0, method="erasediff"), args)
    assert not compare_methods.same_settings(class_report(100.0, 2.0, 2.0, stopped=50), args)  # made with the rule
    args.stop_at_heldout_level = True
    assert compare_methods.same_settings(class_report(100.0, 2.0, 2.0, stopped=50), args)
    assert not compare_methods.same_settings(class_report(100.0, 2.0, 2.0), args)
    args.heldout_level_margin = 0.1
    assert not compare_methods.same_settings(class_report(100.0, 2.0, 2.0, stopped=50), args)


@pytest.mark.parametrize("digits", [["10"], ["1", "1"]])
def test_bad_digits_are_refused_before_any_run(digits, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["compare_methods.py", "--output_dir", str(tmp_path), "--forget_classes", *digits])
    with pytest.raises(SystemExit):
        compare_methods.parse_args()
    assert not any(tmp_path.iterdir())


def test_print_only_trains_nothing_and_lists_missing_runs(monkeypatch, tmp_path, capsys):
    report = class_report(95.0, 2.0, 2.2, digit=2)
    folder = tmp_path / "class" / "2" / "siss"
    folder.mkdir(parents=True)
    (folder / "unlearning_report.json").write_text(json.dumps(report))

    def no_training(args):
        raise AssertionError("--print_only trained")

    monkeypatch.setattr(compare_methods.train_unlearn_ddpm, "main", no_training)
    monkeypatch.setattr(sys, "argv", [
        "compare_methods.py", "--output_dir", str(tmp_path), "--skip_data", "--methods", "siss", "erasediff",
        "--forget_classes", "2", "3", "--max_train_steps", "300", "--num_eval_samples", "256", "--print_only"])
    compare_methods.main()
    out = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(out) if line.startswith("Class unlearning, digit by digit"))
    assert [line.split()[:2] for line in out[start + 2:start + 3]] == [["2", "siss"]]
    assert out[start + 4].split() == ["siss", "1/1"]
    assert out[start + 5].split() == ["erasediff", "not", "run", "(no", "report):", "digits", "2", "3"]
    assert out[start + 6].split() == ["siss", "not", "run", "(no", "report):", "digits", "3"]


def test_tiny_sweep_runs_and_reuses(monkeypatch, tmp_path, capsys):
    """One digit, one step and a few samples through train_unlearn_ddpm.py; a rerun with --reuse trains nothing."""
    argv = ["compare_methods.py", "--output_dir", str(tmp_path), "--skip_data", "--methods", "siss",
            "--forget_classes", "7", "--max_train_steps", "1", "--validation_steps", "1",
            "--num_eval_samples", "16", "--num_validation_images", "4"]
    monkeypatch.setattr(sys, "argv", argv)
    compare_methods.main()
    first = capsys.readouterr().out
    report = json.loads((tmp_path / "class" / "7" / "siss" / "unlearning_report.json").read_text())
    assert report["forget_class"] == 7 and report["num_eval_samples"] == 16
    table = first[first.index("Class unlearning, digit by digit"):].splitlines()
    row = table[2].split()
    assert row[:2] == ["7", "siss"] and float(row[2]) == report["metrics"]["before"]["forget_class_rate"]
    assert table[4].split()[0] == "siss" and table[4].split()[1] in ("0/1", "1/1")

    def no_training(args):
        raise AssertionError("--reuse reran a finished run")

    monkeypatch.setattr(compare_methods.train_unlearn_ddpm, "main", no_training)
    monkeypatch.setattr(sys, "argv", argv + ["--reuse"])
    compare_methods.main()
    again = capsys.readouterr().out
    assert again[again.index("Class unlearning, digit by digit"):] == first[first.index("Class unlearning, digit by digit"):]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["class_sweep"]) == ["7"]
