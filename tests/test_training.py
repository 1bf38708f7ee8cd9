"""diffusers_unlearn.training: the pieces both scripts share, and the in-process train_adapter."""

import pytest
import torch

from diffusers_unlearn.training import list_checkpoints, train_adapter
from diffusers_unlearn.unlearner import BatchPool

from tiny_models import schedule, tiny_unet


def test_train_adapter_trains_only_a_named_adapter():
    unet = tiny_unet(seed=0)
    base = {name: p.detach().clone() for name, p in unet.named_parameters()}
    g = torch.Generator().manual_seed(0)
    forget = BatchPool(torch.rand(2, 1, 8, 8, generator=g) * 2 - 1)
    keep = BatchPool(torch.rand(8, 1, 8, 8, generator=g) * 2 - 1)
    unet, unlearner = train_adapter(
        unet, schedule(), forget, keep, method="siss", hyperparameters={"scaling_norm": 0.5},
        max_train_steps=3, train_batch_size=4, learning_rate=1e-2, adapter_name="forget-canary",
    )
    assert unlearner.optimizer_steps == 3
    assert list(unet.peft_config) == ["forget-canary"]
    assert not any(p.requires_grad for p in unet.parameters())
    lora_b = [p for name, p in unet.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
    for name, p in unet.named_parameters():  # base weights are untouched (their names gain "base_layer")
        plain = name.replace(".base_layer", "")
        if "lora_" not in name and plain in base:
            assert torch.equal(p, base[plain]), name


def test_train_adapter_checks_its_inputs():
    pool = BatchPool(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="needs a keep set"):
        train_adapter(tiny_unet(), schedule(), pool, None, method="siss", max_train_steps=1)
    with pytest.raises(ValueError, match="Unknown unlearning method"):
        train_adapter(tiny_unet(), schedule(), pool, pool, method="retrain", max_train_steps=1)
    with pytest.raises(ValueError, match=">= 1"):
        train_adapter(tiny_unet(), schedule(), pool, pool, max_train_steps=0)


def test_batch_pool_encodes_token_ids_each_draw():
    calls = []

    def encode(ids):
        calls.append(ids.clone())
        return ids.float().unsqueeze(-1).repeat(1, 1, 3)

    pool = BatchPool(torch.zeros(4, 1, 2, 2), input_ids=torch.arange(8).view(4, 2), encode=encode)
    batch = pool.sample(3, torch.Generator().manual_seed(0))
    assert batch.encoder_hidden_states.shape == (3, 2, 3) and len(calls) == 1
    assert torch.equal(batch.encoder_hidden_states[..., 0].long(), calls[0])
    with pytest.raises(ValueError, match="together"):
        BatchPool(torch.zeros(1, 1, 2, 2), input_ids=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="not both"):
        BatchPool(torch.zeros(1, 1, 2, 2), encoder_hidden_states=torch.zeros(1, 2, 3), input_ids=torch.zeros(1, 2), encode=encode)


def test_list_checkpoints_orders_by_step_and_skips_temporary(tmp_path):
    for name in ("checkpoint-10", "checkpoint-9", "checkpoint-11.tmp", "checkpoint-x", "other"):
        (tmp_path / name).mkdir()
    assert list_checkpoints(str(tmp_path)) == ["checkpoint-9", "checkpoint-10"]
    assert list_checkpoints(str(tmp_path / "missing")) == []
