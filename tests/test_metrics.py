"""Tests for diffusers_unlearn.metrics and the evaluation CLI (CPU, tiny models, a few seconds)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from PIL import Image
from torch import nn

from diffusers_unlearn import evaluate
from diffusers_unlearn.pipelines.ddpm import sample_images
from diffusers_unlearn.metrics import (
    class_rate,
    classifier_features,
    classifier_score,
    denoising_losses,
    evaluate_ddpm,
    frechet_distance,
    kl_to_standard_normal,
    memorization_rate,
    mia_auc,
    nearest_distances,
    pul,
    predict_labels,
    pul_from_reports,
    timestep_grid,
    weight_distance,
)
from diffusers_unlearn.objectives.base import Denoiser, DenoisingBatch, denoising_loss

from tiny_models import schedule, tiny_unet


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


class StandInClassifier(nn.Module):
    """A random-weight classifier with the toy classifier's interface: forward -> 11 logits, features -> 16."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.SiLU())
        self.head = nn.Linear(16, 11)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def exact_moments(mean: torch.Tensor, std: torch.Tensor, n: int = 200, seed: int = 0) -> torch.Tensor:
    """n points whose empirical mean is exactly `mean` and empirical covariance exactly diag(std^2)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, mean.shape[0], generator=g, dtype=torch.float64)
    x = x - x.mean(0)
    chol = torch.linalg.cholesky(x.T @ x / (n - 1))
    white = torch.linalg.solve_triangular(chol, x.T, upper=False).T  # identity covariance
    return white * std + mean


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------------------------------------
# Quality
# ---------------------------------------------------------------------------------------------------------------


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    mean_a, std_a = torch.tensor([0.0, 1.0, -2.0, 0.5], dtype=torch.float64), torch.tensor([1.0, 2.0, 0.5, 3.0])
    mean_b, std_b = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64), torch.tensor([2.0, 2.0, 1.5, 0.1])
    a, b = exact_moments(mean_a, std_a, seed=0), exact_moments(mean_b, std_b, n=150, seed=1)
    # FD = ||mu_a - mu_b||^2 + sum_i (s_a,i - s_b,i)^2 for diagonal covariances.
    expected = (mean_a - mean_b).pow(2).sum() + (std_a.double() - std_b.double()).pow(2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-9, abs=1e-9)


def test_frechet_distance_symmetric_zero_and_full_covariance():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 6, generator=g) @ torch.randn(6, 6, generator=g)
    b = torch.randn(250, 6, generator=g) @ torch.randn(6, 6, generator=g) + 0.5
    assert frechet_distance(a, a) == 0.0
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-7)
    assert frechet_distance(a, a + 2.0) == pytest.approx(6 * 4.0, rel=1e-7)  # a pure shift adds ||shift||^2

    linalg = pytest.importorskip("scipy.linalg")  # cross-check the eigendecomposition route, if scipy is here
    a64, b64 = a.double().numpy(), b.double().numpy()
    ca, cb = np.cov(a64, rowvar=False), np.cov(b64, rowvar=False)
    covmean = linalg.sqrtm(ca @ cb).real
    reference = ((a64.mean(0) - b64.mean(0)) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * np.trace(covmean)
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-6)


def test_frechet_distance_rejects_bad_input():
    with pytest.raises(ValueError, match="Feature sizes differ"):
        frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))


def test_classifier_score_bounds():
    assert classifier_score(torch.zeros(10, 4)) == pytest.approx(1.0)
    assert classifier_score(torch.eye(4) * 200.0) == pytest.approx(4.0, rel=1e-6)
    assert classifier_score(torch.eye(4)[[0, 0, 0, 0]] * 200.0) == pytest.approx(1.0)  # confident, one class


def test_classifier_features_batched_and_restores_mode():
    clf = StandInClassifier().train()
    x = images(7, 0)
    out = classifier_features(clf, x, batch_size=3)
    assert out.shape == (7, 16)
    assert torch.allclose(out, clf.features(x).detach(), atol=1e-6)
    assert clf.training
    with pytest.raises(TypeError, match="features"):
        classifier_features(nn.Linear(64, 3), x.flatten(1))


# ---------------------------------------------------------------------------------------------------------------
# Membership inference
# ---------------------------------------------------------------------------------------------------------------


def test_mia_auc_known_values():
    assert mia_auc(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.4, 0.5])) == 1.0
    assert mia_auc(torch.tensor([0.4, 0.5]), torch.tensor([0.1, 0.2, 0.3])) == 0.0
    same = torch.tensor([0.3, 0.1, 0.2])
    assert mia_auc(same, same.clone()) == 0.5
    # members 0.1, 0.3 vs non-members 0.2, 0.3: win, win, loss, tie -> 2.5 / 4
    assert mia_auc(torch.tensor([0.1, 0.3]), torch.tensor([0.2, 0.3])) == 0.625


def test_mia_auc_matches_pairwise_count_with_ties():
    g = torch.Generator().manual_seed(0)
    members = torch.randint(0, 6, (40,), generator=g).double()
    nonmembers = torch.randint(2, 8, (30,), generator=g).double()
    wins = (members[:, None] < nonmembers[None, :]).double() + 0.5 * (members[:, None] == nonmembers[None, :]).double()
    assert mia_auc(members, nonmembers) == pytest.approx(wins.mean().item(), abs=1e-12)
    with pytest.raises(ValueError):
        mia_auc(torch.tensor([]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="NaN"):
        mia_auc(torch.tensor([float("nan")]), torch.tensor([1.0]))


# ---------------------------------------------------------------------------------------------------------------
# Memorization and class metrics
# ---------------------------------------------------------------------------------------------------------------


def test_nearest_distances_match_brute_force():
    samples, refs = images(23, 0), images(17, 1)
    brute = torch.cdist(((samples + 1) / 2).flatten(1).double(), ((refs + 1) / 2).flatten(1).double())
    distances, indices = nearest_distances(samples, refs, batch_size=5, return_indices=True)
    assert torch.allclose(distances, brute.min(1).values, atol=1e-10)
    assert torch.equal(indices, brute.argmin(1))
    assert nearest_distances(refs[:3], refs).abs().max() == 0.0  # exact copies are exactly 0

    def feature_fn(x):
        return x.flatten(1)[:, :10] + 2.0

    cosine = nearest_distances(samples, refs, feature_fn=feature_fn, batch_size=4)
    fa = nn.functional.normalize(feature_fn(samples).double(), dim=1)
    fb = nn.functional.normalize(feature_fn(refs).double(), dim=1)
    assert torch.allclose(cosine, (1 - fa @ fb.T).min(1).values.clamp_min(0), atol=1e-10)


def test_nearest_distances_rejects_bad_input():
    with pytest.raises(ValueError, match="same size"):
        nearest_distances(images(2, 0), torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        nearest_distances(images(2, 0) * 255, images(2, 1))


def test_memorization_rate_counts():
    canary = torch.ones(1, 1, 8, 8)
    samples = torch.cat([canary, canary, -canary, canary.clone().index_fill_(3, torch.tensor([0]), -1.0)])
    # distances: 0, 0, 8 (64 pixels * 1^2), sqrt(8) (one column of 8 pixels flipped)
    assert memorization_rate(samples, canary, threshold=1.0) == 0.5
    assert memorization_rate(samples, canary, threshold=3.0) == 0.75
    assert memorization_rate(samples, canary, threshold=100.0) == 1.0
    with pytest.raises(ValueError, match="threshold"):
        memorization_rate(samples, canary, threshold=0.0)


class FixedLogits(nn.Module):
    """Returns preset logits, one row per image (the image's first pixel indexes the row)."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("table", torch.tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.table[x.flatten(1)[:, 0].round().long()]


def test_low_confidence_samples_count_toward_no_class():
    # Row 0: confident class 1 (p ~ 0.98). Row 1: arg-max 1 but p ~ 0.37 (noise-like). Row 2: confident class 0.
    classifier = FixedLogits([[0.0, 4.0, 0.0], [0.5, 1.0, 0.5], [3.0, 0.0, 0.0]])
    images = torch.tensor([0.0, 1.0, 2.0, 1.0]).view(4, 1, 1, 1)
    assert predict_labels(classifier, images).tolist() == [1, 1, 0, 1]
    assert predict_labels(classifier, images, min_confidence=0.5).tolist() == [1, -1, 0, -1]
    report = evaluate_ddpm(images, classifier=classifier, forget_class=1)
    assert report["forget_class_count"] == 1 and report["class_min_confidence"] == 0.5
    assert evaluate_ddpm(images, classifier=classifier, forget_class=1, class_min_confidence=0.0)["forget_class_count"] == 3
    with pytest.raises(ValueError, match="min_confidence"):
        predict_labels(classifier, images, min_confidence=1.5)


def test_class_rate_and_pul():
    assert class_rate(torch.tensor([3, 1, 3, 3]), 3) == 0.75
    assert pul(80, 20) == 75.0
    assert pul(10, 10) == 0.0
    assert pul(10, 15) == -50.0
    with pytest.raises(ValueError, match="N_orig = 0"):
        pul(0, 3)
    with pytest.raises(ValueError, match=">= 0"):
        pul(5, -1)
    before = {"forget_class_count": 40, "num_samples": 100, "forget_class": 1}
    assert pul_from_reports(before, {"forget_class_count": 10, "num_samples": 100, "forget_class": 1}) == 75.0
    with pytest.raises(ValueError, match="same seeds"):
        pul_from_reports(before, {"forget_class_count": 10, "num_samples": 50})
    with pytest.raises(ValueError, match="forget_class_count"):
        pul_from_reports(before, {"num_samples": 100})


# ---------------------------------------------------------------------------------------------------------------
# Likelihood
# ---------------------------------------------------------------------------------------------------------------


def test_timestep_grid():
    assert timestep_grid(1000, 4).tolist() == [125, 375, 625, 875]
    assert timestep_grid(1000, 2, (100, 200)).tolist() == [125, 175]
    with pytest.raises(ValueError):
        timestep_grid(1000, 0)


def test_denoising_losses_deterministic_and_paired():
    denoiser = Denoiser(tiny_unet(seed=0), schedule())
    batch = DenoisingBatch(images(5, 0))
    first = denoising_losses(denoiser, batch, num_timesteps=4, noise_draws=2, seed=3)
    again = denoising_losses(denoiser, batch, num_timesteps=4, noise_draws=2, seed=3, batch_size=3)
    assert first.shape == (5,)
    assert torch.allclose(first, again, rtol=1e-6)  # the same value twice, whatever the batching
    other_seed = denoising_losses(denoiser, batch, num_timesteps=4, noise_draws=2, seed=4)
    assert not torch.allclose(first, other_seed)
    # An item's value does not depend on the other items in the batch (index-seeded noise).
    alone = denoising_losses(denoiser, DenoisingBatch(batch.x0[:1]), num_timesteps=4, noise_draws=2, seed=3)
    assert alone[0].item() == pytest.approx(first[0].item(), rel=1e-6)


def test_denoising_losses_lower_for_the_item_the_model_fit():
    unet = tiny_unet(seed=0)
    denoiser = Denoiser(unet, schedule())
    pair = images(2, 7)
    g = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(unet.parameters(), lr=3e-3)
    fitted = DenoisingBatch(pair[:1].expand(32, -1, -1, -1))
    for _ in range(40):
        loss = denoising_loss(denoiser, fitted, g).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    losses = denoising_losses(denoiser, DenoisingBatch(pair), num_timesteps=10, seed=0)
    assert losses[0] < 0.7 * losses[1]
    # A loss-threshold attack with the fitted item as the member finds it.
    assert mia_auc(losses[:1], losses[1:]) == 1.0


def test_kl_to_standard_normal():
    class Scaled(nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.scale = scale

        def forward(self, x, t):
            return self.scale * x

    zeros = DenoisingBatch(torch.zeros(64, 1, 8, 8))
    late = (990, 1000)  # sigma_t ~ 1 there, so x_t of a zero image is ~ N(0, I)
    unit = kl_to_standard_normal(Denoiser(Scaled(1.0), schedule()), zeros, 5, timestep_range=late)
    wide = kl_to_standard_normal(Denoiser(Scaled(3.0), schedule()), zeros, 5, timestep_range=late)
    assert 0 <= unit < 0.05
    assert wide == pytest.approx(0.5 * (9 - 1 - math.log(9)), rel=0.1)


# ---------------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------------


def test_weight_distance():
    unet = tiny_unet(seed=0)
    assert weight_distance(unet, copy.deepcopy(unet)) == {"l2": 0.0, "relative": 0.0}
    moved = copy.deepcopy(unet)
    with torch.no_grad():
        moved.conv_in.bias.add_(0.5)
    n = unet.conv_in.bias.numel()
    result = weight_distance(unet, moved)
    assert result["l2"] == pytest.approx(0.5 * math.sqrt(n), rel=1e-6)
    assert 0 < result["relative"] < 1
    with pytest.raises(ValueError, match="different parameters"):
        weight_distance(unet, tiny_unet(num_class_embeds=3))


def test_weight_distance_sees_through_lora():
    from diffusers_unlearn.lora import add_lora, lora_weight_deltas

    base = tiny_unet(seed=0)
    adapted = add_lora(copy.deepcopy(base), rank=2, targets="attention")
    assert weight_distance(base, adapted)["l2"] == 0.0  # lora_B starts at zero
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.fill_(0.1)
    deltas = lora_weight_deltas(adapted)
    expected = math.sqrt(sum(d.double().pow(2).sum().item() for d in deltas.values()))
    assert weight_distance(base, adapted)["l2"] == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------------------------------


def test_evaluate_ddpm_returns_every_key():
    unet = tiny_unet(seed=0)
    denoiser = Denoiser(unet, schedule())
    samples = sample_images(unet, DDPMScheduler(num_train_timesteps=1000), num_samples=6, seed=0, num_inference_steps=3)
    classifier = StandInClassifier()
    forget = DenoisingBatch(torch.cat([samples[:1], images(1, 1)]))  # one sample copies a forget image
    report = evaluate_ddpm(
        samples,
        denoiser=denoiser,
        forget=forget,
        keep=DenoisingBatch(images(4, 2)),
        heldout=DenoisingBatch(images(3, 3)),
        classifier=classifier,
        reference_features=classifier_features(classifier, images(8, 4)),
        memorization_threshold=0.5,
        forget_class=2,
        seed=0,
        num_timesteps=3,
        include_kl=True,
    )
    expected = {
        "num_samples", "memorization_rate", "memorization_count", "forget_class_rate", "forget_class_count",
        "fd", "classifier_score", "forget_loss", "keep_loss", "heldout_loss", "mia_auc", "forget_kl", "keep_kl",
    }
    assert expected <= set(report)
    assert report["num_samples"] == 6
    assert report["memorization_count"] >= 1 and report["memorization_rate"] == report["memorization_count"] / 6
    assert json.loads(json.dumps(report)) == report  # JSON-ready
    with pytest.raises(ValueError, match="classifier"):
        evaluate_ddpm(samples, forget_class=1)


# ---------------------------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------------------------


def save_png_folder(folder, batch: torch.Tensor) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(batch):
        array = ((image[0].numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(array, mode="L").save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddpm")
    DDPMPipeline(unet=tiny_unet(seed=0), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(path)
    return path


def cli_args(pipeline_dir, forget_dir, *extra):
    return [
        "--pretrained_model_name_or_path", str(pipeline_dir), "--forget_data_dir", str(forget_dir),
        "--num_samples", "4", "--num_inference_steps", "2", "--num_timesteps", "2", *extra,
    ]


def test_cli_writes_a_report(pipeline_dir, tmp_path, monkeypatch):
    from diffusers_unlearn.lora import add_lora, save_lora_weights

    monkeypatch.setattr(evaluate, "_load_classifier", lambda args, channels, size: StandInClassifier())
    save_png_folder(tmp_path / "forget", images(2, 0))
    save_png_folder(tmp_path / "keep", images(3, 1))
    save_png_folder(tmp_path / "heldout", images(2, 2))
    adapter = save_lora_weights(add_lora(tiny_unet(seed=0), rank=2), tmp_path / "adapter")
    output = tmp_path / "out" / "report.json"
    argv = cli_args(
        pipeline_dir, tmp_path / "forget",
        "--keep_data_dir", str(tmp_path / "keep"), "--heldout_data_dir", str(tmp_path / "heldout"),
        "--memorization_threshold", "2.0", "--adapter", str(adapter), "--output", str(output),
    )
    report = evaluate.main(argv)
    written = json.loads(output.read_text())
    assert written == json.loads(json.dumps(report))
    for key in ("num_samples", "memorization_rate", "fd", "classifier_score", "forget_loss", "keep_loss",
                "heldout_loss", "mia_auc"):
        assert key in written, key
    assert written["num_samples"] == 4 and written["num_forget_images"] == 2
    # Same seed, same model: the same report (paired, deterministic).
    assert evaluate.main(argv)["forget_loss"] == written["forget_loss"]
    with_class = evaluate.main(argv + ["--forget_class", "2"])
    assert 0 <= with_class["forget_class_count"] <= 4
    with pytest.raises(ValueError, match="forget_class 11"):
        evaluate.main(argv + ["--forget_class", "11"])


def test_cli_rejects_bad_input_before_sampling(pipeline_dir, tmp_path, monkeypatch):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled despite bad input")

    monkeypatch.setattr(evaluate, "_sample", no_sampling)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no images"):
        evaluate.main(cli_args(pipeline_dir, tmp_path / "empty"))
    with pytest.raises(ValueError, match="does not exist"):
        evaluate.main(cli_args(pipeline_dir, tmp_path / "missing"))

    save_png_folder(tmp_path / "corrupt", images(2, 0))
    (tmp_path / "corrupt" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(ValueError, match="001.png"):
        evaluate.main(cli_args(pipeline_dir, tmp_path / "corrupt"))

    save_png_folder(tmp_path / "good", images(2, 0))
    with pytest.raises(ValueError, match="unet/ and scheduler/"):
        evaluate.main(cli_args(tmp_path / "good", tmp_path / "good"))
    (tmp_path / "good" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="notes.txt"):
        evaluate.main(cli_args(pipeline_dir, tmp_path / "good"))
