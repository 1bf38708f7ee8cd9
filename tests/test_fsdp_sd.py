"""train_unlearn_sd.py under FSDP2 on two CPU processes (gloo): a full fine-tune of a tiny SD 1.x, SDXL, SD3 or Flux
pipeline saves the same whole denoiser as the DDP run, and LoRA is refused in one line."""

import json
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from test_fsdp import EXAMPLES, fsdp_environment, launch
from test_train_flow import args_for  # the quick arguments, with two forget images f0.png, f1.png
from tiny_models import save_tiny_flux_pipeline, save_tiny_sd3_pipeline, save_tiny_sd_pipeline, save_tiny_sdxl_pipeline

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))  # the scripts
VAE, CLIP, SECOND = "vae/diffusion_pytorch_model", "text_encoder/model", "text_encoder_2/model"
#: family: (saver, the denoiser's weights, the frozen components' weights, torchrun ports for the FSDP and DDP runs)
MODELS = {
    "sd": (save_tiny_sd_pipeline, "unet/diffusion_pytorch_model", (VAE, CLIP), (29541, 29542)),
    "sdxl": (save_tiny_sdxl_pipeline, "unet/diffusion_pytorch_model", (VAE, CLIP, SECOND), (29543, 29544)),
    "sd3": (partial(save_tiny_sd3_pipeline, with_t5=False), "transformer/diffusion_pytorch_model", (VAE, CLIP, SECOND), (29545, 29546)),
    "flux": (save_tiny_flux_pipeline, "transformer/diffusion_pytorch_model", (VAE, CLIP, SECOND), (29547, 29548)),
}


def fsdp_sd_environment() -> dict[str, str]:
    """examples/accelerate_fsdp.yaml as its comment says to use it for UNet2DConditionModel: without the DDPM
    block names, so accelerate wraps the model's own _no_split_modules."""
    environment = fsdp_environment(EXAMPLES / "accelerate_fsdp.yaml")
    del environment["FSDP_TRANSFORMER_CLS_TO_WRAP"]
    return environment


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_sd")
    for family, (save, *_) in MODELS.items():
        save(root / family)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")).save(root / f"f{i}.png")
    return root


@pytest.mark.parametrize("family", list(MODELS))
def test_full_fine_tune_under_fsdp_equals_ddp(workspace, tmp_path, family):
    """Two steps of SISS (fixed-norm combiner, AdamW) on two processes: the pipeline saved under FSDP2 holds whole
    denoiser weights equal to those the same run saves under DDP, and its checkpoint holds the same weights."""
    extra = ["--train_mode", "full", "--learning_rate", "1e-3", "--checkpointing_steps", "2"]
    _, denoiser, frozen, (fsdp_port, ddp_port) = MODELS[family]
    fsdp = launch(HERE / "fsdp_sd_script_launcher.py", args_for(workspace, family, tmp_path / "fsdp", *extra),
                  fsdp_port, **fsdp_sd_environment())
    ddp = launch(HERE.parent / "train_unlearn_sd.py", args_for(workspace, family, tmp_path / "ddp", *extra), ddp_port)

    assert "FSDP: no validation during training" in fsdp.stderr
    assert "FSDP" not in ddp.stderr
    report = json.loads((tmp_path / "fsdp" / "unlearning_report.json").read_text())
    assert report["num_processes"] == 2 and report["train_mode"] == "full" and report["model_family"] == family
    assert report["metrics"]["after"]["memorization_rate"] is not None  # evaluated after training, on the whole denoiser
    base, sharded, replicated = (load_file(str(folder / f"{denoiser}.safetensors"))
                                 for folder in (workspace / family, tmp_path / "fsdp", tmp_path / "ddp"))
    checkpoint = load_file(str(tmp_path / "fsdp" / "checkpoint-2" / "trainable_weights.safetensors"))
    assert sharded.keys() == base.keys() == replicated.keys()
    assert max(float((sharded[k] - base[k]).abs().max()) for k in base) > 1e-4  # trained
    for key in base:
        assert sharded[key].shape == base[key].shape, key  # whole, unsharded tensors
        torch.testing.assert_close(sharded[key], replicated[key], rtol=0, atol=1e-5)  # steps are ~1e-3
        if key in checkpoint:  # the trained parameters; not the buffers (SD3's positional embedding)
            torch.testing.assert_close(checkpoint[key], sharded[key], rtol=0, atol=0)
        else:
            torch.testing.assert_close(sharded[key], base[key], rtol=0, atol=0)
    assert checkpoint.keys() <= base.keys() and len(checkpoint) >= len(base) - 1
    # The rest of the pipeline is the base model's.
    for component in frozen:
        saved, original = (load_file(str(folder / f"{component}.safetensors")) for folder in (tmp_path / "fsdp", workspace / family))
        assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in original), component


def test_lora_under_fsdp_is_refused_in_one_line(workspace, tmp_path, monkeypatch, capsys):
    """The script's own check, right after the Accelerator is made (here a stand-in whose state says FSDP2)."""
    import train_unlearn_sd as script
    from accelerate.utils import DistributedType

    from diffusers_unlearn.errors import run_script

    fsdp2 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True)
    monkeypatch.setattr(script, "make_accelerator", lambda args: fsdp2)
    with pytest.raises(SystemExit) as exited:
        run_script(lambda: script.main(script.parse_args(args_for(workspace, "sd", tmp_path / "lora"))), "train_unlearn_sd.py")
    assert exited.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("train_unlearn_sd.py: error: FSDP is for --train_mode full")
    assert "examples/accelerate_ddp.yaml, or pass --train_mode full." in errors[0]


def test_gathered_model_keeps_the_base_buffers_and_refuses_missing_parameters():
    """SD3's transformer has a persistent buffer (its positional embedding) that no gathered state holds: the base
    copy's stays; a parameter that was not gathered is an error, never the base value silently."""
    from diffusers_unlearn.training import gathered_model

    class WithBuffer(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)
            torch.nn.init.constant_(self.linear.weight, value)
            self.register_buffer("table", torch.full((3,), value))

    trained = WithBuffer(1.0)
    main = SimpleNamespace(unwrap_model=lambda model: model, is_main_process=True, device=torch.device("cpu"))
    model = gathered_model(main, trained, lambda: WithBuffer(0.0))
    assert torch.equal(model.linear.weight, trained.linear.weight) and torch.equal(model.table, torch.zeros(3))
    assert gathered_model(SimpleNamespace(**{**vars(main), "is_main_process": False}), trained, lambda: WithBuffer(0.0)) is None
    trained.linear.bias.requires_grad_(False)  # not trained, so not gathered
    with pytest.raises(RuntimeError, match=r"parameters not gathered \['linear.bias'\]"):
        gathered_model(main, trained, lambda: WithBuffer(0.0))
