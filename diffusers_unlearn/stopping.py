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

`--stop_at_retrained_level` uses the same rule with another level: the median of the forget items' losses under a
model retrained without them (`--retrained_model_name_or_path`, the same queries). Held-out data of another kind
than the forget items can sit far from that level: the DDPM toy's canary is not a digit, and the model retrained
without it gives it ten times the held-out digits' loss while drawing no copy (docs/results.md).

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
    """The three flags both scripts share."""
    parser.add_argument(
        "--stop_at_heldout_level", action="store_true",
        help="Stop training at the first validation (every --validation_steps) where the forget items' median "
             "denoising loss reaches (1 - --heldout_level_margin) x the held-out items' median loss, i.e. where "
             "they look like data the model never saw, instead of overshooting. Needs held-out data "
             "(--heldout_data_dir, built into the toys).",
    )
    parser.add_argument(
        "--stop_at_retrained_level", action="store_true",
        help="As --stop_at_heldout_level, with the level taken from the model retrained without the forget data "
             "(--retrained_model_name_or_path): the median of its losses on the forget items, same queries.",
    )
    parser.add_argument(
        "--heldout_level_margin", type=float, default=DEFAULT_MARGIN,
        help=f"Fraction of the level below it at which --stop_at_heldout_level / --stop_at_retrained_level stops "
             f"(default {DEFAULT_MARGIN}; 0 stops only at the level itself).",
    )


def check_stopping_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, has_heldout: bool) -> None:
    """Parse-time checks: refused without held-out data, before any model loads."""
    if not 0.0 <= args.heldout_level_margin < 1.0:
        parser.error(f"--heldout_level_margin must be in [0, 1), got {args.heldout_level_margin}.")
    if args.stop_at_heldout_level and not has_heldout:
        parser.error("--stop_at_heldout_level needs held-out data (images the model never saw): give --heldout_data_dir.")
    if args.stop_at_retrained_level:
        if args.stop_at_heldout_level:
            parser.error("Give --stop_at_heldout_level or --stop_at_retrained_level, not both: they stop at different levels.")
        if getattr(args, "retrained_model_name_or_path", None) is None:
            parser.error("--stop_at_retrained_level needs the retrained model: give --retrained_model_name_or_path.")


def check_stopping_with_sharding(args: argparse.Namespace, fsdp: bool) -> None:
    """FSDP runs skip validation during training, so the rule would never act: refused, before models load."""
    if fsdp and (args.stop_at_heldout_level or args.stop_at_retrained_level):
        from .errors import UserInputError

        flag = "--stop_at_heldout_level" if args.stop_at_heldout_level else "--stop_at_retrained_level"
        raise UserInputError(f"{flag} acts at validations, which FSDP runs skip: use DDP or one process.")


def stopping_rule(args: argparse.Namespace) -> Optional["HeldoutLevelRule"]:
    """The rule the flags ask for, or None."""
    if args.stop_at_heldout_level:
        return HeldoutLevelRule(args.heldout_level_margin)
    if args.stop_at_retrained_level:
        return HeldoutLevelRule(args.heldout_level_margin, reference="retrained")
    return None


@dataclass
class HeldoutLevelRule:
    """Decides, from one validation entry, whether training stops (see the module docstring)."""

    margin: float = DEFAULT_MARGIN
    reference: str = "heldout"  # or "retrained": whose losses give the level

    def __post_init__(self):
        if self.reference not in ("heldout", "retrained"):
            raise ValueError(f"reference must be 'heldout' or 'retrained', got {self.reference!r}.")

    @property
    def level_key(self) -> str:
        return f"{self.reference}_level"

    def measure(self, forget_losses: torch.Tensor, level_losses: torch.Tensor, heldout_losses: Optional[torch.Tensor] = None) -> dict[str, float]:
        """The validation-history figures of the rule, from per-item losses: the forget items', those that give
        the level (held-out items', or the retrained model's on the forget items) and, for the MIA AUC, the
        held-out items' (default: `level_losses`)."""
        from .metrics import mia_auc

        heldout_losses = level_losses if heldout_losses is None else heldout_losses
        entry = {"forget_loss_median": float(forget_losses.median()), self.level_key: float(level_losses.median())}
        if self.reference == "heldout" or heldout_losses is not level_losses:
            entry["mia_auc"] = float(mia_auc(forget_losses, heldout_losses))
        return entry

    def measure_run(self, forget_losses: torch.Tensor, heldout_losses: Optional[torch.Tensor] = None, retrain=None) -> dict[str, float]:
        """`measure` with the level this rule reads: the held-out losses, or the retrained model's per-item forget
        losses (`retrain`, a `metrics.RetrainReference` measured on the same queries)."""
        if self.reference == "retrained":
            return self.measure(forget_losses, retrain.forget_query_losses.mean(dim=1), heldout_losses)
        return self.measure(forget_losses, heldout_losses)

    def reason(self, entry: Optional[dict[str, Any]]) -> Optional[str]:
        """Why training stops at this validation entry, or None to go on."""
        if not entry or "forget_loss_median" not in entry:
            return None
        forget, level = entry["forget_loss_median"], entry[self.level_key]
        if entry.get("memorization_rate"):  # copies among the validation samples: not forgotten yet
            return None
        if forget >= (1.0 - self.margin) * level:
            name = "held-out" if self.reference == "heldout" else "retrained model's"
            return f"forget loss {forget:.4g} >= (1 - {self.margin:g}) x {name} level {level:.4g} at step {entry['step']}"
        return None

    def summary(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """The report's `stopping` block: the rule, and the step it stopped at (None: it ran to the end)."""
        stopped = stopped_entry(history)
        level = "median held-out loss" if self.reference == "heldout" else "the retrained model's median forget loss"
        return {
            "rule": self.level_key,
            "criterion": f"median forget loss >= (1 - margin) x {level}, and no copy among the validation samples, at each validation",
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
