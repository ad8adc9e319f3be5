import torch
import torch.nn.functional as F

from minignext.schedulers import DDPMScheduler

LESSON = "lesson07_toy"


def embeddings(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_info_nce_with_distinct_labels_is_the_clip_loss(ex):
    a, b = embeddings()
    logits = 10.0 * a @ b.T
    want = 0.5 * (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6)))
    torch.testing.assert_close(ex.info_nce(a, b, torch.arange(6), 10.0), want)


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
    torch.testing.assert_close(ex.info_nce(a, b, labels, 5.0), total / 2)


def test_diffusion_loss_is_the_ddpm_objective(ex):
    scheduler = DDPMScheduler.from_config({"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                                           "beta_start": 0.00085, "beta_end": 0.012})
    latents = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(2))
    seen = {}

    def unet_fn(x_t, t, cond):
        seen["x_t"], seen["t"], seen["cond"] = x_t, t, cond
        return x_t * 0.5

    loss = ex.diffusion_loss(unet_fn, scheduler, latents, "context", torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (4,), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)[t].float().view(4, 1, 1, 1)
    x_t = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    assert torch.equal(seen["t"], t) and seen["cond"] == "context"
    torch.testing.assert_close(seen["x_t"], x_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ((x_t * 0.5 - noise) ** 2).mean(), atol=1e-5, rtol=1e-5)
