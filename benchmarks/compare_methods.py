"""Compare every unlearning method on the embedded toy, through train_unlearn_ddpm.py itself.

Data unlearning: remove the memorized canary from the bundled unconditional model with each
method, the same step budget, seeds and evaluation. Class unlearning: remove one digit from
the bundled class-conditional model. Prints two tables, writes a quality-vs-forgetting plot
(PNG, needs matplotlib) and all reports as JSON.

    python benchmarks/compare_methods.py --output_dir compare-out
    python benchmarks/compare_methods.py --methods siss naive_deletion --max_train_steps 100

With --forget_classes, class unlearning runs once per listed digit (reports in <output_dir>/class/<digit>/<method>)
and prints one table of every digit and method, with a count per method of the digits that meet the class target
(PUL >= 90 and keep-class FD at most 15% above the base model's):

    python benchmarks/compare_methods.py --skip_data --methods siss erasediff --forget_classes 0 1 2 3 4 5 6 7 8 9

The data-unlearning table also measures each method against the gold standard, the toy DDPM retrained without
the canary (`retrain` row; columns FD→retrain, loss gap, AUC vs retrain; docs/metrics.md, "Distance to retrain").

With --text_to_image_toy, the same comparison runs through train_unlearn_sd.py on a text-to-image toy
(sd_tiny, sd_tiny_captioned whose canary has a caption of its own, or sd3_tiny for flow matching): each method with the script's toy defaults, one table.

    python benchmarks/compare_methods.py --text_to_image_toy sd3_tiny --output_dir compare-flow
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import train_unlearn_ddpm  # noqa: E402
import train_unlearn_sd  # noqa: E402
from diffusers_unlearn.verdict import VerdictThresholds  # noqa: E402

# (label, extra flags). Each run uses the same seeds, steps and evaluation.
DATA_METHODS = [
    ("naive_deletion", ["--method", "naive_deletion"]),
    ("neggrad", ["--method", "neggrad"]),
    ("erasediff", ["--method", "erasediff"]),
    ("vdu", ["--method", "vdu"]),
    ("siss", ["--method", "siss"]),
    ("siss_no_is", ["--method", "siss_no_is"]),
    ("siss_bernoulli", ["--method", "siss_bernoulli"]),
    ("siss[refresh=10]", ["--method", "siss", "--siss_norm_refresh_every", "10"]),
    ("siss[lambda=0]", ["--method", "siss", "--siss_lambda", "0"]),
    ("siss[lambda=1]", ["--method", "siss", "--siss_lambda", "1"]),
]
CLASS_METHODS = [
    ("naive_deletion", ["--method", "naive_deletion"]),
    ("neggrad", ["--method", "neggrad"]),
    ("erasediff", ["--method", "erasediff"]),
    ("vdu", ["--method", "vdu"]),
    ("siss", ["--method", "siss"]),
]
# The class-unlearning target, the verdict's default thresholds: the forgotten class gone (PUL) while the other
# classes keep their quality (keep-class FD after / before; lower FD is better, so only a rise counts against it).
CLASS_TARGET_PUL = VerdictThresholds().min_pul
CLASS_TARGET_FD_RATIO = 1.0 + VerdictThresholds().max_fd_increase
TEXT_TO_IMAGE_METHODS = [
    ("naive_deletion", ["--method", "naive_deletion"]),
    ("neggrad", ["--method", "neggrad"]),
    ("erasediff", ["--method", "erasediff"]),
    ("siss", ["--method", "siss"]),
]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="compare-methods-output")
    parser.add_argument("--max_train_steps", type=int, default=300)
    parser.add_argument("--num_eval_samples", type=int, default=2048)
    parser.add_argument("--validation_steps", type=int, default=25)
    parser.add_argument("--num_validation_images", type=int, default=512)
    parser.add_argument("--forget_class", type=int, default=1, help="class unlearning: the digit to forget")
    parser.add_argument("--forget_classes", type=int, nargs="+", default=None, metavar="DIGIT",
                        help="class unlearning for each of these digits instead of --forget_class (reports in "
                             "<output_dir>/class/<digit>/<method>); one table of every digit and method, and per "
                             f"method the number of digits with PUL >= {CLASS_TARGET_PUL:g} and keep-class FD/base <= "
                             f"{CLASS_TARGET_FD_RATIO:g}")
    parser.add_argument("--methods", nargs="*", default=None, help="labels to run (default: all)")
    parser.add_argument("--skip_class", action="store_true", help="skip the class-unlearning part")
    parser.add_argument("--skip_data", action="store_true", help="skip the data-unlearning part")
    parser.add_argument("--stop_at_heldout_level", action="store_true",
                        help="each data-unlearning run with train_unlearn_ddpm.py's calibrated stopping rule (stops when "
                             "the forget items' loss reaches the held-out digits' level, checked every --validation_steps); "
                             "prints the step each run stopped at. Class runs never use it (the script refuses it there).")
    parser.add_argument("--heldout_level_margin", type=float, default=None, help="with --stop_at_heldout_level (default: the script's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true",
                        help="keep the reports already in --output_dir (those of the same method, forget class, seed, "
                             "steps and sample count) instead of rerunning them, so an interrupted sweep continues")
    parser.add_argument("--print_only", action="store_true",
                        help="train nothing: print the tables from the reports already in --output_dir (as --reuse keeps "
                             "them); runs without one are left out, and the digit-by-digit table lists them as not run")
    parser.add_argument("--retrained_model_name_or_path", default=None,
                        help="data unlearning: the DDPM retrained without the canary (default: the bundled "
                             "ddpm_unconditional_retrained_without_canary)")
    parser.add_argument("--skip_retrain", action="store_true", help="data unlearning: no retrain row or distance-to-retrain columns")
    parser.add_argument("--text_to_image_toy", choices=["sd_tiny", "sd_tiny_captioned", "sd3_tiny"], default=None,
                        help="compare naive deletion, NegGrad, EraseDiff and SISS through train_unlearn_sd.py on this toy "
                             "(the script's toy defaults; --max_train_steps and the evaluation sizes are not applied)")
    args = parser.parse_args()
    # Checked here, before any training: a typo must not surface after hours of runs.
    for digit in args.forget_classes or [args.forget_class]:
        if not 0 <= digit <= 9:
            parser.error(f"the class-conditional toy has digits 0-9; got class {digit}.")
    if args.forget_classes and len(set(args.forget_classes)) != len(args.forget_classes):
        parser.error(f"--forget_classes lists a digit twice: {args.forget_classes}.")
    return args


def run(flags: list[str], reuse: bool = False, script=train_unlearn_ddpm, train: bool = True) -> Optional[dict]:
    """One run's report. A rerun replaces an earlier result in the same folder, unless `reuse` keeps it; with
    `train=False` nothing is trained and a run without a report of these settings gives None."""
    args = script.parse_args([*flags, "--overwrite_output_dir"])
    path = os.path.join(args.output_dir, "unlearning_report.json")
    report = None
    if (reuse or not train) and os.path.exists(path):
        with open(path) as f:
            report = json.load(f)
        if not same_settings(report, args):  # a report of other settings would silently mix into the table
            print(f"--reuse: {path} was made with other settings; running again.")
            report = None
    if report is None and train:
        script.main(args)
        with open(path) as f:
            report = json.load(f)
    return report


def same_settings(report: dict, args) -> bool:
    """Whether a stored report was made with the settings `args` asks for (those the tables depend on)."""
    keys = [key for key in ("method", "seed", "max_train_steps", "num_eval_samples", "forget_class") if key in report and hasattr(args, key)]
    if getattr(args, "stop_at_heldout_level", False):  # the rule and its margin
        if (report.get("stopping") or {}).get("margin") != args.heldout_level_margin:
            return False
    elif report.get("stopping") is not None:
        return False
    return all(report[key] == getattr(args, key) for key in keys)


def compare_text_to_image(args) -> None:
    """Each method on a text-to-image toy with train_unlearn_sd.py's toy defaults and seeds; one table."""
    from diffusers_unlearn.toy import toy_model_path

    reports = {}
    for label, flags in TEXT_TO_IMAGE_METHODS:
        if args.methods and label not in args.methods:
            continue
        out = os.path.join(args.output_dir, args.text_to_image_toy, label)
        report = run([*flags, "--pretrained_model_name_or_path", toy_model_path(args.text_to_image_toy),
                      "--output_dir", out, "--seed", str(args.seed)], args.reuse, script=train_unlearn_sd, train=not args.print_only)
        if report is not None:
            reports[label] = report
    with open(os.path.join(args.output_dir, f"results_{args.text_to_image_toy}.json"), "w") as f:
        json.dump(reports, f, indent=2)
    if not reports:
        return
    first = next(iter(reports.values()))
    base = first["metrics"]["before"]
    print(f"\nText-to-image toy {args.text_to_image_toy}: the canary under {first['forget_prompts'][0]!r}, "
          f"{first['max_train_steps']} steps, {base['num_eval_images_per_prompt']} generations of that prompt")
    header = ("method", "mem. rate", "after/base", "other acc.", "other noise norm", "forget loss", "keep loss", "MIA AUC", "wall s")
    print(f"{header[0]:18s} " + " ".join(f"{h:>16s}" for h in header[1:]))

    def row(label, metrics, ratio, wall):
        cells = [fmt(metrics["memorization_rate"]), ratio, fmt(metrics.get("other_prompts_digit_accuracy")),
                 fmt(metrics.get("other_prompts_noise_norm")), fmt(metrics.get("forget_loss")),
                 fmt(metrics.get("keep_loss")), fmt(metrics.get("mia_auc"), 3), wall]
        print(f"{label:18s} " + " ".join(f"{c:>16s}" for c in cells))

    row("(base model)", base, "1.00", "")
    for label, report in reports.items():
        after = report["metrics"]["after"]
        ratio = after["memorization_rate"] / base["memorization_rate"] if base["memorization_rate"] else None
        row(label, after, fmt(ratio, 3), f"{report['wall_seconds']:.0f}")


def data_table(reports: dict) -> list[str]:
    """The data-unlearning table's lines: the base model, the retrained model (`retrain`, when the reports carry
    one) and each method after unlearning; the last three columns are the distance to the retrained model."""
    base = next(iter(reports.values()))["metrics"]["before"]
    header = ("mem. rate", "FD", "FD/base", "clf score", "forget loss", "keep loss", "MIA AUC", "first 0", "0 from",
              "wall s", "FD→retrain", "loss gap", "AUC vs retr.")
    widths = (10, 8, 8, 9, 12, 10, 8, 8, 7, 7, 10, 9, 12)
    lines = [f"{'method':18s} " + " ".join(f"{h:>{w}s}" for h, w in zip(header, widths))]

    def row(label, metrics, ratio, first="", stays="", wall="", distance=None):
        distance = metrics if distance is None else distance
        cells = (fmt(metrics["memorization_rate"]), fmt(metrics["fd"], 3), ratio, fmt(metrics["classifier_score"], 2),
                 fmt(metrics["forget_loss"]), fmt(metrics["keep_loss"]), fmt(metrics.get("mia_auc"), 3), first, stays,
                 wall, fmt(distance.get("fd_to_retrain"), 3), fmt(distance.get("forget_loss_gap_to_retrain")),
                 fmt(distance.get("mia_auc_vs_retrain"), 3))
        lines.append(f"{label:18s} " + " ".join(f"{c:>{w}s}" for c, w in zip(cells, widths)))

    row("(base model)", base, "1.00")
    retrained = next((r["retrained_model"] for r in reports.values() if r.get("retrained_model")), None)
    if retrained is not None:
        # Measured against itself: the same samples and the same losses, so FD 0, gap 0 and AUC 0.5 by definition.
        itself = {"fd_to_retrain": 0.0, "forget_loss_gap_to_retrain": 0.0, "mia_auc_vs_retrain": 0.5}
        row("retrain", retrained["metrics"], f"{retrained['metrics']['fd'] / base['fd']:.2f}", distance=itself)
    for label, report in reports.items():
        after = report["metrics"]["after"]
        row(label, after, f"{after['fd'] / base['fd']:.2f}", fmt(first_zero_step(report, "memorization_rate")),
            fmt(stays_zero_step(report, "memorization_rate")), f"{report['wall_seconds']:.0f}")
    return lines


def class_sweep_table(sweep: dict[int, dict[str, dict]]) -> list[str]:
    """The digit-by-digit class-unlearning table's lines: for each digit and method, the forget-class rate before
    and after, PUL, the keep-class FD before and after, FD/base and whether the class target is met; then, per
    method, how many of the digits met it.

    Args:
        sweep: the reports of train_unlearn_ddpm.py, `{digit: {method label: report}}`.
    """
    header = ("digit", "method", "rate before", "rate after", "PUL", "keep FD before", "keep FD after", "FD/base",
              "first 0", "steps", "wall s", "target")
    widths = (5, 14, 11, 10, 6, 14, 13, 7, 7, 5, 6, 6)
    lines = [" ".join(f"{h:<{w}s}" if i < 2 else f"{h:>{w}s}" for i, (h, w) in enumerate(zip(header, widths)))]
    for digit, reports in sweep.items():
        for label, report in reports.items():
            before, after = report["metrics"]["before"], report["metrics"]["after"]
            cells = (str(digit), label, fmt(before["forget_class_rate"]), fmt(after["forget_class_rate"]),
                     fmt(after.get("pul"), 1), fmt(before["fd"], 3), fmt(after["fd"], 3), f"{fd_ratio(report):.2f}",
                     fmt(first_zero_step(report, "forget_class_rate")), str(trained_steps(report)),
                     f"{report['wall_seconds']:.0f}", "yes" if meets_class_target(report) else "no")
            lines.append(" ".join(f"{c:<{w}s}" if i < 2 else f"{c:>{w}s}" for i, (c, w) in enumerate(zip(cells, widths))))
    lines.append(f"Digits meeting the target (PUL >= {CLASS_TARGET_PUL:g} and keep FD/base <= {CLASS_TARGET_FD_RATIO:g}):")
    for label, (met, missed) in class_target_counts(sweep).items():
        note = f" (missed: {' '.join(str(d) for d in missed)})" if missed else ""
        lines.append(f"{label:14s} {len(met)}/{len(met) + len(missed)}{note}")
    return lines


def fd_ratio(report: dict) -> float:
    """Keep FD after unlearning over the base model's (same seeds)."""
    return report["metrics"]["after"]["fd"] / report["metrics"]["before"]["fd"]


def meets_class_target(report: dict, min_pul: float = CLASS_TARGET_PUL, max_fd_ratio: float = CLASS_TARGET_FD_RATIO) -> bool:
    """Whether a class-unlearning run reached PUL >= `min_pul` with keep-class FD/base <= `max_fd_ratio` (a lower
    FD than the base's is better quality, so it meets the target)."""
    pul = report["metrics"]["after"].get("pul")
    return pul is not None and pul >= min_pul and fd_ratio(report) <= max_fd_ratio


def class_target_counts(sweep: dict[int, dict[str, dict]]) -> dict[str, tuple[list[int], list[int]]]:
    """Per method label, the digits whose run met the class target and those whose run missed it."""
    counts: dict[str, tuple[list[int], list[int]]] = {}
    for digit, reports in sweep.items():
        for label, report in reports.items():
            met, missed = counts.setdefault(label, ([], []))
            (met if meets_class_target(report) else missed).append(digit)
    return counts


def trained_steps(report: dict) -> int:
    """The optimizer steps a run took: where --stop_at_heldout_level stopped it, else --max_train_steps."""
    return (report.get("stopping") or {}).get("stopped_at_step") or report["max_train_steps"]


def first_zero_step(report: dict, key: str):
    """The first validation step at which `key` reached 0 (None if it never did)."""
    for row in report.get("validation", []):
        if row.get(key) == 0:
            return row["step"]
    if report["metrics"]["after"].get(key) == 0:
        return report["max_train_steps"]
    return None


def stays_zero_step(report: dict, key: str):
    """The first validation step from which `key` stayed 0 through the end, after-evaluation included (None if
    it was not 0 at the end)."""
    if report["metrics"]["after"].get(key) != 0:
        return None
    step = report["max_train_steps"]
    for row in reversed(report.get("validation", [])):
        if row.get(key) != 0:
            break
        step = row["step"]
    return step


def fmt(value, digits=4):
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def main():
    args = parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    if args.text_to_image_toy:
        compare_text_to_image(args)
        return
    common = [
        "--max_train_steps", str(args.max_train_steps),
        "--num_eval_samples", str(args.num_eval_samples),
        "--validation_steps", str(args.validation_steps),
        "--num_validation_images", str(args.num_validation_images),
        "--checkpointing_steps", str(10**9),
        "--seed", str(args.seed),
    ]
    stop_flags = []  # data unlearning only: train_unlearn_ddpm.py refuses the level rules for class unlearning
    if args.stop_at_heldout_level:
        stop_flags = ["--stop_at_heldout_level"] + (["--heldout_level_margin", str(args.heldout_level_margin)] if args.heldout_level_margin is not None else [])
    results = {"data": {}, "class": {}, "class_sweep": {}}
    not_run: dict[str, list[int]] = {}  # --print_only: the digit-by-digit runs without a report, per method

    if not args.skip_data:
        retrain_flags = []
        if not args.skip_retrain:
            from diffusers_unlearn.toy import DDPM_RETRAINED_NAME, toy_model_path

            retrained = args.retrained_model_name_or_path or toy_model_path(DDPM_RETRAINED_NAME)
            retrain_flags = ["--retrained_model_name_or_path", retrained]
        for label, flags in DATA_METHODS:
            if args.methods and label not in args.methods:
                continue
            out = os.path.join(args.output_dir, "data", label.replace("[", "_").replace("]", "").replace("=", ""))
            report = run([*flags, *common, *stop_flags, *retrain_flags, "--output_dir", out], args.reuse, train=not args.print_only)
            if report is not None:
                results["data"][label] = report

    if not args.skip_class:
        from diffusers_unlearn.toy import toy_model_path

        def run_class(label: str, flags: list[str], digit: int, out: str) -> dict:
            return run([
                *flags, *common, "--output_dir", out,
                "--pretrained_model_name_or_path", toy_model_path("ddpm_class_conditional"),
                "--forget_dataset_name", "toy-digits", "--forget_class", str(digit),
                "--keep_dataset_name", "toy-digits",
            ], args.reuse, train=not args.print_only)

        methods = [(label, flags) for label, flags in CLASS_METHODS if not args.methods or label in args.methods]
        if args.forget_classes:
            # Digit by digit, so an interrupted sweep (rerun with --reuse) has whole digits behind it.
            for digit in args.forget_classes:
                for label, flags in methods:
                    report = run_class(label, flags, digit, os.path.join(args.output_dir, "class", str(digit), label))
                    if report is not None:
                        results["class_sweep"].setdefault(digit, {})[label] = report
                    else:
                        not_run.setdefault(label, []).append(digit)
        else:
            for label, flags in methods:
                report = run_class(label, flags, args.forget_class, os.path.join(args.output_dir, "class", label))
                if report is not None:
                    results["class"][label] = report

    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)

    if results["data"]:
        print(f"\nData unlearning (canary), {args.max_train_steps} steps, {args.num_eval_samples} samples")
        print("\n".join(data_table(results["data"])))
    if results["class"]:
        base = next(iter(results["class"].values()))["metrics"]["before"]
        print(f"\nClass unlearning (digit {args.forget_class}), {args.max_train_steps} steps, {args.num_eval_samples} samples per side")
        print(f"{'method':18s} {'forget-class rate':>18s} {'PUL':>7s} {'keep FD':>8s} {'FD/base':>8s} {'first 0':>8s} {'0 from':>7s} {'wall s':>7s}")
        print(f"{'(base model)':18s} {fmt(base['forget_class_rate']):>18s} {'':>7s} {fmt(base['fd'], 3):>8s} {'1.00':>8s}")
        for label, report in results["class"].items():
            after = report["metrics"]["after"]
            print(
                f"{label:18s} {fmt(after['forget_class_rate']):>18s} {fmt(after.get('pul'), 1):>7s} "
                f"{fmt(after['fd'], 3):>8s} {after['fd'] / base['fd']:8.2f} "
                f"{fmt(first_zero_step(report, 'forget_class_rate')):>8s} {fmt(stays_zero_step(report, 'forget_class_rate')):>7s} "
                f"{report['wall_seconds']:7.0f}"
            )
    if results["class_sweep"]:
        print(f"\nClass unlearning, digit by digit: {args.max_train_steps} steps, {args.num_eval_samples} samples per side")
        print("\n".join(class_sweep_table(results["class_sweep"])))
    for label, digits in not_run.items():
        print(f"{label:14s} not run (no report): digits {' '.join(str(d) for d in digits)}")
    if results["data"] and args.stop_at_heldout_level:
        print(f"\nWhere --stop_at_heldout_level stopped (validation every {args.validation_steps} steps)")
        print("\n".join(stopping_table(results["data"])))
    plot(results, os.path.join(args.output_dir, "quality_vs_forgetting.png"))


def stopping_table(reports: dict) -> list[str]:
    """Where --stop_at_heldout_level stopped each run: the step, and the rule's figures at that validation."""
    lines = [f"{'method':18s} {'stopped at':>10s} {'forget loss':>11s} {'held-out lvl':>12s} {'margin':>6s} {'copies':>6s} {'MIA AUC':>7s}"]
    for label, report in reports.items():
        stop, after = report.get("stopping") or {}, report["metrics"]["after"]
        entry = next((e for e in report.get("validation", []) if e["step"] == stop.get("stopped_at_step")), {})
        lines.append(f"{label:18s} {fmt(stop.get('stopped_at_step')):>10s} {fmt(entry.get('forget_loss_median')):>11s} "
                     f"{fmt(entry.get('heldout_level')):>12s} {fmt(stop.get('margin'), 2):>6s} "
                     f"{fmt(after.get('memorization_count')):>6s} {fmt(after.get('mia_auc'), 3):>7s}")
    return lines


def plot(results: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib).")
        return
    panels = [(kind, results[kind]) for kind in ("data", "class") if results.get(kind)]
    if not panels:
        return
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for axis, (kind, data) in zip(axes[0], panels):
        key = "memorization_rate" if kind == "data" else "forget_class_rate"
        base = next(iter(data.values()))["metrics"]["before"]
        axis.scatter([base[key]], [base["fd"]], marker="*", s=150, color="black", label="base model")
        for label, report in data.items():
            after = report["metrics"]["after"]
            axis.scatter([after[key]], [after["fd"]], s=50)
            axis.annotate(label, (after[key], after["fd"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
        axis.set_xlabel(f"{key.replace('_', ' ')} after unlearning (lower = more forgetting)")
        axis.set_ylabel("Fréchet distance in classifier features (lower = better quality)")
        axis.set_yscale("log")
        axis.set_title("data unlearning (canary)" if kind == "data" else "class unlearning")
        axis.legend(loc="best", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"Plot written to {path}")


if __name__ == "__main__":
    main()
