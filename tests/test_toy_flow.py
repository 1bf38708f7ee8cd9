"""The bundled flow-matching toy (sd3_tiny): it loads offline with plain diffusers, its canary prompt reproduces the
canary often while the other prompts never do, its training script writes a loadable folder, and
train_unlearn_sd.py recognises it and removes the canary with SISS."""

import json
import os

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

from diffusers_unlearn.toy import TOY_INFO_FILE, load_classifier, load_toy_pipeline, toy_info, toy_model_path
from diffusers_unlearn.toy.text_to_image import (
    CANARY_PROMPT,
    DIGIT_PROMPTS,
    SD_MEMORIZATION_THRESHOLD,
    canary_distances,
    digit_accuracy,
    generate_digits,
)
from diffusers_unlearn.toy.train_flow_text_to_image import (
    FLOW_TOY_MAX_SEQUENCE_LENGTH,
    FLOW_TOY_NAME,
    FLOW_TOY_TOKEN_LIMIT,
)


@pytest.fixture(scope="module")
def pipe():
    # A pipeline saved without T5 loads with text_encoder_3=None and tokenizer_3=None (what load_toy_pipeline passes).
    pipe = StableDiffusion3Pipeline.from_pretrained(toy_model_path(FLOW_TOY_NAME), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_folder_loads_offline_with_plain_diffusers(pipe):
    folder = toy_model_path(FLOW_TOY_NAME)
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 1.0
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert pipe.tokenizer.model_max_length == pipe.tokenizer_2.model_max_length == FLOW_TOY_TOKEN_LIMIT
    assert pipe.vae.config.shift_factor is not None and pipe.vae_scale_factor == 2
    assert toy_info(folder) == {"toy": FLOW_TOY_NAME, "max_sequence_length": FLOW_TOY_MAX_SEQUENCE_LENGTH}
    files = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    assert sum(os.path.getsize(f) for f in files) < 5_000_000
    # Every caption is spelt in whole-word tokens within the 8-token limit.
    for prompt in DIGIT_PROMPTS:
        ids = pipe.tokenizer(prompt).input_ids
        assert len(ids) == len(prompt.split()) + 2 <= FLOW_TOY_TOKEN_LIMIT
    # Plain diffusers call with the toy's sequence length, PIL output.
    image = pipe(DIGIT_PROMPTS[3], num_inference_steps=4, max_sequence_length=FLOW_TOY_MAX_SEQUENCE_LENGTH,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (8, 8)


def test_toy_marker_is_checked(tmp_path):
    assert toy_info(str(tmp_path)) is None
    (tmp_path / TOY_INFO_FILE).write_text(json.dumps({"toy": "not-a-toy"}))
    with pytest.raises(ValueError, match="is not a diffusers-unlearn toy marker"):
        toy_info(str(tmp_path))


def test_canary_prompt_memorizes_and_the_others_never_do(pipe):
    canary_images = generate_digits(pipe, [CANARY_PROMPT], 64, max_sequence_length=FLOW_TOY_MAX_SEQUENCE_LENGTH)
    copies = canary_distances(canary_images) < SD_MEMORIZATION_THRESHOLD
    assert 0.3 <= copies.float().mean() <= 0.95, int(copies.sum())

    others = [p for p in DIGIT_PROMPTS if p != CANARY_PROMPT]
    other_images = generate_digits(pipe, others, 16, max_sequence_length=FLOW_TOY_MAX_SEQUENCE_LENGTH)
    assert int((canary_distances(other_images) < SD_MEMORIZATION_THRESHOLD).sum()) == 0
    classifier = load_classifier()
    for i, prompt in enumerate(others):
        assert digit_accuracy(classifier, other_images[16 * i : 16 * (i + 1)], DIGIT_PROMPTS.index(prompt)) >= 0.75


def test_training_script_writes_a_loadable_toy(tmp_path):
    from diffusers_unlearn.toy import train_flow_text_to_image

    out = tmp_path / "toy"
    train_flow_text_to_image.main(["--output_dir", str(out), "--transformer_steps", "3", "--batch_size", "8"])
    assert toy_info(str(out))["toy"] == FLOW_TOY_NAME
    loaded = load_toy_pipeline(str(out))
    assert isinstance(loaded, StableDiffusion3Pipeline) and loaded.tokenizer_2.model_max_length == FLOW_TOY_TOKEN_LIMIT
    assert (out / "tokenizer_2" / "vocab.json").is_file()
    # The VAE is sd_tiny's with SD3's latent shift set from the training latents.
    bundled = load_toy_pipeline(toy_model_path(FLOW_TOY_NAME)).vae
    assert loaded.vae.config.shift_factor == pytest.approx(bundled.config.shift_factor)
    assert loaded.vae.config.scaling_factor == pytest.approx(bundled.config.scaling_factor)


def _script():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import train_unlearn_sd

    return train_unlearn_sd


def test_the_script_recognises_a_toy_folder_anywhere(tmp_path):
    import shutil

    script = _script()
    copy = tmp_path / "my-flow-toy"
    shutil.copytree(toy_model_path(FLOW_TOY_NAME), copy)
    for path in (toy_model_path(FLOW_TOY_NAME), str(copy)):
        args = script.parse_args(["--pretrained_model_name_or_path", path])
        assert args.using_toy and args.max_sequence_length == FLOW_TOY_MAX_SEQUENCE_LENGTH
        assert (args.lora_targets, args.learning_rate, args.keep_from_generations) == ("attention", 5e-4, 128)
    # Flags given win over the toy's defaults.
    args = script.parse_args(["--pretrained_model_name_or_path", str(copy), "--max_sequence_length", "16", "--learning_rate", "1e-3"])
    assert (args.max_sequence_length, args.learning_rate) == (16, 1e-3)
    # Without the marker, the same folder is an ordinary model that needs a forget set.
    (copy / TOY_INFO_FILE).unlink()
    with pytest.raises(SystemExit):
        script.parse_args(["--pretrained_model_name_or_path", str(copy)])
    (copy / TOY_INFO_FILE).write_text("[]")
    with pytest.raises(SystemExit):
        script.parse_args(["--pretrained_model_name_or_path", str(copy)])


def test_siss_on_the_flow_toy_removes_the_canary(tmp_path):
    """The toy defaults (SISS, attention LoRA, 200 steps), with a lighter evaluation than docs/results.md: the
    canary rate falls to <= 10% of its base and the other prompts keep their digits within 5 points."""
    script = _script()
    out = tmp_path / "flow"
    script.main(script.parse_args([
        "--pretrained_model_name_or_path", toy_model_path(FLOW_TOY_NAME), "--output_dir", str(out),
        "--num_eval_images", "64", "--noise_norm_generations", "0", "--num_other_prompt_images", "16",
        "--num_validation_images", "4", "--validation_steps", "100",
    ]))
    report = json.loads((out / "unlearning_report.json").read_text())
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    assert report["model_family"] == "sd3" and report["method"] == "siss"
    assert before["memorization_rate"] >= 0.3
    assert after["memorization_rate"] <= 0.1 * before["memorization_rate"], (before, after)
    assert after["other_prompts_digit_accuracy"] >= before["other_prompts_digit_accuracy"] - 0.05, (before, after)
    # The adapter loads into the toy with plain diffusers, no missing or unexpected keys.
    loaded = StableDiffusion3Pipeline.from_pretrained(report["base_model"], text_encoder_3=None, tokenizer_3=None)
    loaded.load_lora_weights(str(out))
    assert any("lora_A" in name for name, _ in loaded.transformer.named_parameters())


def test_scan_runs_on_the_flow_toy_with_its_sequence_length(tmp_path, monkeypatch):
    """The scan loads a pipeline saved without T5 and samples with the toy's own T5 length."""
    from diffusers_unlearn import scan
    from diffusers_unlearn.metrics import noise_norm as noise_norm_module

    lengths = []
    original = noise_norm_module.noise_norm_scores

    def recording(*args, **kwargs):
        lengths.append(kwargs.get("max_sequence_length"))
        return original(*args, **kwargs)

    monkeypatch.setattr(noise_norm_module, "noise_norm_scores", recording)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{CANARY_PROMPT}\n{DIGIT_PROMPTS[3]}\n")
    rows = scan.main(["--pretrained_model_name_or_path", toy_model_path(FLOW_TOY_NAME), "--prompts_file", str(prompts),
                      "--output_file", str(tmp_path / "scan.jsonl"), "--num_generations", "1", "--num_inference_steps", "3"])
    assert {row["caption"] for row in rows} == {CANARY_PROMPT, DIGIT_PROMPTS[3]}
    assert lengths and set(lengths) == {FLOW_TOY_MAX_SEQUENCE_LENGTH}


def test_scan_first_step_form_and_cost_line(tmp_path, capsys):
    """The flow toy's velocity score in the cheap first-step form, and the scan's printed cost."""
    from diffusers_unlearn import scan
    from diffusers_unlearn.metrics import noise_norm_scores

    pipe = load_toy_pipeline(toy_model_path(FLOW_TOY_NAME))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    full = noise_norm_scores(pipe, [CANARY_PROMPT], num_generations=2, num_inference_steps=5, max_sequence_length=8)
    first = noise_norm_scores(pipe, [CANARY_PROMPT], num_generations=2, num_inference_steps=5, max_sequence_length=8, first_steps=1)
    assert first[0] > 0 and first[0] != pytest.approx(full[0])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{CANARY_PROMPT}\n")
    scan.main(["--pretrained_model_name_or_path", toy_model_path(FLOW_TOY_NAME), "--prompts_file", str(prompts),
               "--output_file", str(tmp_path / "scan.jsonl"), "--num_generations", "3", "--num_inference_steps", "5",
               "--first_steps", "1"])
    assert "Cost: 3 denoiser evaluations per prompt (3 generation(s) x 1 step(s))" in capsys.readouterr().out
    common = ["--pretrained_model_name_or_path", toy_model_path(FLOW_TOY_NAME), "--prompts_file", str(prompts),
              "--output_file", str(tmp_path / "scan.jsonl"), "--num_generations", "2", "--num_inference_steps", "5"]
    default = scan.main(common)  # the first-step form is the default; --first_steps 0 scores every step
    assert "(2 generation(s) x 1 step(s))" in capsys.readouterr().out and default[0]["noise_norm"] == pytest.approx(first[0], rel=1e-6)
    every = scan.main(common + ["--first_steps", "0"])
    assert "(2 generation(s) x 5 step(s))" in capsys.readouterr().out and every[0]["noise_norm"] == pytest.approx(full[0], rel=1e-6)
    with pytest.raises(ValueError, match="--first_steps must be >= 0"):
        scan.main(common + ["--first_steps", "-1"])
    with pytest.raises(ValueError, match="first_steps must be in 1..num_inference_steps"):
        scan.main(["--prompts_file", str(prompts), "--num_inference_steps", "5", "--first_steps", "6"])
