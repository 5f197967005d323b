#!/usr/bin/env python
"""Train a Shapes StyleGAN2 (the GAN-IPL source generator) on the "photo" style.

Uses the project's own rosinality-layout :class:`~ipl_diffusion.models.StyleGAN2Generator` and
:class:`~ipl_diffusion.models.stylegan2.StyleGAN2Discriminator` with a small config (size 32,
``style_dim`` 128, ``n_mlp`` 4, ``channel_max`` 64). The objective is StyleGAN2's (Karras et al.
2020, as trained by rosinality's ``train.py``): non-saturating logistic loss, lazy R1 penalty on
real images every ``--d_reg_every`` steps (with the Adam hyper-parameters rescaled for lazy
regularisation, StyleGAN2 Appendix B), style mixing, and an EMA generator ``g_ema`` (half-life
of 10k images). Path-length regularisation is left out: it serves the smoothness of W for
projection at high resolution and costs a second generator pass; the Shapes generator is only
a source model for adaptation.

Images are rendered on the fly (``photo`` only). At the end ``g_ema`` is written with
``save_pretrained`` (safetensors) plus ``training_record.json`` and a sample grid; when the
Shapes oracle exists its reading of 256 samples (photo fraction, shape / colour entropy) is
recorded. Checkpoints (generator, discriminator, g_ema, both optimisers, RNG) go to
``--work_dir``; ``--resume_from_checkpoint latest`` continues a killed run. Minutes on a GPU;
on a CPU expect hours for clean samples.

Example (the shipped model)::

    python examples/shapes/train_stylegan2.py --max_minutes 70
    python examples/assemble_shapes_ipl.py --backend stylegan2   # + Shapes CLIP -> shapes_models/stylegan2
"""

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ipl_diffusion.checkpointing import load_checkpoint, resolve_checkpoint, save_checkpoint
from ipl_diffusion.models.stylegan2 import StyleGAN2Discriminator, StyleGAN2Generator
from ipl_diffusion.shapes.renderer import COLORS, SHAPES, SOURCE_STYLE, STYLES, ShapesRenderer, sample_factors


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="runs/shapes_stylegan2_out", help="trained g_ema folder (then examples/assemble_shapes_ipl.py --backend stylegan2)")
    p.add_argument("--work_dir", default="runs/shapes_stylegan2")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--style_dim", type=int, default=128)
    p.add_argument("--n_mlp", type=int, default=4)
    p.add_argument("--channel_max", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_steps", type=int, default=20000)
    p.add_argument("--max_minutes", type=float, default=None)
    p.add_argument("--learning_rate", type=float, default=0.002)
    p.add_argument("--r1", type=float, default=0.05, help="R1 weight gamma (small images need a small gamma)")
    p.add_argument("--d_reg_every", type=int, default=16)
    p.add_argument("--mixing", type=float, default=0.9, help="style-mixing probability")
    p.add_argument("--ema_kimg", type=float, default=10.0, help="EMA half-life in thousands of images")
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--oracle", default="ipl_diffusion/shapes_models/oracle")
    p.add_argument("--resume_from_checkpoint", default="latest", help="'latest', a checkpoint folder, or 'none'")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def mixed_latents(batch, style_dim, prob, generator):
    """One z per image, or (with probability ``prob``) two for style mixing."""
    if torch.rand((), generator=generator) < prob:
        return [torch.randn(batch, style_dim, generator=generator) for _ in range(2)]
    return [torch.randn(batch, style_dim, generator=generator)]


@torch.no_grad()
def accumulate(ema, model, decay):
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def d_r1_penalty(discriminator, real):
    real = real.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(discriminator(real).sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


@torch.no_grad()
def oracle_report(g_ema, oracle_dir, n=256, seed=123):
    from ipl_diffusion.shapes.oracle import ShapesOracle

    oracle = ShapesOracle.from_pretrained(oracle_dir).eval()
    g = torch.Generator().manual_seed(seed)
    images = g_ema([torch.randn(n, g_ema.config.style_dim, generator=g)], randomize_noise=False)[0].clamp(-1, 1)
    pred = oracle.predict(images)

    def entropy(labels, k):
        p = torch.bincount(labels, minlength=k).float() / labels.numel()
        return float(-(p[p > 0] * p[p > 0].log()).sum())

    return dict(
        photo_fraction=float((pred["style"] == STYLES.index(SOURCE_STYLE)).float().mean()),
        shape_entropy=entropy(pred["shape"], len(SHAPES)),
        color_entropy=entropy(pred["color"], len(COLORS)),
        max_entropy_shape=math.log(len(SHAPES)),
        max_entropy_color=math.log(len(COLORS)),
    )


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    work, out = Path(args.work_dir), Path(args.output_dir)
    work.mkdir(parents=True, exist_ok=True)
    renderer = ShapesRenderer(args.resolution)
    generator = StyleGAN2Generator(
        size=args.resolution, style_dim=args.style_dim, n_mlp=args.n_mlp, channel_multiplier=1, channel_max=args.channel_max
    )
    discriminator = StyleGAN2Discriminator(size=args.resolution, channel_multiplier=1, channel_max=args.channel_max)
    g_ema = copy.deepcopy(generator).eval()
    for p in g_ema.parameters():
        p.requires_grad_(False)
    # Lazy regularisation: D is regularised every k steps, so its Adam sees k/(k+1) of the updates.
    ratio = args.d_reg_every / (args.d_reg_every + 1)
    g_optim = torch.optim.Adam(generator.parameters(), lr=args.learning_rate, betas=(0.0, 0.99))
    d_optim = torch.optim.Adam(discriminator.parameters(), lr=args.learning_rate * ratio, betas=(0.0, 0.99**ratio))
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    models = {"generator": generator, "discriminator": discriminator, "g_ema": g_ema}
    optimizers = {"g_optim": g_optim, "d_optim": d_optim}
    step, elapsed_before = 0, 0.0
    resume = None if args.resume_from_checkpoint == "none" else resolve_checkpoint(work, args.resume_from_checkpoint)
    if resume is not None:
        step, saved = load_checkpoint(resume, models, optimizers, {"data": data_gen})
        elapsed_before = float(saved.get("elapsed_seconds", 0.0))
        print(f"resumed from {resume} at step {step}")
    ema_decay = 0.5 ** (args.batch_size / (args.ema_kimg * 1000))
    t0 = time.time()

    def save():
        elapsed = elapsed_before + time.time() - t0
        save_checkpoint(work, step, models, optimizers, dict(vars(args), elapsed_seconds=elapsed), {"data": data_gen}, keep=2)
        return elapsed

    while step < args.max_steps:
        if args.max_minutes is not None and time.time() - t0 > args.max_minutes * 60:
            break
        real = renderer.render(sample_factors(args.batch_size, generator=data_gen, style=SOURCE_STYLE), generator=data_gen)
        # Discriminator: softplus(D(fake)) + softplus(-D(real)), the non-saturating logistic loss.
        with torch.no_grad():
            fake = generator(mixed_latents(args.batch_size, args.style_dim, args.mixing, data_gen))[0]
        d_loss = F.softplus(discriminator(fake)).mean() + F.softplus(-discriminator(real)).mean()
        d_optim.zero_grad(set_to_none=True)
        d_loss.backward()
        d_optim.step()
        if step % args.d_reg_every == 0:
            r1 = d_r1_penalty(discriminator, real)
            d_optim.zero_grad(set_to_none=True)
            # "* 0" ties D's output into the graph (rosinality does the same) so every parameter gets a grad.
            (args.r1 / 2 * r1 * args.d_reg_every + 0 * discriminator(real[:1]).sum()).backward()
            d_optim.step()
        # Generator: softplus(-D(G(z))).
        fake = generator(mixed_latents(args.batch_size, args.style_dim, args.mixing, data_gen))[0]
        g_loss = F.softplus(-discriminator(fake)).mean()
        g_optim.zero_grad(set_to_none=True)
        g_loss.backward()
        g_optim.step()
        if not (torch.isfinite(d_loss) and torch.isfinite(g_loss)):
            raise FloatingPointError(f"non-finite GAN loss at step {step}: d={d_loss.item()}, g={g_loss.item()}")
        accumulate(g_ema, generator, ema_decay)
        step += 1
        if step % 25 == 0:
            print(dict(step=step, d_loss=round(d_loss.item(), 4), g_loss=round(g_loss.item(), 4), minutes=round((time.time() - t0) / 60, 2)), flush=True)
        if step % args.checkpointing_steps == 0:
            save()
    elapsed = save()

    out.mkdir(parents=True, exist_ok=True)
    g_ema.save_pretrained(out)
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        samples = g_ema([torch.randn(32, args.style_dim, generator=g)], randomize_noise=False)[0].clamp(-1, 1)
    grid = torch.cat([torch.cat(list(samples[:16]), 2), torch.cat(list(samples[16:]), 2)], 1)
    Image.fromarray(((grid + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).resize((16 * 64, 2 * 64), Image.NEAREST).save(out / "samples.png")
    record = dict(
        task="shapes_stylegan2",
        command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        config=vars(args),
        parameters={n: sum(p.numel() for p in m.parameters()) for n, m in (("generator", generator), ("discriminator", discriminator))},
        steps=step,
        wall_seconds=elapsed,
        torch_threads=torch.get_num_threads(),
    )
    if (Path(args.oracle) / "config.json").is_file():
        record["samples_oracle"] = oracle_report(g_ema, args.oracle)
    (out / "training_record.json").write_text(json.dumps(record, indent=1))
    (work / "training_record.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
