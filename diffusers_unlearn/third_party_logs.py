"""Narrow filters for the known-harmless messages that third-party libraries print on every start.

Two libraries log a warning as a side effect of being imported, before any of our code can choose not to:

- transformers 5 warns, once per class, that `CLIPImageProcessor` (and `SiglipImageProcessor`) "requires
  torchvision (not installed); falling back to `...ImageProcessorPil`". diffusers' Stable Diffusion pipeline
  module and its IP-adapter loader import these classes unconditionally, so every program that imports
  `StableDiffusionPipeline` triggers it. The fallback is the PIL image processor transformers used before
  version 5; our code never uses an image processor (no safety checker, no feature extractor).
- bitsandbytes, when it is installed, is imported by diffusers itself (`diffusers.quantizers.bitsandbytes`), and on
  CPUs with AVX512-BF16 warns "Failed to load CPU gemm_4bit_forward from kernels-community ... `pip install
  kernels`". That kernel only speeds up 4-bit quantized layers, which we never create; 8-bit AdamW does not use it.

Each filter drops exactly one message, matched by logger name and message text, and lets every other record of
that logger through. Nothing else is silenced: warnings that matter still reach the user.

`install_filters()` runs when `diffusers_unlearn` is imported. The training scripts import the package before
diffusers or transformers, because the messages are printed while those libraries are being imported.
"""

from __future__ import annotations

import logging
import re

__all__ = ["KNOWN_HARMLESS_MESSAGES", "install_filters"]

# Logger name -> the one message on it that is dropped (a regular expression matched at the start).
KNOWN_HARMLESS_MESSAGES: dict[str, str] = {
    "transformers.utils.import_utils": (
        r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+ImageProcessorPil`"
    ),
    "bitsandbytes.backends.cpu.ops": r"Failed to load CPU gemm_4bit_forward from kernels-community",
}


class _DropOneMessage(logging.Filter):
    """A logger filter that rejects records whose message matches `pattern` and accepts all others."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


def install_filters() -> None:
    """Attach one filter per entry of `KNOWN_HARMLESS_MESSAGES` to its logger; calling it again adds nothing.

    The filter sits on the logger that emits the message (not on a handler or the root logger), so only records
    created there are checked. It can be installed before the library is imported: `logging.getLogger(name)`
    returns the same logger object the library will use.

    Example:
        >>> install_filters()
        >>> log = logging.getLogger("bitsandbytes.backends.cpu.ops")
        >>> log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: ...")  # dropped
        >>> log.warning("anything else")  # printed as before  # doctest: +SKIP
    """
    for logger_name, pattern in KNOWN_HARMLESS_MESSAGES.items():
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropOneMessage) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_DropOneMessage(pattern))
