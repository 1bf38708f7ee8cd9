"""train_unlearn_sd.py's --bnb_quantization_config_path: LoRA on a bitsandbytes-quantised denoiser (QLoRA).

bitsandbytes 0.50 runs NF4 (Linear4bit) and int8 (Linear8bitLt) layers forward and backward on the CPU, but
diffusers' bitsandbytes loader refuses to quantise without a GPU. The `cpu_quantization` fixture lifts exactly
that refusal (and the script's own GPU check, which mirrors it), so the tests below train on really quantised
tiny SD3 and Flux transformers and a tiny SD UNet. Without the fixture, the script refuses on this CPU in one line.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_unlearn_sd as script  # noqa: E402

from tiny_models import (  # noqa: E402
    check_script_adapter_in_plain_pipeline,
    quick_sd_script_args,
    save_tiny_flux_pipeline,
    save_tiny_sd3_pipeline,
    save_tiny_sd_pipeline,
)

PROMPTS = ["a digit seven", "a photo of a cat"]
NF4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    save_tiny_sd3_pipeline(root / "sd3", with_t5=False)
    save_tiny_flux_pipeline(root / "flux")
    save_tiny_sd_pipeline(root / "sd")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")).save(root / f"f{i}.png")
    for name, config in {"nf4": NF4, "int8": {"load_in_8bit": True}}.items():
        (root / f"{name}.json").write_text(json.dumps(config))
    return root


@pytest.fixture
def cpu_quantization(monkeypatch):
    """Let diffusers quantise on the CPU: its bitsandbytes quantizers refuse without a GPU (`validate_environment`)
    and place the model on the current CUDA device (`update_device_map`); both are replaced by CPU stand-ins, and
    the script's GPU check answers yes. Loading, quantising, LoRA, training and saving are the real code."""
    from diffusers.quantizers.bitsandbytes import bnb_quantizer

    from diffusers_unlearn import quantization

    monkeypatch.setattr(quantization, "bnb_device_available", lambda config: True)
    for quantizer in (bnb_quantizer.BnB4BitDiffusersQuantizer, bnb_quantizer.BnB8BitDiffusersQuantizer):
        monkeypatch.setattr(quantizer, "validate_environment", lambda self, *args, **kwargs: None)
        monkeypatch.setattr(quantizer, "update_device_map", lambda self, device_map: device_map or {"": "cpu"})


@pytest.fixture
def loaded(monkeypatch):
    """The components dicts `ModelFamily.load` returns during a test, in order (the script trains their denoiser in
    place, so after a run it holds the LoRA layers too)."""
    from diffusers_unlearn.families.base import ModelFamily

    seen, load = [], ModelFamily.load

    def spy(self, *args, **kwargs):
        seen.append(load(self, *args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(ModelFamily, "load", spy)
    return seen


def quantised_lora_layers(model, bits: int) -> int:
    """How many of `model`'s LoRA layers wrap a bitsandbytes layer of `bits` bits; fails if any plain
    `nn.Linear` but the adapters' own is left in the model (all the base's are quantised in these tiny models)."""
    import bitsandbytes as bnb
    from peft.tuners.lora import bnb as lora_bnb

    layer = {4: bnb.nn.Linear4bit, 8: bnb.nn.Linear8bitLt}[bits]
    wrapper = {4: lora_bnb.Linear4bit, 8: lora_bnb.Linear8bitLt}[bits]
    plain = [name for name, module in model.named_modules() if type(module) is torch.nn.Linear]
    assert not [name for name in plain if ".lora_A." not in name and ".lora_B." not in name]
    wrapped = [module for module in model.modules() if isinstance(module, wrapper)]
    assert all(isinstance(module.base_layer, layer) for module in wrapped)
    return len(wrapped)


def args_for(workspace, model, output_dir, *extra):
    forget = [workspace / "f0.png", workspace / "f1.png"]
    return quick_sd_script_args(workspace / model, output_dir, forget, PROMPTS, "--keep_from_generations", "2", "--resolution", "16", *extra)


def run(args):
    script.main(script.parse_args(args))


def script_error(args, capsys) -> str:
    """The message of the one error line the script prints for `args` (`<prog>: error: <message>`; it must exit
    with status 2 and print exactly one)."""
    with pytest.raises(SystemExit) as exited:
        script.run_script(lambda: script.main(script.parse_args(args)), "train_unlearn_sd.py")
    assert exited.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    return errors[0].split("error: ", 1)[1]


def plain_pipeline(workspace, model):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

    if model == "flux":
        return FluxPipeline.from_pretrained(str(workspace / model))
    if model == "sd":
        return StableDiffusionPipeline.from_pretrained(str(workspace / model), safety_checker=None)
    return StableDiffusion3Pipeline.from_pretrained(str(workspace / model), text_encoder_3=None, tokenizer_3=None)


def nf4_run_checks(out, saved, compute_dtype):
    """What every NF4 run must show: the report records the quantisation, the adapter holds only float32 LoRA
    tensors (no quantisation state, no base weights) and the adapter trained."""
    report = json.loads((out / "unlearning_report.json").read_text())
    assert report["bnb_quantization"]["load_in_4bit"] is True
    assert report["bnb_quantization"]["bnb_4bit_quant_type"] == "nf4"
    assert report["bnb_quantization"]["bnb_4bit_compute_dtype"] == compute_dtype
    assert "Trained on a 4-bit NF4 bitsandbytes-quantised base" in (out / "README.md").read_text()
    assert all(np.isfinite(report["metrics"][side][key]) for side in ("before", "after") for key in ("forget_loss", "keep_loss"))
    assert all(".lora_A." in key or ".lora_B." in key for key in saved)
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}
    assert any(t.abs().sum() > 0 for k, t in saved.items() if k.startswith("transformer.") and "lora_B" in k)


@pytest.mark.parametrize("model,precision", [("flux", "bf16"), ("sd3", "no")])
def test_nf4_base_adapter_loads_into_the_plain_pipeline(workspace, tmp_path, model, precision, cpu_quantization, loaded, fresh_accelerate_state):
    out = tmp_path / "nf4"
    run(args_for(workspace, model, out, "--bnb_quantization_config_path", str(workspace / "nf4.json"), "--mixed_precision", precision, "--train_text_encoder", "--gradient_checkpointing"))
    (components,) = loaded
    assert quantised_lora_layers(components["transformer"], bits=4) > 0
    assert components["text_encoder"].dtype == {"bf16": torch.bfloat16, "no": torch.float32}[precision]  # not quantised
    saved = load_file(str(out / "pytorch_lora_weights.safetensors"))
    nf4_run_checks(out, saved, "bfloat16")
    prefixes = {"transformer", "text_encoder"} | ({"text_encoder_2"} if model == "sd3" else set())
    assert {key.split(".")[0] for key in saved} == prefixes
    # The plain, unquantised pipeline takes the adapter with no missing or unexpected key.
    check_script_adapter_in_plain_pipeline(plain_pipeline(workspace, model), out, saved, prefixes, height=16, width=16)


def test_int8_base_on_an_sd_unet(workspace, tmp_path, cpu_quantization, loaded, fresh_accelerate_state):
    out = tmp_path / "int8"
    run(args_for(workspace, "sd", out, "--bnb_quantization_config_path", str(workspace / "int8.json"), "--train_text_encoder"))
    assert quantised_lora_layers(loaded[0]["unet"], bits=8) > 0
    saved = load_file(str(out / "pytorch_lora_weights.safetensors"))
    report = json.loads((out / "unlearning_report.json").read_text())
    assert report["bnb_quantization"]["load_in_8bit"] is True and report["bnb_quantization"]["load_in_4bit"] is False
    assert "Trained on an 8-bit bitsandbytes-quantised base" in (out / "README.md").read_text()
    assert any(t.abs().sum() > 0 for k, t in saved.items() if k.startswith("unet.") and "lora_B" in k)
    check_script_adapter_in_plain_pipeline(plain_pipeline(workspace, "sd"), out, saved, {"unet", "text_encoder"})


def test_resume_on_an_nf4_base_matches_an_uninterrupted_run(workspace, tmp_path, cpu_quantization, fresh_accelerate_state):
    nf4 = ["--bnb_quantization_config_path", str(workspace / "nf4.json"), "--mixed_precision", "bf16"]
    common = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--num_eval_images", "1", *nf4]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(args_for(workspace, "flux", straight, *common))
    run(args_for(workspace, "flux", resumed, *common[2:], "--max_train_steps", "2"))
    # Checkpoints hold the trainable (LoRA) state only: no quantised base weight is saved.
    checkpoint = load_file(str(resumed / "checkpoint-2" / "trainable_weights.safetensors"))
    assert checkpoint and all("lora_" in key for key in checkpoint)
    run(args_for(workspace, "flux", resumed, *common, "--resume_from_checkpoint", "latest"))
    a = load_file(str(straight / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A resume onto a differently quantised (or unquantised) base is refused, naming the difference.
    for other in (["--bnb_quantization_config_path", str(workspace / "int8.json"), "--mixed_precision", "bf16"], ["--mixed_precision", "bf16"]):
        with pytest.raises(Exception, match="bnb_quantization"):
            run(args_for(workspace, "flux", resumed, "--max_train_steps", "6", "--checkpointing_steps", "2", "--num_eval_images", "1", *other, "--resume_from_checkpoint", "latest"))


def test_lora_wraps_the_quantised_layers_and_only_the_adapter_learns(workspace, cpu_quantization):
    """The family's quantised load, peft's LoRA on bitsandbytes layers, one backward pass and one AdamW step:
    gradients reach every adapter weight and no base weight, and the 4-bit base stays bit-identical."""
    import bitsandbytes as bnb
    from diffusers.training_utils import cast_training_params
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from diffusers_unlearn.families import get_family
    from diffusers_unlearn.lora import add_lora, trainable_parameters
    from diffusers_unlearn.quantization import read_bnb_quantization_config

    family = get_family("sd3")
    config = read_bnb_quantization_config(workspace / "nf4.json")
    components = family.load(workspace / "sd3", torch.float32, quantization_config=config)
    transformer = components["transformer"]
    quantised = {name for name, module in transformer.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    assert quantised and not any(type(module) is torch.nn.Linear for module in transformer.modules())
    assert components["text_encoder"].dtype == torch.float32  # only the denoiser is quantised
    transformer = add_lora(transformer, rank=4, targets="attention", presets=family.lora_target_presets)
    wrapped = [module for module in transformer.modules() if isinstance(module, LoraLinear4bit)]
    assert wrapped and all(isinstance(module.base_layer, bnb.nn.Linear4bit) for module in wrapped)
    cast_training_params(transformer, dtype=torch.float32)  # as the script: the adapter trains in float32
    params = trainable_parameters(transformer)
    assert params and all(p.dtype == torch.float32 for p in params)
    # lora_B starts at zero, so a first step gives lora_A no gradient: start it away from zero.
    with torch.no_grad():
        for module in wrapped:
            module.lora_B["default"].weight.normal_(std=0.1)

    transformer.train()
    cond = family.encode_prompts(components, PROMPTS)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    output = family.call(transformer, latents, torch.tensor([500.0, 250.0]), cond)
    output.square().mean().backward()
    assert all(p.grad is not None for p in params)
    # Every adapter gets a gradient except the last block's context queries: that block is context_pre_only
    # (its context output is dropped), so they reach nothing.
    still = {name for name, p in transformer.named_parameters() if p.requires_grad and not p.grad.abs().sum() > 0}
    assert still == {f"transformer_blocks.1.attn.add_q_proj.lora_{ab}.default.weight" for ab in "AB"}
    assert all(param.grad is None for param in transformer.parameters() if not param.requires_grad)
    # After the first forward pass: bitsandbytes' Linear4bit casts its bias to the compute dtype in place there.
    base = {name: param.detach().clone() for name, param in transformer.named_parameters() if not param.requires_grad}
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    optimizer.step()
    after = dict(transformer.named_parameters())
    assert all(torch.equal(after[name].detach(), value) for name, value in base.items())


# -- refusals, before any model loads --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content,expected",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"load_in_4bit": true, "bnb_4bit_quant_tpye": "nf4"}', "unknown BitsAndBytesConfig argument(s) bnb_4bit_quant_tpye"),
        ('{"bnb_4bit_quant_type": "nf4"}', "quantises in neither 4 and 8 bit"),
        ('{"load_in_4bit": true, "load_in_8bit": true}', "quantises in both 4 and 8 bit"),
        ('{"load_in_4bit": "yes"}', "quantises in neither 4 and 8 bit"),
        ('{"load_in_4bit": true, "bnb_4bit_quant_type": "int4"}', "bnb_4bit_quant_type 'int4' is not one of nf4, fp4"),
        ('{"load_in_4bit": true, "bnb_4bit_compute_dtype": 3}', "bnb_4bit_compute_dtype must be a string or a torch.dtype"),
    ],
)
def test_a_bad_config_file_is_refused_in_one_line(workspace, tmp_path, content, expected, cpu_quantization, capsys):
    path = tmp_path / "bnb.json"
    path.write_text(content)
    error = script_error(args_for(workspace, "flux", tmp_path / "out", "--bnb_quantization_config_path", str(path)), capsys)
    assert error.startswith(f"--bnb_quantization_config_path {path}")
    assert expected in error


def test_other_refusals_name_the_fix(workspace, tmp_path, monkeypatch, capsys):
    nf4 = ["--bnb_quantization_config_path", str(workspace / "nf4.json")]
    missing = tmp_path / "missing.json"
    error = script_error(args_for(workspace, "flux", tmp_path / "a", "--bnb_quantization_config_path", str(missing)), capsys)
    assert f"{missing}: cannot read it" in error and "examples/nf4_config.json" in error
    error = script_error(args_for(workspace, "flux", tmp_path / "b", *nf4, "--train_mode", "full"), capsys)
    assert "use --train_mode lora, or leave the flag out for full fine-tuning" in error
    if not torch.cuda.is_available():  # this machine: diffusers' loader would refuse after loading the encoders
        error = script_error(args_for(workspace, "flux", tmp_path / "c", *nf4), capsys)
        assert error == "--bnb_quantization_config_path (4-bit) needs a CUDA GPU: diffusers' bitsandbytes loader refuses to quantise without one. Leave the flag out on this machine."

    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "bitsandbytes" else find_spec(name, *rest))
    error = script_error(args_for(workspace, "flux", tmp_path / "d", *nf4), capsys)
    assert 'needs bitsandbytes: pip install "bitsandbytes>=0.50"' in error


def test_fsdp_is_refused_before_any_model_loads(workspace, tmp_path, monkeypatch, cpu_quantization, capsys):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from diffusers_unlearn.families.base import ModelFamily

    fsdp2 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True)
    monkeypatch.setattr(script, "make_accelerator", lambda args: fsdp2)
    monkeypatch.setattr(ModelFamily, "load", lambda *args, **kwargs: pytest.fail("a model was loaded"))
    error = script_error(args_for(workspace, "flux", tmp_path / "out", "--bnb_quantization_config_path", str(workspace / "nf4.json")), capsys)
    assert error.startswith("--bnb_quantization_config_path does not work under FSDP")
    assert "examples/accelerate_ddp.yaml" in error


def test_compute_dtype_defaults_to_the_mixed_precision_and_the_example_file_is_nf4(workspace, tmp_path, cpu_quantization):
    bare = tmp_path / "bare.json"
    bare.write_text('{"load_in_4bit": true, "bnb_4bit_quant_type": "nf4"}')
    for precision, dtype in (("no", torch.float32), ("bf16", torch.bfloat16)):
        args = script.parse_args(args_for(workspace, "flux", tmp_path / "out", "--bnb_quantization_config_path", str(bare), "--mixed_precision", precision))
        assert args.bnb_quantization_config.bnb_4bit_compute_dtype == dtype
    args = script.parse_args(args_for(workspace, "flux", tmp_path / "out", "--bnb_quantization_config_path", str(ROOT / "examples" / "nf4_config.json")))
    config = args.bnb_quantization_config
    assert (config.load_in_4bit, config.bnb_4bit_quant_type, config.bnb_4bit_compute_dtype) == (True, "nf4", torch.bfloat16)
    assert script.parse_args(args_for(workspace, "flux", tmp_path / "out")).bnb_quantization_config is None
