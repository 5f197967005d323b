"""Shared builders for the IPL-core tests (tiny CLIP encoder, tiny generator); not a test module."""

import torch
from tiny_clip import build_clip, build_tokenizer
from transformers import CLIPImageProcessor

from ipl_diffusion.clip_text import CLIPPromptEncoder

LATENT_DIM = 16
IMAGE_SIZE = 32


def build_image_processor(size=IMAGE_SIZE, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711)):
    return CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=list(mean),
        image_std=list(std),
    )


def build_encoder(extra_tokens=(), context_length=64, **kwargs):
    """A ``CLIPPromptEncoder`` on a tiny random CLIP whose context is long enough for the 80
    ImageNet templates (the tiny tokenizer splits unknown words into characters)."""
    tokenizer = build_tokenizer(extra_tokens=extra_tokens)
    tokenizer.model_max_length = context_length
    model, tokenizer = build_clip(tokenizer, max_position_embeddings=context_length, image_size=IMAGE_SIZE)
    return CLIPPromptEncoder(model, tokenizer, build_image_processor(), **kwargs)


class TinyGenerator(torch.nn.Module):
    """A frozen toy G_s: latent (B, 16) -> image (B, 3, 16, 16) in [-1, 1]; counts its calls."""

    def __init__(self, latent_dim=LATENT_DIM, size=16, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.size = size
        self.weight = torch.nn.Parameter(torch.randn(latent_dim, 3 * size * size, generator=g) / latent_dim**0.5)
        self.calls = 0
        self.requires_grad_(False)

    def forward(self, latents):
        self.calls += 1
        return torch.tanh(latents @ self.weight).view(-1, 3, self.size, self.size)


def latent_pool(n=48, latent_dim=LATENT_DIM, seed=0):
    return torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed))
