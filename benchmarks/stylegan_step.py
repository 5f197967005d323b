#!/usr/bin/env python
"""GAN-IPL Stage 2 step time and memory: NADA's layer freezing vs training the whole generator.

Runs the real ``GANIPLTrainer.train_step`` on a randomly initialised StyleGAN2 (time and memory
do not depend on the weights) and a random CLIP with ViT-B/32's shapes, and prints each layer
policy as a ratio to the full-trainable-generator run measured in the same process:

* ``all``            every parameter trains (NADA ``phase="all"``) -- the baseline;
* ``convs``          NADA's default fixed set: constant input, conv1, every conv (no mapping, no ToRGB);
* ``auto-k``         IPL's default: adaptive layer selection every iteration, k = int(2 n_latent / 3),
                     ``auto_layer_batch`` W+ probes (8 upstream) -- pays an extra forward/backward;
* ``auto-k-chunk2``  the same 8 probes rendered 2 at a time (``auto_layer_chunk=2``): the same
                     selection, a smaller peak;
* ``auto-k-batch2``  only 2 probes.

Memory: on a GPU, ``torch.cuda.max_memory_allocated`` over one step. On a CPU PyTorch keeps no
allocator statistics, so we count what differs between the policies: the peak bytes of tensors
saved for backward alive at once (``torch.autograd.graph.saved_tensors_hooks``) plus the bytes
of gradients and Adam state of the parameters that trained in that step.

    python benchmarks/stylegan_step.py                 # 256 px config-f on CPU (minutes)
    python benchmarks/stylegan_step.py --tiny          # smoke test, seconds
    python benchmarks/stylegan_step.py --size 1024 --device cuda   # the paper's FFHQ config
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel  # noqa: E402

from ipl_diffusion.adaptation.stylegan2 import GANIPLTrainer  # noqa: E402
from ipl_diffusion.configs import GANStage2Config  # noqa: E402
from ipl_diffusion.clip_image import CLIPImageEncoder  # noqa: E402
from ipl_diffusion.models.stylegan2 import StyleGAN2Generator  # noqa: E402

POLICIES = {
    "all": dict(phase="all", auto_layer_iters=0),
    "convs": dict(phase=None, auto_layer_iters=0),
    "auto-k": dict(auto_layer_iters=1, auto_layer_batch=8),
    "auto-k-chunk2": dict(auto_layer_iters=1, auto_layer_batch=8, auto_layer_chunk=2),
    "auto-k-batch2": dict(auto_layer_iters=1, auto_layer_batch=2),
}


class _Packed:
    """A tensor saved for backward; gives its bytes back to the tracker when the graph frees it."""

    __slots__ = ("tensor", "size", "tracker")

    def __init__(self, tensor, tracker):
        self.tensor, self.size, self.tracker = tensor, tensor.numel() * tensor.element_size(), tracker
        tracker.live += self.size
        tracker.peak = max(tracker.peak, tracker.live)

    def __del__(self):
        self.tracker.live -= self.size


class SavedTensorPeak:
    """Peak bytes of tensors saved for backward that are alive at the same time (the
    selection probe's graph is freed before the main pass, so it does not add up)."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, tensor):
        return _Packed(tensor, self)

    @staticmethod
    def unpack(packed):
        return packed.tensor


def clip_model(tiny: bool, device):
    if tiny:
        config = CLIPConfig(
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100, max_position_embeddings=16),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8),
            projection_dim=32,
        )
    else:
        config = CLIPConfig()  # ViT-B/32 shapes (224 px, patch 32, width 768; 512-d projection)
    return CLIPModel(config).eval().to(device)


def run_policy(name, generator, image_features, dim, args, device):
    torch.manual_seed(0)
    text = torch.randn(2, dim, device=device)

    def prompt_features(w):
        return text[:1].expand(w.shape[0], -1), text[1:].expand(w.shape[0], -1)

    config = GANStage2Config(iterations=args.steps + 1, batch_size=args.batch_size, seed=0, **POLICIES[name])
    trainer = GANIPLTrainer(generator, prompt_features, image_features, text[1], config, device=device)
    trainer.train_step()  # warm-up (allocations, oneDNN/cuDNN autotuning)
    tracker = SavedTensorPeak()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, trained = [], 0
    for _ in range(args.steps):
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(tracker.pack, SavedTensorPeak.unpack):
            out = trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        trained = max(trained, sum(p.numel() for n, p in trainer.generator.named_parameters() if any(n == m or n.startswith(m + ".") for m in out["layers"])))
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated()
    else:
        memory = tracker.peak + trained * 4 * 3  # grad + Adam exp_avg + exp_avg_sq, fp32
    del trainer
    return sorted(times)[len(times) // 2], memory, trained


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--channel-multiplier", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per policy (median reported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true", help="32 px, narrow generator, tiny CLIP (smoke test)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    if args.tiny:
        generator = StyleGAN2Generator(size=32, style_dim=32, n_mlp=2, channel_max=32)
    else:
        generator = StyleGAN2Generator(size=args.size, channel_multiplier=args.channel_multiplier)
    generator = generator.to(device).eval()
    clip = clip_model(args.tiny, device)
    image_features = CLIPImageEncoder(clip, CLIPImageProcessor()).encode_images
    dim = clip.config.projection_dim
    params = sum(p.numel() for p in generator.parameters())
    print(f"StyleGAN2 {generator.size}px, {params / 1e6:.1f} M parameters, n_latent {generator.n_latent}, batch {args.batch_size}, device {device}")
    if "all" not in args.policies:
        args.policies = ["all"] + args.policies

    results = {}
    for name in args.policies:
        results[name] = run_policy(name, generator, image_features, dim, args, device)
        t, m, n = results[name]
        print(f"  measured {name:14s} {t:8.3f} s/step  {m / 2**20:9.1f} MiB  {n / 1e6:6.2f} M trained params", flush=True)

    base_t, base_m, _ = results["all"]
    kind = "cuda max_memory_allocated" if device.type == "cuda" else "saved-for-backward peak + grads + Adam state"
    print(f"\nratios to the full-trainable generator ('all'); memory = {kind}")
    print(f"{'policy':16s}{'time':>8s}{'memory':>9s}{'trained':>10s}")
    for name, (t, m, n) in results.items():
        print(f"{name:16s}{t / base_t:8.2f}{m / base_m:9.2f}{n / results['all'][2]:10.2f}")


if __name__ == "__main__":
    main()
