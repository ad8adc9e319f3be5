import torch
import torch.nn.functional as F

from minignext.schedulers import DDPMScheduler
from conftest import check

LESSON = "lesson07_toy"
DIAGONAL = ("only the diagonal counted as positive: every pair whose labels are equal is a positive "
            "(spread the target of a row evenly over them)")
SD = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def embeddings(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_info_nce_with_distinct_labels_is_the_clip_loss(ex):
    a, b = embeddings()
    logits = 10.0 * a @ b.T
    want = 0.5 * (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6)))
    check(ex.info_nce(a, b, torch.arange(6), 10.0), want, "info_nce with 6 different labels vs CLIP's loss")


def test_info_nce_counts_every_same_class_pair_as_positive(ex):
    a, b = embeddings(seed=1)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    logits = 5.0 * a @ b.T
    total = 0.0
    for direction in (logits, logits.T):
        logp = direction.log_softmax(-1)
        for i in range(6):
            pos = [j for j in range(6) if labels[j] == labels[i]]
            total += -sum(logp[i, j] for j in pos) / len(pos) / 6
    clip = 0.5 * (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6)))
    check(ex.info_nce(a, b, labels, 5.0), total / 2, "info_nce with repeated labels vs a loop over the positives",
          wrong=[(DIAGONAL, clip)])


def expected_loss(latents, unet_fn, seed):
    g = torch.Generator().manual_seed(seed)
    n = latents.shape[0]
    t = torch.randint(0, 1000, (n,), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)[t].float().view(n, *[1] * (latents.dim() - 1))
    x_t = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    return t, x_t, ((unet_fn(x_t, t, None) - noise) ** 2).mean()


def test_diffusion_loss_is_the_ddpm_objective(ex):
    scheduler = DDPMScheduler.from_config(SD)
    latents = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(2))
    seen = {}

    def unet_fn(x_t, t, cond):
        seen["x_t"], seen["t"], seen["cond"] = x_t, t, cond
        return x_t * 0.5

    loss = ex.diffusion_loss(unet_fn, scheduler, latents, "context", torch.Generator().manual_seed(3))
    t, x_t, want = expected_loss(latents, lambda x, t, c: x * 0.5, 3)
    assert torch.equal(seen["t"], t), ("the time steps differ from torch.randint(0, 1000, (B,), generator=generator) "
                                       "drawn first, before the noise")
    assert seen["cond"] == "context", "the condition must reach unet_fn unchanged"
    check(seen["x_t"], x_t, "the noised latents given to unet_fn", atol=1e-5, rtol=1e-5)
    check(loss, want, "the loss: mean squared error between the prediction and the noise", atol=1e-5, rtol=1e-5)


def test_train_denoiser_follows_adam_and_the_loss_falls(ex):
    scheduler = DDPMScheduler.from_config(SD)
    latents = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(4))

    def make():
        torch.manual_seed(5)
        net = torch.nn.Conv2d(3, 3, 3, padding=1)
        return net, lambda x, t, c: net(x) * (t.float() / 1000).view(-1, 1, 1, 1) + net(x)

    net, unet_fn = make()
    losses = ex.train_denoiser(unet_fn, list(net.parameters()), scheduler, latents, None, steps=40, lr=0.02, seed=6)
    assert len(losses) == 40 and all(isinstance(x, float) for x in losses), "expected 40 losses as floats"
    ref, ref_fn = make()
    opt, g, want = torch.optim.Adam(ref.parameters(), lr=0.02), torch.Generator().manual_seed(6), []
    for _ in range(40):
        n = latents.shape[0]
        t = torch.randint(0, 1000, (n,), generator=g)
        noise = torch.randn(latents.shape, generator=g)
        loss = F.mse_loss(ref_fn(scheduler.add_noise(latents, noise, t), t, None), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        want.append(loss.item())
    check(torch.tensor(losses), torch.tensor(want), "the 40 losses vs a reference Adam loop", atol=1e-4, rtol=1e-4)
    assert sum(losses[-10:]) < sum(losses[:10]), "the loss did not fall over 40 steps"
