"""Stage 1 with cached ``E_I(G_s(w))`` vs re-generating every step (the released IPL code's loop).

Both variants run ``ipl_diffusion.prompt_learning.learn_prompts`` on the same tiny random CLIP,
the same small convolutional generator and the same latent pool, in one process; they compute
the same losses (see tests/test_prompt_learning.py), so only the time differs. Prints the
per-iteration times, their ratio, the one-off cost of caching the pool and the break-even
number of iterations.

    python benchmarks/stage1_cache.py [--iterations 20] [--batch-size 16] [--pool-size 128] [--image-size 64]
"""

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from tiny_clip import build_clip, build_tokenizer  # noqa: E402  (tiny random CLIP built in code)
from transformers import CLIPImageProcessor  # noqa: E402

from ipl_diffusion.clip_text import CLIPPromptEncoder  # noqa: E402
from ipl_diffusion.prompt_learning import encode_latent_pool, learn_prompts  # noqa: E402


class ConvGenerator(nn.Module):
    """A small frozen stand-in for G_s: latent -> 4x4 feature map -> upsampling convs -> image in [-1, 1]."""

    def __init__(self, latent_dim, image_size, channels=64):
        super().__init__()
        self.fc = nn.Linear(latent_dim, channels * 16)
        blocks, size = [], 4
        while size < image_size:
            blocks += [nn.Upsample(scale_factor=2), nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.2),
                       nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.2)]
            size *= 2
        self.blocks = nn.Sequential(*blocks)
        self.to_rgb = nn.Conv2d(channels, 3, 1)
        self.channels = channels
        self.requires_grad_(False).eval()

    def forward(self, w):
        x = self.fc(w).view(-1, self.channels, 4, 4)
        return torch.tanh(self.to_rgb(self.blocks(x)))


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pool-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--latent-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = build_tokenizer()
    tokenizer.model_max_length = 64
    model, tokenizer = build_clip(tokenizer, image_size=32, max_position_embeddings=64)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    encoder = CLIPPromptEncoder(model, tokenizer, processor)
    torch.manual_seed(0)
    generator = ConvGenerator(args.latent_dim, args.image_size)
    latents = torch.randn(args.pool_size, args.latent_dim, generator=torch.Generator().manual_seed(0))
    common = dict(stage1_batch_size=args.batch_size, progress=False, label_templates="single")

    # Warm-up (allocator, kernels) outside the measurements.
    learn_prompts(encoder, latents, "photo", "wall painting", generate=generator, stage1_iterations=1,
                  cache_image_features=False, **common)

    cache_time, features = timed(lambda: encode_latent_pool(encoder, latents, generator, batch_size=32))
    cached_time, _ = timed(lambda: learn_prompts(encoder, latents, "photo", "wall painting", image_features=features,
                                                 stage1_iterations=args.iterations, **common))
    fresh_time, _ = timed(lambda: learn_prompts(encoder, latents, "photo", "wall painting", generate=generator,
                                                stage1_iterations=args.iterations, cache_image_features=False, **common))

    per_cached = cached_time / args.iterations
    per_fresh = fresh_time / args.iterations
    saved = per_fresh - per_cached
    print(f"Stage 1, {args.iterations} iterations, batch {args.batch_size}, pool {args.pool_size}, "
          f"{args.image_size}px generator, {torch.get_num_threads()} threads")
    print(f"  re-generate every step (released code): {1000 * per_fresh:8.1f} ms/iteration")
    print(f"  cached E_I(G_s(w)) (ours):              {1000 * per_cached:8.1f} ms/iteration")
    print(f"  one-off caching of the pool:            {1000 * cache_time:8.1f} ms")
    print(f"per-iteration time ratio cached/re-generate: {per_cached / per_fresh:.3f} "
          f"(speed-up x{per_fresh / per_cached:.2f})")
    if saved > 0:
        print(f"caching pays for itself after {cache_time / saved:.1f} iterations (the paper runs 300)")


if __name__ == "__main__":
    main()
