"""Time the no-argument runs of the training scripts, evaluation included.

    python benchmarks/bench_default_run.py            # train_unlearn_ddpm.py (target: <= 180 s on 2 CPU cores)
    python benchmarks/bench_default_run.py --script train_unlearn_sd.py   # target: <= 300 s on 2 CPU cores
    python benchmarks/bench_default_run.py --script train_unlearn_sd.py --toy sd3_tiny   # the flow toy: <= 120 s

Runs the script in a fresh process exactly as a newcomer would, prints the wall time and the
before/after summary from the report it wrote. `--toy` passes a bundled toy's folder as
--pretrained_model_name_or_path (the only argument then given).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", default="train_unlearn_ddpm.py", choices=["train_unlearn_ddpm.py", "train_unlearn_sd.py"])
    parser.add_argument("--toy", default=None, help="a bundled text-to-image toy, e.g. sd3_tiny (train_unlearn_sd.py only)")
    args = parser.parse_args(argv)
    if args.toy is not None:
        from diffusers_unlearn.toy import ASSETS_DIR, TOY_INFO_FILE, TOY_MODELS

        if args.script != "train_unlearn_sd.py":
            parser.error("--toy picks a text-to-image toy: use it with --script train_unlearn_sd.py.")
        text_to_image = [name for name in TOY_MODELS if os.path.isfile(os.path.join(ASSETS_DIR, name, TOY_INFO_FILE))]
        if args.toy not in text_to_image:
            parser.error(f"--toy {args.toy}: not a bundled text-to-image toy; choose from {', '.join(text_to_image)}.")
    return args


def build_command(args) -> list[str]:
    """The newcomer's command line: the script alone, or with a bundled toy's folder."""
    command = [sys.executable, os.path.join(ROOT, args.script)]
    if args.toy:
        from diffusers_unlearn.toy import toy_model_path

        command += ["--pretrained_model_name_or_path", toy_model_path(args.toy)]
    return command


def main():
    args = parse_args()
    command = build_command(args)
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        # No other arguments: the default output_dir is created in the working directory.
        completed = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if completed.returncode != 0:
            print(completed.stderr[-3000:])
            raise SystemExit(f"{args.script} failed with exit code {completed.returncode}")
        outputs = [d for d in os.listdir(workdir) if os.path.isfile(os.path.join(workdir, d, "unlearning_report.json"))]
        report = json.load(open(os.path.join(workdir, outputs[0], "unlearning_report.json")))
    print_report(report, wall, args.script, args.toy)


def print_report(report: dict, wall: float, script: str, toy=None) -> None:
    """What the benchmark prints: the wall time, the before/after figures, the targets' ratios and the verdict."""
    given = f"--pretrained_model_name_or_path <{toy}>" if toy else "no arguments"
    print(f"{script} with {given}: {wall:.1f} s wall (process start to exit), cpu threads={os.cpu_count()}")
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    print(f"{'metric':30s} {'before':>10s} {'after':>10s}")
    keys = ("memorization_rate", "fd", "noise_norm", "other_prompts_noise_norm", "other_prompts_digit_accuracy",
            "forget_loss", "keep_loss", "heldout_loss", "mia_auc")
    for key in keys:
        if before.get(key) is not None and after.get(key) is not None:
            print(f"{key:30s} {before[key]:10.4f} {after[key]:10.4f}")
    # The targets, as ratios of after to before.
    if before.get("memorization_rate"):
        print(f"memorization rate after / before: {after['memorization_rate'] / before['memorization_rate']:.3f}")
    for key in ("fd", "other_prompts_noise_norm", "other_prompts_digit_accuracy"):
        if before.get(key):
            print(f"{key} change: {100 * (after[key] - before[key]) / before[key]:+.1f}%")
    if report.get("per_prompt"):
        columns = {"memorization_rate": "rate", "noise_norm": "noise norm", "digit_accuracy": "accuracy"}
        print(f"{'prompt':28s} " + " ".join(f"{label + ' ' + phase:>17s}" for label in columns.values() for phase in ("before", "after")))
        for prompt, values in report["per_prompt"].items():
            cells = []
            for column in columns:
                for phase in ("before", "after"):
                    value = values.get(column, {}).get(phase)
                    cells.append(f"{value:17.4f}" if value is not None else f"{'-':>17s}")
            print(f"{prompt:28s} " + " ".join(cells))
    if report.get("verdict"):
        from diffusers_unlearn.verdict import print_verdict

        print_verdict(report["verdict"])
    samples = report.get("num_eval_samples", before.get("num_eval_images_per_prompt"))
    print(json.dumps({"script": script, "toy": toy, "wall_seconds": wall, "num_eval_samples": samples}))


if __name__ == "__main__":
    main()
