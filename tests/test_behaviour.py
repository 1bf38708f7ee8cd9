"""Real training, end to end: memorize two images, unlearn one with SISS."""

import torch

from diffusers_unlearn.objectives import DenoisingBatch, Denoiser, get_objective
from diffusers_unlearn.unlearner import Unlearner

from tiny_models import schedule, tiny_unet, trainable


def two_images() -> torch.Tensor:
    """A filled square and a cross, 8x8, in [-1, 1]."""
    square = -torch.ones(1, 8, 8)
    square[:, 2:6, 2:6] = 1
    cross = -torch.ones(1, 8, 8)
    cross[:, 3:5, :] = 1
    cross[:, :, 3:5] = 1
    return torch.stack([square, cross])


@torch.no_grad()
def mean_denoising_loss(denoiser: Denoiser, image: torch.Tensor) -> float:
    """The average loss over a fixed grid of timesteps and fixed noise draws."""
    g = torch.Generator().manual_seed(1234)
    t = torch.arange(25, 1000, 50).repeat_interleave(8)
    x0 = image.expand(len(t), -1, -1, -1)
    noise = torch.randn(x0.shape, generator=g)
    x_t = denoiser.schedule.add_noise(x0, noise, t)
    return (denoiser(x_t, t, DenoisingBatch(x0)) - noise).pow(2).mean().item()


def test_siss_unlearns_the_forget_image_and_spares_the_other():
    torch.manual_seed(0)
    images = two_images()
    denoiser = Denoiser(tiny_unet(seed=0), schedule(num_train_timesteps=1000))
    g = torch.Generator().manual_seed(0)

    optimizer = torch.optim.AdamW(denoiser.model.parameters(), lr=3e-3)
    memorize = Unlearner(get_objective("naive_deletion"), denoiser, optimizer)
    for _ in range(250):
        batch = DenoisingBatch(images[torch.randint(0, 2, (32,), generator=g)])
        memorize.step(None, batch, generator=g)

    forget_image, other_image = images[0:1], images[1:2]
    before = [mean_denoising_loss(denoiser, im) for im in (forget_image, other_image)]

    optimizer = torch.optim.AdamW(trainable(denoiser.model), lr=1e-3)
    unlearner = Unlearner(get_objective("siss", lam=0.5, relative_norm=0.5), denoiser, optimizer)
    for _ in range(60):
        forget = DenoisingBatch(forget_image.expand(16, -1, -1, -1))
        keep = DenoisingBatch(other_image.expand(16, -1, -1, -1))
        unlearner.step(forget, keep, generator=g)
    after = [mean_denoising_loss(denoiser, im) for im in (forget_image, other_image)]

    rise_forget, rise_other = after[0] - before[0], after[1] - before[1]
    assert before[0] < 0.2 and before[1] < 0.2, before  # both were memorized
    assert rise_forget > 0.05, (before, after)
    assert rise_forget > 5 * max(rise_other, 0.0) + 0.02, (before, after)
