#!/usr/bin/env python
"""Stage 2 (Diff-IPL) step time and activation memory: full chain vs per-step vs checkpointed.

Runs the real ``DiffAEStage2Trainer.step_on`` on randomly initialised DiffAE models (timing and
memory do not depend on the weights) in one process and prints every mode as a ratio to the
full-chain baseline measured in the same run:

* ``full_chain``        back-propagation through all ``--train-steps`` UNet calls (DiffusionCLIP's
                        original fine-tuning);
* ``per_step``          DiffusionCLIP's GPU-efficient mode (loss and update after every step);
* ``full_chain+gc``     full chain with gradient checkpointing of the UNet blocks.

Memory: on a GPU, ``torch.cuda.max_memory_allocated`` during one step (weights, optimizer state
and activations). On a CPU PyTorch keeps no allocator statistics, so we count what matters for
this comparison -- the peak bytes of tensors saved for backward that are alive at once (via
``torch.autograd.graph.saved_tensors_hooks``). That count does not see the transient
recomputation of one checkpointed block during backward, so it slightly flatters ``+gc``.

    python benchmarks/stage2_memory.py            # CPU-sized config, about a minute on 2 cores
    python benchmarks/stage2_memory.py --tiny     # smoke test, seconds
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from diffusers import DDIMScheduler  # noqa: E402
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel  # noqa: E402

from ipl_diffusion.adaptation.diffae_trainer import DiffAEStage2Trainer  # noqa: E402
from ipl_diffusion.clip_image import clip_image_features  # noqa: E402
from ipl_diffusion.adaptation.memory import SavedTensorMeter  # noqa: E402
from ipl_diffusion.configs import DiffAEStage2Config  # noqa: E402
from ipl_diffusion.adaptation.distributed import make_accelerator  # noqa: E402
from ipl_diffusion.models import DiffAEUNetModel  # noqa: E402

CONFIGS = {
    # name: (image size, UNet kwargs)
    "tiny": (16, dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                      embed_channels=32, z_sem_channels=32)),
    "cpu": (64, dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(16,),
                     embed_channels=128, z_sem_channels=64)),
    "ffhq256": (256, dict()),  # upstream ffhq256_autoenc (138 M parameters)
}


def small_clip(image_size=32, width=32, layers=2, patch_size=8):
    """A random CLIP image tower (ViT-B/32 is ``small_clip(224, 768, 12, 32)``)."""
    config = CLIPConfig(
        text_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100, max_position_embeddings=16),
        vision_config=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                           num_attention_heads=max(2, width // 64), image_size=image_size, patch_size=patch_size),
        projection_dim=width,
    )
    return CLIPModel(config).eval()


def build_trainer(config_name, mode, gradient_checkpointing, device, batch_size=2, num_images=4, train_steps=6,
                  mixed_precision="no", clip=None, accelerator=None, attention=None, low_memory=False):
    """A ready ``DiffAEStage2Trainer`` on random models and random cached inversions."""
    size, unet_kwargs = CONFIGS[config_name]
    torch.manual_seed(0)
    unet = DiffAEUNetModel(sample_size=size, **unet_kwargs).to(device).eval()
    torch.nn.init.normal_(unet.conv_out.weight, std=0.02)  # zero-initialised upstream; give eps some signal
    if attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    z_dim = unet.config.z_sem_channels
    clip = clip if clip is not None else small_clip().to(device)
    features = clip_image_features(clip, CLIPImageProcessor())
    d = clip.config.projection_dim
    cache = {
        "x0": torch.rand(num_images, 3, size, size) * 2 - 1,
        "z_sem": torch.randn(num_images, z_dim),
        "x_t0": torch.randn(num_images, 3, size, size),
    }
    cfg = DiffAEStage2Config(t0=400, num_train_steps=train_steps, iterations=1, batch_size=batch_size, gradient_mode=mode,
                       gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision,
                       learning_rate=1e-5, low_memory=low_memory)
    scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=True, set_alpha_to_one=True)
    return DiffAEStage2Trainer(unet, scheduler, cache, torch.randn(num_images, d), torch.randn(num_images, d), features, cfg,
                         accelerator=accelerator or make_accelerator(mixed_precision, device))


def measure(trainer, repeats, warmup=1):
    """``(median seconds per iteration, peak bytes, memory kind)``.

    Timed iterations run without hooks; on a CPU one more iteration runs under
    :class:`SavedTensorMeter` (the hooks slow checkpointed recomputation down, so they must
    not be timed).
    """
    index = list(range(trainer.config.batch_size))
    for _ in range(warmup):
        trainer.step_on(index)
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        trainer.step_on(index)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    times.sort()
    if cuda:
        return times[len(times) // 2], torch.cuda.max_memory_allocated(), "allocated"
    with SavedTensorMeter() as meter:
        trainer.step_on(index)
    return times[len(times) // 2], meter.peak, "saved activations"


# (label, gradient_mode, gradient checkpointing, the low_memory preset of DiffAEStage2Config)
MODES = (("full_chain", "full_chain", False, False), ("per_step", "per_step", False, False),
         ("full_chain+gc", "full_chain", True, False), ("low_memory", "full_chain", False, True))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes")
    parser.add_argument("--config", choices=sorted(CONFIGS), default=None)
    parser.add_argument("--train-steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    name = args.config or ("tiny" if args.tiny else ("ffhq256" if args.device.startswith("cuda") else "cpu"))
    device = torch.device(args.device)
    accelerator = make_accelerator("no", device)
    rows = []
    for label, mode, gc, low_memory in MODES:
        # The preset's bf16 (on a GPU) is not applied here: one process keeps one Accelerator.
        trainer = build_trainer(name, mode, gc, device, batch_size=args.batch_size, train_steps=args.train_steps,
                                accelerator=accelerator, low_memory=low_memory)
        seconds, peak, kind = measure(trainer, args.repeats)
        rows.append((label, seconds, peak))
        del trainer
    base_t, base_m = rows[0][1], rows[0][2]
    print(f"Stage 2 on DiffAE config '{name}', {args.train_steps} DDIM training steps, batch {args.batch_size}, "
          f"device {device}; memory = peak {kind}")
    print(f"{'mode':<16}{'s/iter':>10}{'time x':>9}{'memory MiB':>13}{'memory x':>10}")
    for label, seconds, peak in rows:
        print(f"{label:<16}{seconds:>10.3f}{seconds / base_t:>9.2f}{peak / 2**20:>13.1f}{peak / base_m:>10.2f}")
    print("(per_step makes num_train_steps optimizer updates per iteration; full_chain one)")


if __name__ == "__main__":
    main()
