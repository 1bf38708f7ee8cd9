"""Time the no-argument runs of the training scripts, evaluation included.

    python benchmarks/bench_default_run.py            # train_unlearn_ddpm.py (target: <= 180 s on 2 CPU cores)

Runs the script in a fresh process exactly as a newcomer would, prints the wall time and the
before/after summary from the report it wrote.
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", default="train_unlearn_ddpm.py")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        # No arguments: the default output_dir is created in the working directory.
        completed = subprocess.run([sys.executable, os.path.join(ROOT, args.script)], cwd=workdir, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if completed.returncode != 0:
            print(completed.stderr[-3000:])
            raise SystemExit(f"{args.script} failed with exit code {completed.returncode}")
        outputs = [d for d in os.listdir(workdir) if os.path.isfile(os.path.join(workdir, d, "unlearning_report.json"))]
        report = json.load(open(os.path.join(workdir, outputs[0], "unlearning_report.json")))
    print(f"{args.script} with no arguments: {wall:.1f} s wall (process start to exit), cpu threads={os.cpu_count()}")
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    print(f"{'metric':20s} {'before':>10s} {'after':>10s}")
    for key in ("memorization_rate", "fd", "forget_loss", "keep_loss", "heldout_loss", "mia_auc"):
        if key in before:
            print(f"{key:20s} {before[key]:10.4f} {after[key]:10.4f}")
    print(json.dumps({"script": args.script, "wall_seconds": wall, "num_eval_samples": report["num_eval_samples"]}))


if __name__ == "__main__":
    main()
