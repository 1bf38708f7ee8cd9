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
