import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The models under test are tiny: one thread avoids oversubscription on small CI machines.
torch.set_num_threads(1)
