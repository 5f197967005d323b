"""Tiny randomly initialised DiffAE components for tests (16x16 images, z_sem of width 16).

Upstream zero-initialises the last conv of every resnet, attention output and the UNet
output, so a freshly built UNet predicts eps = 0 exactly; :func:`randomize_` gives every
parameter small random values so outputs depend on every input.
"""

import torch
from diffusers import DDIMScheduler

from ipl_diffusion.models import DiffAEUNetModel, LatentNetModel, SemanticEncoder

SIZE = 16
Z = 16


def randomize_(model, seed=0, std=0.05):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.ndim == 1:  # norm scales
                param.copy_(1 + std * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(std * torch.randn(param.shape, generator=generator))
    return model.eval()


def tiny_unet(seed=0, **overrides):
    config = dict(
        sample_size=SIZE, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(8,), embed_channels=16, z_sem_channels=Z,
    )
    config.update(overrides)
    return randomize_(DiffAEUNetModel(**config), seed)


def tiny_encoder(seed=1, **overrides):
    config = dict(
        sample_size=SIZE, model_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1,
        attention_resolutions=(8,), z_sem_channels=Z,
    )
    config.update(overrides)
    return randomize_(SemanticEncoder(**config), seed)


def tiny_latent_net(seed=2):
    return randomize_(
        LatentNetModel(num_channels=Z, num_hid_channels=32, num_layers=3, skip_layers=(1, 2), num_time_emb_channels=8),
        seed,
    )


def diffae_scheduler(**overrides):
    """The DDIM scheduler DiffAE decodes with (linear betas, clipped x0, leading spacing)."""
    config = dict(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
        clip_sample=True, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading",
    )
    config.update(overrides)
    return DDIMScheduler(**config)


def latent_scheduler():
    """Upstream's latent DDIM schedule: constant beta 0.008 over 1000 steps, no clipping."""
    return DDIMScheduler(num_train_timesteps=1000, trained_betas=[0.008] * 1000, clip_sample=False)
