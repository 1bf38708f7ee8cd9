import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The models under test are tiny: one thread avoids oversubscription on small CI machines.
torch.set_num_threads(1)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state (mixed precision among it); tests that change it start and end
    with a fresh one."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def level_spy(monkeypatch):
    """The level losses every stopping-rule measurement was given (diffusers_unlearn.stopping.HeldoutLevelRule),
    the measurement itself unchanged."""
    from diffusers_unlearn.stopping import HeldoutLevelRule

    seen = []
    measure = HeldoutLevelRule.measure

    def spy(self, forget_losses, level_losses, heldout_losses=None):
        seen.append(level_losses.clone())
        return measure(self, forget_losses, level_losses, heldout_losses)

    monkeypatch.setattr(HeldoutLevelRule, "measure", spy)
    return seen
