"""The verdict: what an unlearning run proved, claim by claim, with the figure, the threshold and pass/fail.

Both training scripts add a `verdict` block to `unlearning_report.json` and a "Verdict" section to the model card,
so the card can be handed to someone else and states what was and was not shown. Each claim is judged from the
evaluation after unlearning (and, where the claim is about change, the same evaluation before it):

- `copies_gone`: the memorization rate after (generations that the copy detector calls copies of a forget item)
  is at most `--verdict_max_copy_rate` (default 0). Class unlearning instead claims `class_forgotten`: PUL (the
  percentage drop of samples the classifier assigns to the class) is at least `--verdict_min_pul` (default 90).
- `forget_like_unseen`: the loss-threshold membership-inference AUC of the forget items against held-out items
  is within `--verdict_mia_auc_tolerance` (default 0.15) of 0.5, i.e. in [0.35, 0.65]: the attacker cannot tell
  them from data the model never saw, neither by a low loss (still remembered) nor by a high one (overshoot).
- `others_unchanged`: the best figure the run has for everything else, in this order: the other prompts' digit
  accuracy (text-to-image toys) may fall by at most `--verdict_max_accuracy_drop` (default 0.05); the FD of the
  samples to the real keep data may rise by at most `--verdict_max_fd_increase` (default 0.15, i.e. 15%); the keep
  set's denoising loss may rise by at most `--verdict_max_keep_loss_increase` (default 0.10).
- `close_to_retrain`: with `--retrained_model_name_or_path`, the FD between the unlearned model's samples and the
  retrained model's (same seeds) is at most `--verdict_max_retrain_fd_ratio` (default 1.0) times the base model's,
  i.e. unlearning moved the model toward the model that never saw the data. Without features (no FD), the per-query
  AUC of the forget losses against the retrained model's must be within the AUC tolerance of 0.5.

A claim whose figure was not measured is "not shown", with the reason and the flag that would measure it; the
overall result is "pass" only when every shown claim passes, and the card lists what was not shown.

Example:
    >>> before = {"memorization_rate": 0.5, "mia_auc": 1.0, "fd": 4.0}
    >>> after = {"memorization_rate": 0.0, "mia_auc": 0.55, "fd": 4.2}
    >>> verdict = build_verdict(before, after, VerdictThresholds())
    >>> [(c["claim"], c["result"]) for c in verdict["claims"]]
    [('copies_gone', 'pass'), ('forget_like_unseen', 'pass'), ('others_unchanged', 'pass'), ('close_to_retrain', 'not shown')]
    >>> verdict["result"]
    'pass'
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Any, Optional

PASS, FAIL, NOT_SHOWN = "pass", "fail", "not shown"

CLAIM_TEXT = {
    "copies_gone": "No generation is a copy of a forget item",
    "class_forgotten": "The forgotten class is no longer generated",
    "forget_like_unseen": "The forget items look like data the model never saw",
    "others_unchanged": "Everything else is unchanged",
    "close_to_retrain": "The model moved toward a model retrained without the forget data",
}


@dataclass
class VerdictThresholds:
    """The thresholds of the verdict's claims (see the module docstring); the defaults are the flags' defaults."""

    max_copy_rate: float = 0.0
    min_pul: float = 90.0
    mia_auc_tolerance: float = 0.15
    max_accuracy_drop: float = 0.05
    max_fd_increase: float = 0.15
    max_keep_loss_increase: float = 0.10
    max_retrain_fd_ratio: float = 1.0

    def check(self) -> None:
        """Raise ValueError naming the flag when a threshold is out of its range."""
        ranges = {
            "max_copy_rate": (0.0, 1.0), "min_pul": (0.0, 100.0), "mia_auc_tolerance": (0.0, 0.5),
            "max_accuracy_drop": (0.0, 1.0), "max_fd_increase": (0.0, float("inf")),
            "max_keep_loss_increase": (0.0, float("inf")), "max_retrain_fd_ratio": (0.0, float("inf")),
        }
        for name, (low, high) in ranges.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"--verdict_{name} must be in [{low}, {high}], got {value}.")


HELP = {
    "max_copy_rate": "copies_gone passes when the memorization rate after unlearning is at most this (default 0: no copy).",
    "min_pul": "Class unlearning: class_forgotten passes when PUL is at least this (default 90).",
    "mia_auc_tolerance": "forget_like_unseen passes when the forget-vs-held-out MIA AUC is within this of 0.5 (default 0.15: [0.35, 0.65]).",
    "max_accuracy_drop": "others_unchanged (text-to-image toys): the other prompts' digit accuracy may fall by at most this (default 0.05).",
    "max_fd_increase": "others_unchanged: the FD to the real keep data may rise by at most this fraction (default 0.15).",
    "max_keep_loss_increase": "others_unchanged without a classifier: the keep loss may rise by at most this fraction (default 0.10).",
    "max_retrain_fd_ratio": "close_to_retrain passes when FD(unlearned, retrained) <= this x FD(base, retrained) (default 1.0).",
}


def add_verdict_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--verdict_*` threshold flags both scripts share."""
    defaults = VerdictThresholds()
    for name, text in HELP.items():
        parser.add_argument(f"--verdict_{name}", type=float, default=getattr(defaults, name), help=text)


def thresholds_from_args(args: argparse.Namespace) -> VerdictThresholds:
    """The thresholds given by the `--verdict_*` flags, checked (ValueError names the flag)."""
    thresholds = VerdictThresholds(**{name: getattr(args, f"verdict_{name}") for name in HELP})
    thresholds.check()
    return thresholds


def check_verdict_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Parse-time check of the `--verdict_*` flags; sets `args.verdict_thresholds`."""
    try:
        args.verdict_thresholds = thresholds_from_args(args)
    except ValueError as error:
        parser.error(str(error))


def _claim(name: str, figure: str, measured: Optional[float], threshold: str, passed: Optional[bool],
           reason: Optional[str] = None, base: Optional[float] = None) -> dict[str, Any]:
    result = NOT_SHOWN if passed is None else (PASS if passed else FAIL)
    claim = {"claim": name, "statement": CLAIM_TEXT[name], "figure": figure, "measured": measured, "base": base,
             "threshold": threshold, "result": result}
    if reason is not None:
        claim["reason"] = reason
    return claim


def build_verdict(
    before: dict[str, Any],
    after: dict[str, Any],
    thresholds: VerdictThresholds,
    class_unlearning: bool = False,
    retrained_model: Optional[str] = None,
) -> dict[str, Any]:
    """Judge each claim from the evaluation before and after unlearning (the scripts' `metrics` dicts).

    Returns `{"result", "claims", "not_shown", "thresholds"}`: `claims` holds one dict per claim (claim,
    statement, figure, measured, base, threshold, result and, when not shown, the reason).
    """
    claims = []

    if class_unlearning:
        pul = after.get("pul")
        claims.append(_claim(
            "class_forgotten", "PUL", pul, f">= {thresholds.min_pul:g}",
            None if pul is None else pul >= thresholds.min_pul,
            reason=None if pul is not None else "the base model generated none of the class, so PUL is undefined",
        ))
    else:
        rate = after.get("memorization_rate")
        claims.append(_claim(
            "copies_gone", "memorization_rate", rate, f"<= {thresholds.max_copy_rate:g}",
            None if rate is None else rate <= thresholds.max_copy_rate,
            reason=None if rate is not None else "no copy count was measured",
            base=before.get("memorization_rate"),
        ))

    auc = after.get("mia_auc")
    tolerance = thresholds.mia_auc_tolerance
    claims.append(_claim(
        "forget_like_unseen", "mia_auc", auc, f"in [{0.5 - tolerance:g}, {0.5 + tolerance:g}]",
        None if auc is None else 0.5 - tolerance <= auc <= 0.5 + tolerance,
        reason=None if auc is not None else "no held-out data: give --heldout_data_dir (images the model never saw)",
        base=before.get("mia_auc"),
    ))

    claims.append(_others_unchanged(before, after, thresholds))

    if retrained_model is None:
        claims.append(_claim("close_to_retrain", "fd_to_retrain", None, f"<= {thresholds.max_retrain_fd_ratio:g} x base",
                             None, reason="no retrained model: give --retrained_model_name_or_path"))
    elif after.get("fd_to_retrain") is not None and before.get("fd_to_retrain") is not None:
        limit = thresholds.max_retrain_fd_ratio * before["fd_to_retrain"]
        claims.append(_claim(
            "close_to_retrain", "fd_to_retrain", after["fd_to_retrain"],
            f"<= {thresholds.max_retrain_fd_ratio:g} x base ({limit:.4g})", after["fd_to_retrain"] <= limit,
            base=before["fd_to_retrain"],
        ))
    else:
        auc = after.get("mia_auc_vs_retrain")
        claims.append(_claim(
            "close_to_retrain", "mia_auc_vs_retrain", auc, f"in [{0.5 - tolerance:g}, {0.5 + tolerance:g}]",
            None if auc is None else 0.5 - tolerance <= auc <= 0.5 + tolerance,
            reason=None if auc is not None else "the retrained model's distance was not measured",
            base=before.get("mia_auc_vs_retrain"),
        ))

    shown = [c for c in claims if c["result"] != NOT_SHOWN]
    if not shown:
        result = NOT_SHOWN
    else:
        result = PASS if all(c["result"] == PASS for c in shown) else FAIL
    return {
        "result": result,
        "claims": claims,
        "not_shown": [c["claim"] for c in claims if c["result"] == NOT_SHOWN],
        "thresholds": asdict(thresholds),
    }


def _others_unchanged(before: dict[str, Any], after: dict[str, Any], thresholds: VerdictThresholds) -> dict[str, Any]:
    key = "other_prompts_digit_accuracy"
    if before.get(key) is not None and after.get(key) is not None:
        limit = before[key] - thresholds.max_accuracy_drop
        return _claim("others_unchanged", key, after[key], f">= base - {thresholds.max_accuracy_drop:g} ({limit:.4g})",
                      after[key] >= limit, base=before[key])
    for key, allowed in (("fd", thresholds.max_fd_increase), ("keep_loss", thresholds.max_keep_loss_increase)):
        if before.get(key) is not None and after.get(key) is not None:
            limit = before[key] * (1.0 + allowed)
            return _claim("others_unchanged", key, after[key], f"<= base x {1.0 + allowed:g} ({limit:.4g})",
                          after[key] <= limit, base=before[key])
    return _claim("others_unchanged", "fd", None, "–", None,
                  reason="no quality figure was measured (no classifier, no keep set)")


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def verdict_table(verdict: dict[str, Any]) -> str:
    """The verdict as markdown (the model card's section): one row per claim, then the overall result."""
    lines = ["| claim | figure | base | after | threshold | result |", "|---|---|---|---|---|---|"]
    for c in verdict["claims"]:
        result = c["result"] if c["result"] != NOT_SHOWN else f"not shown: {c['reason']}"
        lines.append(f"| {c['statement']} | `{c['figure']}` | {_fmt(c['base'])} | {_fmt(c['measured'])} | {c['threshold']} | {result} |")
    overall = f"\n**Overall: {verdict['result']}**"
    if verdict["not_shown"]:
        overall += f" (on the claims shown; not shown: {', '.join(verdict['not_shown'])})"
    return "\n".join(lines) + overall + "."


def print_verdict(verdict: dict[str, Any]) -> None:
    """The verdict as the scripts print it after the summary table."""
    print(f"\nVerdict: {verdict['result']}")
    for c in verdict["claims"]:
        if c["result"] == NOT_SHOWN:
            print(f"  {c['claim']:20s} not shown ({c['reason']})")
        else:
            print(f"  {c['claim']:20s} {c['result']:5s} {c['figure']} = {_fmt(c['measured'])} (threshold {c['threshold']})")


__all__ = ["VerdictThresholds", "add_verdict_arguments", "build_verdict", "check_verdict_arguments", "print_verdict", "thresholds_from_args", "verdict_table"]
