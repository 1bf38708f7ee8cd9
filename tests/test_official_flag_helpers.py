"""The argparse pieces for train_text_to_image_lora.py's flags (diffusers_unlearn.training): names, defaults,
parse-time checks, --scale_lr's formula and the checkpoint fingerprint entries."""

import argparse
import sys

import pytest

from diffusers_unlearn.training import (
    add_keep_dataset_arguments,
    add_noise_arguments,
    check_official_arguments,
    official_fingerprint_entries,
    scaled_learning_rate,
)


def parse(*argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--keep_data_dir", default=None)
    parser.add_argument("--keep_from_generations", type=int, default=None)
    parser.add_argument("--center_crop", action="store_true")
    parser.add_argument("--random_flip", action="store_true")
    add_keep_dataset_arguments(parser)
    add_noise_arguments(parser)
    args = parser.parse_args(list(argv))
    check_official_arguments(parser, args)
    return args


def test_defaults_are_the_official_scripts():
    args = parse()
    assert (args.noise_offset, args.snr_gamma, args.scale_lr) == (0, None, False)
    assert (args.image_column, args.caption_column, args.image_interpolation_mode) == ("image", "text", "lanczos")
    assert (args.dataset_name, args.dataset_config_name, args.train_data_dir, args.dataloader_num_workers) == (None, None, None, 0)
    assert official_fingerprint_entries(args) == {}


@pytest.mark.parametrize("argv, message", [
    (["--noise_offset", "-0.1"], "--noise_offset must be"),
    (["--snr_gamma", "0"], "--snr_gamma must be"),
    (["--dataloader_num_workers", "-1"], "--dataloader_num_workers must be >= 0"),
    (["--dataset_config_name", "x"], "--dataset_config_name needs --dataset_name"),
    (["--train_data_dir", "d", "--keep_data_dir", "k"], "Give one keep set: --train_data_dir or --keep_data_dir"),
    (["--dataset_name", "d", "--keep_from_generations", "4"], "Give one keep set: --dataset_name or --keep_from_generations"),
    (["--max_train_samples", "3"], "--max_train_samples applies to --dataset_name"),
    (["--image_interpolation_mode", "cubic"], "invalid choice"),
])
def test_bad_flags_are_one_clear_error_at_parse_time(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse(*argv)
    assert message in capsys.readouterr().err


def test_dataset_flags_without_datasets_name_the_pip_command(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    with pytest.raises(SystemExit):
        parse("--train_data_dir", "somewhere")
    assert "pip install datasets" in capsys.readouterr().err


def test_scale_lr_is_the_official_product():
    # train_text_to_image_lora.py: lr * gradient_accumulation_steps * train_batch_size * num_processes
    assert scaled_learning_rate(1e-4, 4, 8, 2) == pytest.approx(1e-4 * 4 * 8 * 2)


def test_fingerprint_entries_hold_only_flags_off_their_defaults():
    args = parse("--snr_gamma", "5", "--noise_offset", "0.05", "--random_flip", "--image_interpolation_mode", "bicubic")
    assert official_fingerprint_entries(args) == {
        "snr_gamma": 5.0, "noise_offset": 0.05, "random_flip": True, "image_interpolation_mode": "bicubic",
    }
