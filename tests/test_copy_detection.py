"""Copy detection (`diffusers_unlearn.metrics.copy_detection`): the pixel detector keeps today's numbers, a tiny
random DINOv2 checks the feature plumbing, the toy classifier's features check the behaviour, and every consumer
(memorization rate, keep filter, cluster check, scan, pipelines, the DDPM script) uses the detector it is given."""

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_unlearn import data
from diffusers_unlearn.errors import UserInputError
from diffusers_unlearn.metrics import evaluate_ddpm, memorization_rate, nearest_distances
from diffusers_unlearn.metrics.copy_detection import (
    FeatureCopyDetector,
    PixelCopyDetector,
    check_copy_detector,
    cluster_fraction,
    detector_fingerprint,
    load_copy_detector,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def save_tiny_dinov2(folder: Path, safetensors: bool = True) -> Path:
    """A random DINOv2 (hidden 32, 2 layers, patch 4, 16 px) and a BitImageProcessor resizing to 16x16."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=4, image_size=16)
    torch.manual_seed(0)
    model = Dinov2Model(config)
    folder.mkdir(parents=True, exist_ok=True)
    if safetensors:
        model.save_pretrained(folder)
    else:  # a pickle-only folder, as old checkpoints ship
        config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    BitImageProcessor(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    return save_tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "model")


def random_images(count, seed=0, channels=1, size=8):
    return torch.rand(count, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class CountingDetector(FeatureCopyDetector):
    """Cosine similarity of flattened pixels, counting how often it embeds images."""

    def __init__(self, threshold=0.99):
        super().__init__(lambda x: x.flatten(1), None, threshold=threshold, name="counting")
        self.calls = 0

    def embed(self, images):
        self.calls += 1
        return super().embed(images)


# ---------------------------------------------------------------------------------------------------------------
# The pixel detector: the numbers of before
# ---------------------------------------------------------------------------------------------------------------


def test_pixel_detector_gives_the_pixel_numbers():
    forget = random_images(2, seed=1)
    samples = torch.cat([forget + 0.01, random_images(6, seed=2), forget[:1] * 0.9])
    detector = PixelCopyDetector(1.0)
    distances, index = detector.nearest(samples, forget)
    assert torch.equal(distances, nearest_distances(samples, forget))
    assert torch.equal(detector.is_copy(samples, forget), nearest_distances(samples, forget) < 1.0)
    assert detector.is_copy(samples, forget).tolist() == [True, True] + [False] * 6 + [True]
    assert memorization_rate(samples, forget, copy_detector=detector) == memorization_rate(samples, forget, 1.0) == 3 / 9
    far, near = data.filter_far_from(samples, forget, 1.0)
    far_d, near_d = data.filter_far_from(samples, forget, copy_detector=detector)
    assert torch.equal(far, far_d) and torch.equal(near, near_d) and len(near) == 3
    assert data.largest_cluster(samples, 1.0) == data.largest_cluster(samples, copy_detector=detector)
    assert detector.describe() == {"name": "pixel", "kind": "pixel", "threshold": 1.0, "threshold_units": "pixel L2 in [0, 1] units, copy below"}
    assert detector_fingerprint(detector) == {} and detector_fingerprint(None) == {}
    with pytest.raises(ValueError, match="> 0"):
        PixelCopyDetector(0.0)


# ---------------------------------------------------------------------------------------------------------------
# A tiny random DINOv2: plumbing
# ---------------------------------------------------------------------------------------------------------------


def test_feature_detector_resizes_batches_and_uses_cosine(dinov2_dir):
    detector = load_copy_detector(str(dinov2_dir), 0.5, batch_size=2)
    assert isinstance(detector, FeatureCopyDetector) and detector.name == str(dinov2_dir) and detector.threshold == 0.5
    images = random_images(5, seed=3)  # 8x8, 1 channel
    pixel_values = detector.preprocess(images)
    assert pixel_values.shape == (5, 3, 16, 16)  # RGB at the processor's size
    assert torch.equal(pixel_values[:, 0], pixel_values[:, 1]) and torch.equal(pixel_values[:, 1], pixel_values[:, 2])

    by_two = detector.embed(images)
    detector.batch_size = 1
    by_one = detector.embed(images)
    detector.batch_size = 64
    by_all = detector.embed(images)
    assert torch.allclose(by_one, by_two, atol=1e-6) and torch.allclose(by_all, by_two, atol=1e-6)

    # Cosine of the model's own pooled output.
    with torch.no_grad():
        pooled = detector.model(pixel_values=pixel_values).pooler_output.double()
    expected = torch.nn.functional.normalize(pooled, dim=1) @ torch.nn.functional.normalize(pooled, dim=1).T
    similarities = detector.similarities(images, images)
    assert torch.allclose(similarities, expected, atol=1e-6)
    assert torch.allclose(similarities.diagonal(), torch.ones(5, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(detector.distance_matrix(images, images), (1 - expected).clamp_min(0), atol=1e-6)

    # The threshold: just below / above the similarity of image 0 to image 1.
    value = float(similarities[0, 1])
    pair = images[1:2], images[:1]
    assert load_copy_detector(str(dinov2_dir), value - 1e-4).is_copy(*pair).tolist() == [True]
    assert load_copy_detector(str(dinov2_dir), value + 1e-4).is_copy(*pair).tolist() == [False]
    assert detector_fingerprint(detector) == {"copy_detector": {"name": str(dinov2_dir), "threshold": 0.5}}
    # RGB images of another size are resized too.
    assert detector.preprocess(random_images(2, channels=3, size=24)).shape == (2, 3, 16, 16)


def test_bad_detector_flags_are_refused_in_one_line(dinov2_dir, tmp_path):
    check_copy_detector("pixel")
    check_copy_detector(str(dinov2_dir))
    check_copy_detector("facebook/dinov2-small")  # a Hub id: checked when it loads
    bin_only = save_tiny_dinov2(tmp_path / "bin", safetensors=False)
    for call in (lambda: check_copy_detector(str(bin_only)), lambda: load_copy_detector(str(bin_only), 0.5)):
        with pytest.raises(UserInputError, match=r"only \.bin weights.*safe_serialization=True") as info:
            call()
        assert "\n" not in str(info.value)
    with pytest.raises(UserInputError, match="does not exist"):
        check_copy_detector(str(tmp_path / "missing" / "dinov2"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserInputError, match="no config.json"):
        check_copy_detector(str(empty))
    no_processor = tmp_path / "no_processor"
    no_processor.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_processor / name).write_bytes((dinov2_dir / name).read_bytes())
    with pytest.raises(UserInputError, match="preprocessor_config.json"):
        check_copy_detector(str(no_processor))
    with pytest.raises(ValueError, match=r"\(-1, 1\)"):
        load_copy_detector(str(dinov2_dir), 1.5)


# ---------------------------------------------------------------------------------------------------------------
# Behaviour with known features: the toy classifier's penultimate layer
# ---------------------------------------------------------------------------------------------------------------


def shifted_png_copy(image: torch.Tensor) -> torch.Tensor:
    """The image moved one pixel right (a black column enters), saved as an 8-bit PNG and read back."""
    moved = torch.roll(image, shifts=1, dims=-1)
    moved[..., 0] = -1.0
    buffer = io.BytesIO()
    Image.fromarray(((moved[0] + 1) * 127.5).round().to(torch.uint8).numpy(), mode="L").save(buffer, format="PNG")
    buffer.seek(0)
    return torch.from_numpy(np.array(Image.open(buffer))).float().div(127.5).sub(1.0)[None]


def test_shifted_reencoded_copy_is_a_copy_and_other_digits_are_not():
    from diffusers_unlearn.toy import MEMORIZATION_THRESHOLD, load_classifier, load_digits_images

    classifier = load_classifier().eval()
    detector = FeatureCopyDetector(classifier.features, None, threshold=0.8, name="toy-classifier")
    images, labels = load_digits_images()
    originals = images[:10]
    assert labels[:10].tolist() == list(range(10))  # one image of each digit
    copies = torch.stack([shifted_png_copy(x) for x in originals])
    assert torch.equal(detector.is_copy(copies, originals), torch.ones(10, dtype=torch.bool))
    # Each copy is nearest to its own original.
    assert detector.nearest(copies, originals)[1].tolist() == list(range(10))
    # Two different digits are not copies: no off-diagonal pair of the ten passes.
    similarities = detector.similarities(originals, originals)
    off_diagonal = similarities[~torch.eye(10, dtype=torch.bool)]
    assert (off_diagonal < detector.threshold).all()
    for i in range(10):
        others = torch.cat([originals[:i], originals[i + 1 :]])
        assert not detector.is_copy(originals[i : i + 1], others).item()
    # The toy's pixel threshold misses these shifted copies: what the features are for.
    assert not PixelCopyDetector(MEMORIZATION_THRESHOLD).is_copy(copies, originals).any()


# ---------------------------------------------------------------------------------------------------------------
# Every consumer uses the detector it is given
# ---------------------------------------------------------------------------------------------------------------


def test_metrics_and_data_consumers_use_the_detector():
    from diffusers_unlearn.objectives import DenoisingBatch, Denoiser

    from tiny_models import schedule, tiny_unet

    forget = random_images(2, seed=4)
    samples = torch.cat([forget, random_images(4, seed=5)])
    detector = CountingDetector(threshold=0.99)
    expected = detector.is_copy(samples, forget)
    assert expected.tolist() == [True, True, False, False, False, False]
    detector.calls = 0
    assert memorization_rate(samples, forget, copy_detector=detector) == 2 / 6
    assert detector.calls == 2
    far, near = data.filter_far_from(samples, forget, copy_detector=detector)
    assert len(near) == 2 and detector.calls == 4
    assert data.largest_cluster(torch.cat([forget[:1]] * 3 + [samples[2:]]), copy_detector=detector) == [0, 1, 2]
    assert detector.calls == 5
    assert cluster_fraction(torch.cat([forget[:1]] * 3 + [samples[2:]]), detector) == 3 / 7
    denoiser = Denoiser(tiny_unet(), schedule())
    report = evaluate_ddpm(samples, denoiser=denoiser, forget=DenoisingBatch(forget), memorization_threshold=None, copy_detector=detector, num_timesteps=2)
    assert report["memorization_count"] == 2 and report["memorization_threshold"] == 0.99
    assert detector.calls == 8
    with pytest.raises(ValueError, match="not both"):
        memorization_rate(samples, forget, feature_fn=lambda x: x, copy_detector=detector)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    from tiny_models import save_tiny_sd_pipeline

    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "model")


def test_pipeline_memorization_score_and_scan_share_the_cluster_check(sd_dir, dinov2_dir, tmp_path, monkeypatch):
    from diffusers_unlearn import scan
    from diffusers_unlearn.metrics import copy_detection
    from diffusers_unlearn.pipelines import UnlearnStableDiffusionPipeline
    from diffusers_unlearn.pipelines.text_to_image import generate_images

    pipe = UnlearnStableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None)
    prompts = ["a digit seven", "a photo of a cat"]
    detector = CountingDetector(threshold=0.999)
    scores = pipe.memorization_score(prompts, num_generations=3, num_inference_steps=2, copy_detector=detector)
    assert detector.calls == 2  # one cluster check per prompt
    generations = generate_images(pipe, prompts, 3, seed=0, num_inference_steps=2, guidance_scale=7.5)
    assert scores == [cluster_fraction(images, detector) for images in generations]
    assert all(1 / 3 <= s <= 1 for s in scores)
    everything = CountingDetector(threshold=-0.999)  # every pair is a copy
    assert pipe.memorization_score(prompts, num_generations=3, num_inference_steps=2, copy_detector=everything) == [1.0, 1.0]

    # The scan with the tiny DINOv2 folder, then with a detector stub in its place.
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(prompts))
    common = ["--pretrained_model_name_or_path", str(sd_dir), "--prompts_file", str(prompts_file), "--num_generations", "2",
              "--num_inference_steps", "2", "--num_cluster_generations", "3", "--output_file", str(tmp_path / "out.jsonl")]
    rows = scan.main(common + ["--copy_detector", str(dinov2_dir), "--copy_similarity_threshold", "0.5"])
    assert all(row["copy_detector"] == str(dinov2_dir) and row["cluster_fraction"] in (1 / 3, 2 / 3, 1.0) for row in rows)
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["cluster_fraction"] for r in written] == [r["cluster_fraction"] for r in rows]
    stub = CountingDetector(threshold=0.999)
    monkeypatch.setattr(copy_detection, "load_copy_detector", lambda *a, **k: stub)
    rows = scan.main(common)
    assert stub.calls == 2
    by_prompt = {row["caption"]: row["cluster_fraction"] for row in rows}
    assert [by_prompt[p] for p in prompts] == scores  # the same seeds, detector and check as memorization_score
    with pytest.raises(ValueError, match="num_cluster_generations"):
        scan.main(common[:-4] + ["--output_file", str(tmp_path / "x.jsonl"), "--copy_detector", str(dinov2_dir)])


def test_unlearn_keep_filter_uses_the_detector(sd_dir):
    from diffusers_unlearn.pipelines import UnlearnStableDiffusionPipeline

    pipe = UnlearnStableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None)
    forget = [(random_images(1, seed=6, channels=3, size=16)[0], "a digit seven")]
    everything = CountingDetector(threshold=-0.999)  # every generation is a "copy": the keep set is empty
    with pytest.raises(ValueError, match="keep set is empty"):
        pipe.unlearn(forget, max_train_steps=1, keep_from_generations=2, copy_detector=everything, resolution=16)
    assert everything.calls >= 2


# ---------------------------------------------------------------------------------------------------------------
# The DDPM script: flags checked first, the detector recorded and used
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddpm_workspace(tmp_path_factory):
    from diffusers import DDPMPipeline, DDPMScheduler

    from tiny_models import tiny_unet

    root = tmp_path_factory.mktemp("ddpm")
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(root / "model")
    images = random_images(14, seed=7)
    for name, part in (("forget", images[:2]), ("keep", images[2:10]), ("heldout", images[10:])):
        (root / name).mkdir()
        for i, image in enumerate(part):
            Image.fromarray(((image[0] + 1) * 127.5).round().to(torch.uint8).numpy(), mode="L").save(root / name / f"{name}{i}.png")
    return root


def ddpm_args(root, out, *extra):
    return [
        "--pretrained_model_name_or_path", str(root / "model"), "--forget_data_dir", str(root / "forget"),
        "--keep_data_dir", str(root / "keep"), "--heldout_data_dir", str(root / "heldout"), "--output_dir", str(out),
        "--train_batch_size", "4", "--max_train_steps", "2", "--num_eval_samples", "6", "--num_validation_images", "2",
        "--ddpm_num_inference_steps", "2", "--validation_steps", "100", "--siss_scaling_norm", "0.5", *extra,
    ]


def test_ddpm_script_records_and_uses_the_feature_detector(ddpm_workspace, dinov2_dir, tmp_path, monkeypatch):
    import train_unlearn_ddpm as script

    used = []
    real_load = script.load_copy_detector

    def load(*args, **kwargs):
        detector = real_load(*args, **kwargs)
        embed = detector.embed
        detector.embed = lambda images: used.append(len(images)) or embed(images)
        return detector

    monkeypatch.setattr(script, "load_copy_detector", load)
    out = tmp_path / "out"
    script.main(script.parse_args(ddpm_args(ddpm_workspace, out, "--copy_detector", str(dinov2_dir), "--copy_similarity_threshold", "0.9", "--checkpointing_steps", "2",
                                            "--validation_steps", "1", "--num_validation_images", "3")))
    report = json.loads((out / "unlearning_report.json").read_text())
    assert report["copy_detector"]["name"] == str(dinov2_dir) and report["copy_detector"]["threshold"] == 0.9
    assert report["memorization_threshold"] == 0.9
    assert report["metrics"]["before"]["memorization_threshold"] == 0.9
    assert 6 in used  # the evaluation samples went through the detector
    # ... and each validation's 3 samples (the copy count a stopping rule reads), not a pixel distance.
    assert len(report["validation"]) >= 1 and used.count(3) == len(report["validation"])
    assert all(0.0 <= entry["memorization_rate"] <= 1.0 for entry in report["validation"])
    card = (out / "README.md").read_text()
    assert f"Copy detection: `{dinov2_dir}`, threshold 0.9 (cosine similarity, copy above)" in card
    manifests = list(out.glob("checkpoint-*/checkpoint.json"))
    assert manifests and json.loads(manifests[0].read_text())["fingerprint"]["copy_detector"] == {"name": str(dinov2_dir), "threshold": 0.9}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--copy_detector", "./no/such/folder"], "does not exist"),
        (["--copy_similarity_threshold", "0.5"], "applies to a feature --copy_detector"),
        (["--copy_detector", "DINO", "--memorization_threshold", "1.0"], "is pixel L2"),
    ],
)
def test_ddpm_script_refuses_bad_detector_flags_first(ddpm_workspace, tmp_path, extra, message, monkeypatch):
    import train_unlearn_ddpm as script

    monkeypatch.setattr(script, "make_accelerator", lambda args: pytest.fail("the accelerator started before the flag check"))
    args = script.parse_args(ddpm_args(ddpm_workspace, tmp_path / "out", *extra))
    with pytest.raises(UserInputError, match=message):
        script.main(args)


def test_ddpm_script_refuses_a_bin_only_detector(ddpm_workspace, tmp_path):
    import train_unlearn_ddpm as script

    bin_only = save_tiny_dinov2(tmp_path / "bin", safetensors=False)
    with pytest.raises(UserInputError, match=r"\.bin"):
        script.main(script.parse_args(ddpm_args(ddpm_workspace, tmp_path / "out", "--copy_detector", str(bin_only))))


# ---------------------------------------------------------------------------------------------------------------
# The text-to-image script: cluster check, keep filter and report through the same detector
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_workspace(sd_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sd_inputs")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")).save(root / f"f{i}.png")
    (root / "memorized.jsonl").write_text(json.dumps({"caption": "a digit seven"}) + "\n")
    return root


def sd_args(sd_dir, root, out, *extra):
    return [
        "--pretrained_model_name_or_path", str(sd_dir), "--output_dir", str(out), "--train_batch_size", "2",
        "--max_train_steps", "2", "--num_eval_images", "3", "--num_validation_images", "2", "--num_inference_steps", "2",
        "--validation_steps", "100", "--noise_norm_generations", "0", "--siss_scaling_norm", "0.5", *extra,
    ]


def test_sd_script_cluster_check_and_keep_filter_use_the_detector(sd_dir, sd_workspace, dinov2_dir, tmp_path, caplog):
    import train_unlearn_sd as script

    # Similarity > -0.99: every generation copies every other, so the memorized prompt's 3 generations form one
    # cluster (the forget set) and the keep filter then rejects every new generation as a copy.
    args = sd_args(sd_dir, sd_workspace, tmp_path / "out", "--memorized_prompts_file", str(sd_workspace / "memorized.jsonl"),
                   "--num_forget_generations", "3", "--keep_from_generations", "2",
                   "--copy_detector", str(dinov2_dir), "--copy_similarity_threshold", "-0.99")
    with caplog.at_level("INFO"), pytest.raises(ValueError, match="every generation is a forget copy"):
        script.main(script.parse_args(args))
    assert "3 of 3 generations form the memorized cluster" in caplog.text
    assert "0 generation(s) kept, 2 rejected" in caplog.text


def test_sd_script_records_the_detector(sd_dir, sd_workspace, dinov2_dir, tmp_path, monkeypatch):
    import train_unlearn_sd as script

    stub = CountingDetector(threshold=0.999)
    monkeypatch.setattr(script, "load_copy_detector", lambda *a, **k: stub)
    out = tmp_path / "out"
    script.main(script.parse_args(sd_args(
        sd_dir, sd_workspace, out, "--forget_images", str(sd_workspace / "f0.png"), "--forget_prompts", "a digit seven",
        "--keep_from_generations", "3", "--copy_detector", str(dinov2_dir),
    )))
    report = json.loads((out / "unlearning_report.json").read_text())
    assert report["copy_detector"] == {"name": "counting", "kind": "features", "threshold": 0.999, "threshold_units": "cosine similarity, copy above"}
    assert report["memorization_threshold"] == 0.999 and report["metrics"]["after"]["memorization_threshold"] == 0.999
    assert stub.calls >= 6  # keep filter (2), before and after evaluation (2 each)
    assert "Copy detection: `counting`, threshold 0.999 (cosine similarity, copy above)" in (out / "README.md").read_text()


def test_sd_script_refuses_pixel_flags_with_a_feature_detector(sd_dir, sd_workspace, dinov2_dir, tmp_path):
    import train_unlearn_sd as script

    args = sd_args(sd_dir, sd_workspace, tmp_path / "out", "--forget_images", str(sd_workspace / "f0.png"), "--forget_prompts",
                   "a digit seven", "--keep_from_generations", "2", "--copy_detector", str(dinov2_dir), "--keep_generation_threshold", "1.0")
    with pytest.raises(UserInputError, match="--keep_generation_threshold is pixel L2"):
        script.check_inputs(script.parse_args(args))


def test_evaluate_cli_counts_copies_with_the_feature_detector(ddpm_workspace, dinov2_dir, tmp_path):
    from diffusers_unlearn import evaluate

    common = ["--pretrained_model_name_or_path", str(ddpm_workspace / "model"), "--forget_data_dir", str(ddpm_workspace / "forget"),
              "--num_samples", "4", "--num_inference_steps", "2", "--num_timesteps", "2", "--device", "cpu"]
    report = evaluate.main(common + ["--copy_detector", str(dinov2_dir), "--copy_similarity_threshold", "-0.99"])
    assert report["copy_detector"]["name"] == str(dinov2_dir)
    assert report["memorization_threshold"] == -0.99 and report["memorization_rate"] == 1.0  # every sample is a "copy"
    pixel = evaluate.main(common + ["--memorization_threshold", "1e-3"])
    assert "copy_detector" not in pixel and pixel["memorization_rate"] == 0.0
    with pytest.raises(UserInputError, match="only .bin"):
        evaluate.main(common + ["--copy_detector", str(save_tiny_dinov2(tmp_path / "bin", safetensors=False))])


def test_detectors_are_part_of_the_metrics_api():
    import diffusers_unlearn.metrics as metrics
    from diffusers_unlearn.metrics import copy_detection

    for name in ("CopyDetector", "PixelCopyDetector", "FeatureCopyDetector", "load_copy_detector", "cluster_fraction"):
        assert name in metrics.__all__ and getattr(metrics, name) is getattr(copy_detection, name)
