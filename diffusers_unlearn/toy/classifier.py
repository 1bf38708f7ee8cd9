"""A small CNN that labels 8x8 toy images as digits 0..9 or the canary (10).

It is the toy's stand-in for an Inception network: its logits give forget rates and PUL
(what a generated sample depicts), its penultimate features a Fréchet distance (quality).
Saved as `config.json` + `model.safetensors`; loading reads safetensors only (no pickle).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .data import NUM_CLASSES

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class DigitsClassifierConfig:
    """Architecture of `DigitsClassifier`."""

    num_classes: int = NUM_CLASSES
    channels: tuple[int, int] = (32, 64)
    feature_dim: int = 128
    dropout: float = 0.2

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if len(self.channels) != 2 or min(self.channels) < 1:
            raise ValueError(f"channels must be two positive ints, got {self.channels}.")
        if self.num_classes < 2 or self.feature_dim < 1 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"Invalid classifier config: {self}.")


class DigitsClassifier(nn.Module):
    """CNN for `[N, 1, 8, 8]` inputs in [-1, 1]: two conv stages (8x8 -> 4x4 -> 2x2) and an MLP head.

    Example:
        >>> model = DigitsClassifier()
        >>> model(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 11])
    """

    def __init__(self, config: Union[DigitsClassifierConfig, None] = None, **kwargs) -> None:
        super().__init__()
        self.config = config if config is not None else DigitsClassifierConfig(**kwargs)
        c1, c2 = self.config.channels
        self.conv = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(c1, c1, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c2 * 2 * 2, self.config.feature_dim), nn.SiLU())
        self.dropout = nn.Dropout(self.config.dropout)
        self.head = nn.Linear(self.config.feature_dim, self.config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features `[N, feature_dim]` (for Fréchet distances)."""
        if x.shape[-2:] != (8, 8):
            raise ValueError(f"DigitsClassifier expects 8x8 images, got {tuple(x.shape)}.")
        return self.fc(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits `[N, num_classes]` for images in [-1, 1]."""
        return self.head(self.dropout(self.features(x)))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """`(labels, confidences)`: argmax class and its softmax probability, in eval mode."""
        was_training = self.training
        self.eval()
        probs = torch.cat([self(chunk).softmax(-1) for chunk in x.split(batch_size)])
        self.train(was_training)
        confidence, labels = probs.max(-1)
        return labels, confidence

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> None:
        """Write `config.json` and `model.safetensors` to `save_directory`."""
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            json.dump({"_class_name": type(self).__name__, **asdict(self.config)}, f, indent=2, sort_keys=True)
            f.write("\n")
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        save_file(state, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike]) -> "DigitsClassifier":
        """Load from a folder written by `save_pretrained`; returns the model in eval mode."""
        with open(os.path.join(directory, CONFIG_NAME)) as f:
            config = json.load(f)
        config.pop("_class_name", None)
        model = cls(DigitsClassifierConfig(**config))
        model.load_state_dict(load_file(os.path.join(directory, WEIGHTS_NAME)))
        return model.eval()


def augment(
    images: torch.Tensor, generator: torch.Generator, max_shift: int = 1, max_noise: float = 0.2
) -> torch.Tensor:
    """Light augmentation: random shifts of up to `max_shift` pixels (zero-padded with -1) and Gaussian
    noise with a per-image std in [0, max_noise], so the classifier also copes with imperfect samples."""
    n, _, h, w = images.shape
    padded = nn.functional.pad(images, (max_shift,) * 4, value=-1.0)
    shifts = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    shifted = torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(shifts.tolist())])
    std = torch.rand(n, 1, 1, 1, generator=generator) * max_noise
    noisy = shifted + std * torch.randn(shifted.shape, generator=generator)
    return noisy.clamp(-1.0, 1.0)
