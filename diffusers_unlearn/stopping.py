"""Calibrated forgetting: stop training when the forget items look like unseen data.

Unlearning methods that push the forget items' denoising loss up do not stop at the level of data the model
never saw: on the DDPM toy every method that removes the canary drives its loss far above the held-out digits'
(membership-inference AUC near 0, not 0.5), which an attacker can detect as well as memorization. With
`--stop_at_heldout_level`, both training scripts measure, at every `--validation_steps`, the per-item denoising
losses (`metrics.denoising_losses`: the evaluation's fixed timestep grid and seeded noise) of the forget set and
of the held-out set, and end training at the first validation where

    median(forget losses) >= (1 - margin) * median(held-out losses)

`margin` is `--heldout_level_margin` (a fraction of the held-out level, so the rule is free of the loss scale,
which differs between model families and loss spaces), and, where the validation counts copies of the forget items
among its samples (`memorization_rate`), none of them is a copy: a loss at the level with copies still drawn is
not forgetting (EraseDiff on the DDPM toy reaches the level a few steps before its last copies go). The medians make the rule agree with the
membership-inference AUC: with one forget item, the loss-threshold AUC of that item against the held-out set is
the fraction of held-out items whose loss is above it, 0.5 exactly at the held-out median. A margin > 0 stops a
little before the level, because the loss keeps rising between two validations.

The decision is made on the main process (where validation runs) and broadcast to every process, so all ranks
stop at the same optimizer step; the stopping step is checkpointed and recorded in the validation history, so a
resumed run that had stopped trains no further.

Example:
    >>> rule = HeldoutLevelRule(margin=0.1)
    >>> rule.reason({"step": 20, "forget_loss_median": 0.055, "heldout_level": 0.06})
    'forget loss 0.055 >= (1 - 0.1) x held-out level 0.06 at step 20'
    >>> rule.reason({"step": 10, "forget_loss_median": 0.01, "heldout_level": 0.06}) is None
    True
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Optional

import torch

DEFAULT_MARGIN = 0.05
STOP_KEY = "stopped"  # the validation-history entry of the stopping step holds the reason under this key


def add_stopping_arguments(parser: argparse.ArgumentParser) -> None:
    """The two flags both scripts share."""
    parser.add_argument(
        "--stop_at_heldout_level", action="store_true",
        help="Stop training at the first validation (every --validation_steps) where the forget items' median "
             "denoising loss reaches (1 - --heldout_level_margin) x the held-out items' median loss, i.e. where "
             "they look like data the model never saw, instead of overshooting. Needs held-out data "
             "(--heldout_data_dir, built into the toys).",
    )
    parser.add_argument(
        "--heldout_level_margin", type=float, default=DEFAULT_MARGIN,
        help=f"Fraction of the held-out level below it at which --stop_at_heldout_level stops (default "
             f"{DEFAULT_MARGIN}; 0 stops only at the level itself).",
    )


def check_stopping_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, has_heldout: bool) -> None:
    """Parse-time checks: refused without held-out data, before any model loads."""
    if not 0.0 <= args.heldout_level_margin < 1.0:
        parser.error(f"--heldout_level_margin must be in [0, 1), got {args.heldout_level_margin}.")
    if args.stop_at_heldout_level and not has_heldout:
        parser.error("--stop_at_heldout_level needs held-out data (images the model never saw): give --heldout_data_dir.")


def check_stopping_with_sharding(args: argparse.Namespace, fsdp: bool) -> None:
    """FSDP runs skip validation during training, so the rule would never act: refused, before models load."""
    if fsdp and args.stop_at_heldout_level:
        from .errors import UserInputError

        raise UserInputError("--stop_at_heldout_level acts at validations, which FSDP runs skip: use DDP or one process.")


@dataclass
class HeldoutLevelRule:
    """Decides, from one validation entry, whether training stops (see the module docstring)."""

    margin: float = DEFAULT_MARGIN

    def measure(self, forget_losses: torch.Tensor, heldout_losses: torch.Tensor) -> dict[str, float]:
        """The validation-history figures of the rule, from per-item losses (forget, held-out)."""
        from .metrics import mia_auc

        return {
            "forget_loss_median": float(forget_losses.median()),
            "heldout_level": float(heldout_losses.median()),
            "mia_auc": float(mia_auc(forget_losses, heldout_losses)),
        }

    def reason(self, entry: Optional[dict[str, Any]]) -> Optional[str]:
        """Why training stops at this validation entry, or None to go on."""
        if not entry or "forget_loss_median" not in entry:
            return None
        forget, level = entry["forget_loss_median"], entry["heldout_level"]
        if entry.get("memorization_rate"):  # copies among the validation samples: not forgotten yet
            return None
        if forget >= (1.0 - self.margin) * level:
            return f"forget loss {forget:.4g} >= (1 - {self.margin:g}) x held-out level {level:.4g} at step {entry['step']}"
        return None

    def summary(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """The report's `stopping` block: the rule, and the step it stopped at (None: it ran to the end)."""
        stopped = stopped_entry(history)
        return {
            "rule": "heldout_level",
            "criterion": "median forget loss >= (1 - margin) x median held-out loss, and no copy among the validation samples, at each validation",
            "margin": self.margin,
            "stopped_at_step": stopped["step"] if stopped else None,
            "reason": stopped[STOP_KEY] if stopped else "the level was not reached before --max_train_steps",
        }


def stopped_entry(history: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The validation entry at which a run stopped, or None."""
    return next((entry for entry in history if entry.get(STOP_KEY)), None)


def broadcast_stop(accelerator, stop: bool) -> bool:
    """The main process's decision, on every process (a no-op collective in a single process)."""
    if accelerator.num_processes == 1:
        return stop
    from accelerate.utils import broadcast

    flag = torch.tensor([1 if stop else 0], device=accelerator.device)
    return bool(broadcast(flag, from_process=0).item())
