"""The text-to-image toy whose canary has a caption of its own (sd_tiny_captioned), and the scan that finds it."""

import json
import os

import pytest
import torch

from diffusers_unlearn import scan
from diffusers_unlearn.errors import UserInputError
from diffusers_unlearn.metrics.noise_norm import detection_auc
from diffusers_unlearn.toy import (
    CANARY_CAPTION,
    SD_CAPTIONED_NAME,
    TOY_INFO_FILE,
    TOY_MODELS,
    TRAINING_COMMANDS,
    load_toy_pipeline,
    toy_info,
    toy_model_path,
    toy_prompts,
)
from diffusers_unlearn.toy.text_to_image import (
    CANARY_PROMPT,
    DEFAULT_GUIDANCE_SCALE,
    DIGIT_PROMPTS,
    NUM_SD_CANARY_COPIES,
    SD_MEMORIZATION_THRESHOLD,
    SD_RESOLUTION,
    build_tokenizer,
    canary_distances,
    canary_forget_set,
    generate_digits,
    training_set,
)


@pytest.fixture(scope="module")
def pipe():
    return load_toy_pipeline(toy_model_path(SD_CAPTIONED_NAME))


def _script():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "train_unlearn_sd.py")
    spec = importlib.util.spec_from_file_location("train_unlearn_sd_captioned", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_marker_registration_and_folder():
    folder = toy_model_path(SD_CAPTIONED_NAME)
    assert SD_CAPTIONED_NAME in TOY_MODELS and "--canary_caption" in TRAINING_COMMANDS[SD_CAPTIONED_NAME]
    info = toy_info(folder)
    assert info == {"toy": SD_CAPTIONED_NAME, "forget_prompt": CANARY_CAPTION, "keep_prompts": list(DIGIT_PROMPTS)}
    assert toy_prompts(info) == (CANARY_CAPTION, list(DIGIT_PROMPTS))
    # The other toys keep their shared-caption canary: the seven prompt, and the nine other digits.
    assert toy_prompts(toy_info(toy_model_path("sd_tiny"))) == (CANARY_PROMPT, [p for p in DIGIT_PROMPTS if p != CANARY_PROMPT])
    files = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]
    assert not any(name.endswith((".bin", ".pt", ".ckpt")) for name in files)
    assert sum(os.path.getsize(name) for name in files) < 5 * 2**20


def test_tokenizer_spells_the_caption_and_sd_tiny_vocabulary_is_unchanged(pipe, tmp_path):
    ids = pipe.tokenizer(CANARY_CAPTION).input_ids
    assert pipe.tokenizer.unk_token_id not in ids[1:-1] and len(ids) == len(CANARY_CAPTION.split()) + 2
    # Without extra captions the vocabulary is sd_tiny's own, so sd_tiny's recipe is untouched.
    plain = build_tokenizer(str(tmp_path / "plain"))
    bundled = load_toy_pipeline(toy_model_path("sd_tiny")).tokenizer
    assert plain.get_vocab() == bundled.get_vocab()
    assert len(build_tokenizer(str(tmp_path / "extra"), extra_captions=[CANARY_CAPTION])) > len(plain)


def test_training_set_and_forget_set_carry_the_caption():
    images, captions = training_set(canary_caption=CANARY_CAPTION)
    shared_images, shared = training_set()
    assert torch.equal(images, shared_images)  # the same images: sd_tiny's VAE fits them
    assert captions[-NUM_SD_CANARY_COPIES:] == [CANARY_CAPTION] * NUM_SD_CANARY_COPIES
    assert captions[:-NUM_SD_CANARY_COPIES] == shared[:-NUM_SD_CANARY_COPIES]
    assert canary_forget_set(prompt=CANARY_CAPTION).texts == [CANARY_CAPTION]


def test_training_script_refuses_contradictory_flags():
    from diffusers_unlearn.toy import train_text_to_image

    for argv in (["--canary_caption", "x", "--without_canary"], ["--canary_caption", CANARY_PROMPT], ["--vae_from", "/nonexistent"]):
        with pytest.raises(SystemExit):
            train_text_to_image.parse_args(argv)
    args = train_text_to_image.parse_args(["--canary_caption", CANARY_CAPTION, "--vae_from", "sd_tiny"])
    assert args.output_dir.endswith(SD_CAPTIONED_NAME) and train_text_to_image.toy_name(args) == SD_CAPTIONED_NAME


def test_the_caption_draws_the_canary_and_no_digit_prompt_does(pipe):
    caption = canary_distances(generate_digits(pipe, [CANARY_CAPTION], num_per_prompt=16))
    assert (caption < SD_MEMORIZATION_THRESHOLD).float().mean() >= 0.9, caption
    digits = canary_distances(generate_digits(pipe, DIGIT_PROMPTS, num_per_prompt=16))
    assert (digits < SD_MEMORIZATION_THRESHOLD).sum() == 0, digits.min()


def test_scan_ranks_the_caption_first(tmp_path, capsys):
    """No --prompts_file: the toy's eleven prompts, its forget prompt the known memorized one. The scan's default,
    the first-step form, ranks the caption first (docs/results.md: the full-trajectory mean does not)."""
    out = tmp_path / "scan.jsonl"
    rows = scan.main(["--pretrained_model_name_or_path", toy_model_path(SD_CAPTIONED_NAME), "--output_file", str(out),
                      "--num_generations", "4"])
    assert len(rows) == 11 and rows[0]["caption"] == CANARY_CAPTION
    assert [row["known_memorized"] for row in rows] == [True] + [False] * 10
    assert "Detection AUC: 1.000 (1 known memorized prompt(s), at rank(s) [1], vs 10 other(s))." in capsys.readouterr().out
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows


def test_scan_loads_an_adapter(tmp_path):
    """--adapter: the scores are those of the model with the LoRA weights in (here a random adapter)."""
    from diffusers_unlearn.lora import add_lora, save_lora_weights

    unet = load_toy_pipeline(toy_model_path(SD_CAPTIONED_NAME)).unet
    add_lora(unet, rank=4, targets="conv", init_lora_weights="gaussian")
    with torch.no_grad():  # a visible change: peft's gaussian init leaves lora_B at zero
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    save_lora_weights(unet, tmp_path / "adapter")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{CANARY_CAPTION}\n{DIGIT_PROMPTS[3]}\n")
    common = ["--pretrained_model_name_or_path", toy_model_path(SD_CAPTIONED_NAME), "--prompts_file", str(prompts),
              "--num_generations", "2", "--first_steps", "1", "--output_file", str(tmp_path / "scan.jsonl")]
    plain = {row["caption"]: row["noise_norm"] for row in scan.main(common)}
    for adapter in (tmp_path / "adapter", tmp_path / "adapter" / "pytorch_lora_weights.safetensors"):
        adapted = {row["caption"]: row["noise_norm"] for row in scan.main(common + ["--adapter", str(adapter)])}
        assert adapted.keys() == plain.keys() and adapted[CANARY_CAPTION] != pytest.approx(plain[CANARY_CAPTION], rel=1e-4)


def test_scan_input_errors_come_before_the_model_loads(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    elsewhere = ["--pretrained_model_name_or_path", str(tmp_path / "not-a-model"), "--output_file", str(tmp_path / "o.jsonl")]
    with pytest.raises(UserInputError, match="--prompts_file is needed"):
        scan.main(elsewhere)
    (tmp_path / "known.txt").write_text("a horse\n")
    with pytest.raises(UserInputError, match="not among the scanned prompts"):
        scan.main(elsewhere + ["--prompts_file", str(prompts), "--known_memorized_file", str(tmp_path / "known.txt")])
    (tmp_path / "known.txt").write_text("a cat\na dog\n")
    with pytest.raises(UserInputError, match="needs other prompts"):
        scan.main(elsewhere + ["--prompts_file", str(prompts), "--known_memorized_file", str(tmp_path / "known.txt")])
    with pytest.raises(UserInputError, match="--adapter"):
        scan.main(elsewhere + ["--prompts_file", str(prompts), "--adapter", str(tmp_path / "missing")])
    assert not (tmp_path / "o.jsonl").exists()


def test_detection_auc():
    assert detection_auc([0.9, 0.3, 0.5], [True, False, False]) == 1.0
    assert detection_auc([0.1, 0.3, 0.5], [True, False, False]) == 0.0
    # One memorized prompt at rank r of N: (N - r) / (N - 1).
    assert detection_auc([0.4, 0.3, 0.5, 0.2, 0.1], [True, False, False, False, False]) == pytest.approx(3 / 4)
    assert detection_auc([0.5, 0.5, 0.1], [True, False, False]) == pytest.approx(0.75)  # a tie counts one half
    assert detection_auc([0.9, 0.2, 0.5, 0.6], [True, False, True, False]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="at least one memorized and one other"):
        detection_auc([0.1, 0.2], [False, False])
    with pytest.raises(ValueError, match="2 scores and 1"):
        detection_auc([0.1, 0.2], [True])


def test_train_unlearn_sd_takes_the_captioned_toy(tmp_path):
    """The marker gives the forget prompt (the caption) and the keep prompts (the digits); sd_tiny is unchanged."""
    script = _script()
    args = script.parse_args(["--pretrained_model_name_or_path", toy_model_path(SD_CAPTIONED_NAME)])
    assert args.using_toy and args.toy_forget_prompt == CANARY_CAPTION and args.toy_keep_prompts == list(DIGIT_PROMPTS)
    assert (args.lora_targets, args.learning_rate, args.keep_from_generations) == ("conv", 2e-3, 32)
    assert (args.anchor_prompt, args.num_anchor_generations) == ("", 32)  # the unconditional model's generations
    plain = script.parse_args([])
    assert plain.toy_forget_prompt is None and plain.toy_keep_prompts is None and plain.keep_from_generations == 64
    assert plain.anchor_prompt is None
    given = script.parse_args(["--pretrained_model_name_or_path", toy_model_path(SD_CAPTIONED_NAME), "--anchor_prompt", "a handwritten digit zero"])
    assert given.anchor_prompt == "a handwritten digit zero"
    # A copy of the folder elsewhere is the same toy (the marker travels with it).
    import shutil

    copy = tmp_path / "captioned"
    shutil.copytree(toy_model_path(SD_CAPTIONED_NAME), copy)
    assert json.loads((copy / TOY_INFO_FILE).read_text())["forget_prompt"] == CANARY_CAPTION
    assert script.parse_args(["--pretrained_model_name_or_path", str(copy)]).toy_forget_prompt == CANARY_CAPTION


def test_anchor_generations_join_the_keep_set_under_the_caption(pipe):
    """--anchor_prompt "": the unconditional model's generations that are no canary copy, added to the keep set
    under the caption; generations of the digit prompts keep their own prompts."""
    from accelerate import PartialState

    PartialState()  # the script logs through accelerate, as under main
    script = _script()
    args = script.parse_args(["--pretrained_model_name_or_path", toy_model_path(SD_CAPTIONED_NAME),
                              "--keep_from_generations", "2", "--num_anchor_generations", "24", "--num_inference_steps", "10"])
    args.sampling_max_sequence_length, args.guidance_scale = None, DEFAULT_GUIDANCE_SCALE  # as main sets them
    forget, keep, _ = script.load_forget_and_keep(args, pipe, SD_RESOLUTION, SD_MEMORIZATION_THRESHOLD)
    under_caption = [i for i, text in enumerate(keep.texts) if text == CANARY_CAPTION]
    assert forget.texts == [CANARY_CAPTION] and 0 < len(under_caption) <= 24
    assert sorted(set(keep.texts) - {CANARY_CAPTION}) == sorted(DIGIT_PROMPTS)
    assert all(name.startswith("anchor/") for name in (keep.names[i] for i in under_caption))
    assert (canary_distances(keep.images[under_caption]) >= SD_MEMORIZATION_THRESHOLD).all()
    args.num_anchor_generations = 0
    assert CANARY_CAPTION not in script.load_forget_and_keep(args, pipe, SD_RESOLUTION, SD_MEMORIZATION_THRESHOLD)[1].texts


def test_anchor_flag_errors():
    script = _script()
    with pytest.raises(SystemExit):
        script.parse_args(["--pretrained_model_name_or_path", toy_model_path(SD_CAPTIONED_NAME), "--num_anchor_generations", "-1"])


def test_toy_defaults_remove_the_captioned_canary(tmp_path):
    """The toy's defaults (SISS, conv LoRA, 200 steps, the unconditional anchor) remove every copy the caption
    drew, and the digit prompts keep their accuracy (docs/results.md: without the anchor every copy stays)."""
    script = _script()
    out = tmp_path / "captioned"
    script.main(script.parse_args(["--pretrained_model_name_or_path", toy_model_path(SD_CAPTIONED_NAME), "--output_dir", str(out),
                                   "--num_eval_images", "32", "--noise_norm_generations", "0", "--num_other_prompt_images", "8",
                                   "--num_validation_images", "4", "--validation_steps", "200"]))
    report = json.loads((out / "unlearning_report.json").read_text())
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    assert before["memorization_rate"] >= 0.9 and after["memorization_rate"] == 0.0, (before, after)
    assert after["other_prompts_digit_accuracy"] >= before["other_prompts_digit_accuracy"] - 0.05
    assert {claim["claim"]: claim["result"] for claim in report["verdict"]["claims"]}["copies_gone"] == "pass"
