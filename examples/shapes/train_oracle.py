#!/usr/bin/env python
"""Train the Shapes oracle: a CNN that reads style, shape, colour, position and size back.

The oracle is an *evaluation* instrument (benchmarks/shapes_collapse.py): it is trained on all
styles with the renderer's ground-truth factors and never touches an adaptation run. To judge
adapted images, which are never perfectly clean renders, training images get mild corruptions
(Gaussian noise, blur, small brightness/contrast changes) so the oracle reads the factors from
content, not from pixel-exact rendering artefacts.

Example (what the shipped oracle was trained with, see its training_record.json)::

    python examples/shapes/train_oracle.py --max_minutes 15 \
        --output_dir ipl_diffusion/shapes_models/oracle --work_dir runs/shapes_oracle
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ipl_diffusion.checkpointing import ResumableRun
from ipl_diffusion.outputs import output_lock
from ipl_diffusion.shapes.oracle import ShapesOracle, oracle_loss
from ipl_diffusion.shapes.renderer import STYLES, ShapesRenderer, sample_factors


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="ipl_diffusion/shapes_models/oracle")
    p.add_argument("--work_dir", default="runs/shapes_oracle")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--max_steps", type=int, default=2000)
    p.add_argument("--max_minutes", type=float, default=None)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--checkpointing_steps", type=int, default=200)
    p.add_argument("--eval_images", type=int, default=2000)
    p.add_argument("--resume_from_checkpoint", default="latest")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def corrupt(images, generator):
    """Mild random corruptions, per image: noise sigma in [0, 0.12], blur (1 in 3), affine colour change."""
    b = images.shape[0]
    sigma = 0.12 * torch.rand(b, 1, 1, 1, generator=generator)
    images = images + sigma * torch.randn(images.shape, generator=generator)
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    use_blur = (torch.rand(b, 1, 1, 1, generator=generator) < 1 / 3).float()
    images = use_blur * (0.5 * images + 0.5 * blurred) + (1 - use_blur) * images
    gain = 1 + 0.15 * (torch.rand(b, 1, 1, 1, generator=generator) - 0.5)
    bias = 0.1 * (torch.rand(b, 1, 1, 1, generator=generator) - 0.5)
    return (images * gain + bias).clamp(-1, 1)


@torch.no_grad()
def evaluate(oracle, renderer, n_images, seed):
    """Accuracy per class factor and mean absolute position / size error in pixels, on fresh clean images."""
    oracle.eval()
    images, factors = renderer.sample(n_images, seed=seed)
    pred = oracle.predict(images)
    side = renderer.resolution
    result = {k: (pred[k] == getattr(factors, k)).float().mean().item() for k in ("style", "shape", "color")}
    result["position_mae_px"] = (pred["position"] - factors.position).abs().mean().item() * side
    result["size_mae_px"] = (pred["size"] - factors.size).abs().mean().item() * side
    result["shape_per_style"] = {
        name: (pred["shape"][factors.style == s] == factors.shape[factors.style == s]).float().mean().item()
        for s, name in enumerate(STYLES)
    }
    oracle.train()
    return result


def main(argv=None):
    args = parse_args(argv)
    # One run per --work_dir: two would rotate each other's checkpoints away.
    with output_lock(args.work_dir, "--work_dir"):
        return train(args)


def train(args):
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    renderer = ShapesRenderer(args.resolution)
    oracle = ShapesOracle(resolution=args.resolution)
    optimizer = torch.optim.AdamW(oracle.parameters(), lr=args.learning_rate, weight_decay=1e-4)
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    config = dict(vars(args))
    run = ResumableRun(work, {"oracle": oracle}, {"adamw": optimizer}, {"data": data_gen}, config, args.resume_from_checkpoint)
    oracle.train()
    while run.running(args.max_steps, args.max_minutes):
        step = run.step
        factors = sample_factors(args.batch_size, generator=data_gen)
        images = corrupt(renderer.render(factors, generator=data_gen), data_gen)
        lr = args.learning_rate * 0.5 * (1 + math.cos(math.pi * step / args.max_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = oracle_loss(oracle(images), factors)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite oracle loss at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step = run.step = step + 1
        if step % 50 == 0:
            print(dict(step=step, loss=round(loss.item(), 4), lr=lr, minutes=round(run.minutes(), 2)), flush=True)
        if step % args.checkpointing_steps == 0:
            run.save()
    elapsed, step = run.save(), run.step
    metrics = evaluate(oracle, renderer, args.eval_images, seed=123_456_789)
    print("final evaluation on fresh images:", metrics)
    out = Path(args.output_dir)
    oracle.eval()
    oracle.save_pretrained(out)
    record = dict(
        task="shapes_oracle",
        command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        config=config,
        parameters=sum(p.numel() for p in oracle.parameters()),
        steps=step,
        wall_seconds=elapsed,
        torch_threads=torch.get_num_threads(),
        evaluation=metrics,
    )
    (out / "training_record.json").write_text(json.dumps(record, indent=1))
    (work / "training_record.json").write_text(json.dumps(record, indent=1))
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
