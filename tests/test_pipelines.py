import json

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline

from diffusers_unlearn.lora import add_lora, save_lora_weights
from diffusers_unlearn.pipelines import UnlearnDDPMPipeline

from tiny_models import tiny_unet


@pytest.fixture
def adapter_dir(tmp_path):
    unet = add_lora(tiny_unet(), rank=2, lora_alpha=4)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    save_lora_weights(unet, tmp_path / "adapter", metadata={"method": "siss"})
    return tmp_path / "adapter"


def unet_output(pipe):
    x, t = torch.linspace(-1, 1, 64).view(1, 1, 8, 8), torch.tensor([100])
    with torch.no_grad():
        return pipe.unet(x, t).sample


def test_load_adapter_and_strength(adapter_dir):
    pipe = UnlearnDDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler())
    base = unet_output(pipe)
    name = pipe.load_unlearning_adapter(str(adapter_dir))
    assert name == "siss" and pipe.unlearning_adapters == ["siss"]
    full = unet_output(pipe)
    assert not torch.allclose(full, base)
    pipe.set_unlearning_strength(0.0)
    torch.testing.assert_close(unet_output(pipe), base)
    pipe.set_unlearning_strength(1.0)
    torch.testing.assert_close(unet_output(pipe), full)
    with pytest.raises(ValueError, match="already has an adapter"):
        pipe.load_unlearning_adapter(str(adapter_dir))
    with pytest.raises(ValueError, match="fuse_lora"):
        pipe.save_pretrained(adapter_dir.parent / "refused")


def test_saved_pipeline_loads_with_plain_diffusers(adapter_dir, tmp_path):
    pipe = UnlearnDDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler())
    pipe.load_unlearning_adapter(str(adapter_dir))
    merged = unet_output(pipe)
    pipe.unet.fuse_lora()
    pipe.unet.unload_lora()
    pipe.save_pretrained(tmp_path / "merged")
    index = json.loads((tmp_path / "merged" / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    for cls in (DDPMPipeline, DiffusionPipeline):
        plain = cls.from_pretrained(tmp_path / "merged")
        assert type(plain).__name__ == "DDPMPipeline"
        torch.testing.assert_close(unet_output(plain), merged, rtol=1e-5, atol=1e-6)
