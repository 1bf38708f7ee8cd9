"""The two baselines every unlearning paper compares against.

* naive deletion: keep fine-tuning on the keep set with the ordinary denoising loss.
  Safe for quality, slow to forget.
* NegGrad: gradient ascent on the forget set's denoising loss. Forgets fast, destroys
  quality. With `keep_weight > 0` it becomes "NegGrad+": keep_weight * L_keep - alpha * L_forget.
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import (
    DenoisingBatch,
    Denoiser,
    LossTerms,
    UnlearningObjective,
    check_non_negative,
    check_positive,
    denoising_loss,
)


class NaiveDeletion(UnlearningObjective):
    """Fine-tune on the keep set only.

    Example:
        >>> terms = get_objective("naive_deletion")(denoiser, None, keep_batch)
    """

    name = "naive_deletion"
    needs_forget = False

    def __call__(
        self,
        denoiser: Denoiser,
        forget_batch: Optional[DenoisingBatch] = None,
        keep_batch: Optional[DenoisingBatch] = None,
        generator: Optional[torch.Generator] = None,
    ) -> LossTerms:
        self._check_batches(forget_batch, keep_batch)
        keep_loss = denoising_loss(denoiser, keep_batch, generator, self.timestep_range).mean()
        return LossTerms(keep=keep_loss, logs={"loss_keep": keep_loss.detach()})


class NegGrad(UnlearningObjective):
    """Gradient ascent on the forget set, optionally with a keep term (NegGrad+).

    Args:
        alpha: weight of the (negated) forget loss.
        keep_weight: weight of the keep loss; 0 (default) is plain NegGrad and needs no keep set.
    """

    name = "neggrad"
    flag_prefix = "neggrad"

    def __init__(self, alpha: float = 1.0, keep_weight: float = 0.0, timestep_range=None):
        super().__init__(timestep_range)
        self.alpha = check_positive("alpha", alpha)
        self.keep_weight = check_non_negative("keep_weight", keep_weight)
        self.needs_keep = self.keep_weight > 0

    def __call__(
        self,
        denoiser: Denoiser,
        forget_batch: DenoisingBatch,
        keep_batch: Optional[DenoisingBatch] = None,
        generator: Optional[torch.Generator] = None,
    ) -> LossTerms:
        self._check_batches(forget_batch, keep_batch)
        forget_loss = denoising_loss(denoiser, forget_batch, generator, self.timestep_range).mean()
        logs = {"loss_forget": forget_loss.detach()}
        keep = None
        if self.keep_weight > 0:
            keep_loss = denoising_loss(denoiser, keep_batch, generator, self.timestep_range).mean()
            logs["loss_keep"] = keep_loss.detach()
            keep = self.keep_weight * keep_loss
        return LossTerms(keep=keep, forget=-self.alpha * forget_loss, logs=logs)
