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

import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ipl_diffusion.checkpointing import ResumableRun
from ipl_diffusion.cli import run_script
from ipl_diffusion.cli.parser import IplArgumentParser
from ipl_diffusion.cli.argtypes import nonempty_text, nonnegative_int, positive_float, positive_int
from ipl_diffusion.errors import NonFiniteLossError
from ipl_diffusion.outputs import output_lock
from ipl_diffusion.shapes.oracle import ShapesOracle, oracle_loss
from ipl_diffusion.shapes.renderer import STYLES, ShapesRenderer, sample_factors


def parse_args(argv=None):
    p = IplArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="ipl_diffusion/shapes_models/oracle")
    p.add_argument("--work_dir", default="runs/shapes_oracle")
    p.add_argument("--resolution", type=positive_int, default=32)
    p.add_argument("--batch_size", type=positive_int, default=128)
    p.add_argument("--max_steps", type=nonnegative_int, default=2000)
    p.add_argument("--max_minutes", type=positive_float, default=None)
    p.add_argument("--learning_rate", type=positive_float, default=2e-3)
    p.add_argument("--checkpointing_steps", type=positive_int, default=200)
    p.add_argument("--eval_images", type=positive_int, default=2000)
    p.add_argument("--resume_from_checkpoint", default="latest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--background_swap_prob", type=float, default=0.0,
        help="probability that a training image's object is drawn on another style's background "
        "(ShapesRenderer.render_on_background) with the object's style as the label, so that a background "
        "change alone does not change the style reading; 0 = the shipped oracle's training",
    )
    p.add_argument("--init_from", type=nonempty_text, default=None, help="an oracle folder to fine-tune instead of a fresh network")
    args = p.parse_args(argv)
    if args.init_from and not (Path(args.init_from) / "config.json").is_file():  # before any folder is made
        p.error(f"--init_from {args.init_from}: no oracle folder there (config.json missing)")
    return args


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


def training_images(renderer, factors, generator, swap_prob):
    """Renders of ``factors``; with probability ``swap_prob`` per image the object sits on the
    background of another (uniformly chosen) style. The label stays the object's style."""
    images = renderer.render(factors, generator=generator)
    if swap_prob <= 0:
        return images
    n = len(factors)
    swap = torch.rand(n, generator=generator) < swap_prob
    other = (factors.style + torch.randint(1, len(STYLES), (n,), generator=generator)) % len(STYLES)
    if swap.any():
        images[swap] = renderer.render_on_background(factors[swap], other[swap], generator)
    return images


@torch.no_grad()
def background_swap_accuracy(oracle, renderer, n_images, seed):
    """Style accuracy with every (object style, background style) pair, on fresh images:
    ``{object_style: {background_style: accuracy}}``; the diagonal is the plain render."""
    oracle.eval()
    result = {}
    for s, name in enumerate(STYLES):
        images_g = torch.Generator().manual_seed(seed + s)
        factors = sample_factors(n_images, style=name, generator=images_g)
        result[name] = {}
        for b, background in enumerate(STYLES):
            images = renderer.render_on_background(factors, background, torch.Generator().manual_seed(seed + 100 + b))
            result[name][background] = (oracle.predict(images)["style"] == s).float().mean().item()
    oracle.train()
    return result


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
    oracle = ShapesOracle.from_pretrained(args.init_from) if args.init_from else ShapesOracle(resolution=args.resolution)
    optimizer = torch.optim.AdamW(oracle.parameters(), lr=args.learning_rate, weight_decay=1e-4)
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    config = dict(vars(args))
    run = ResumableRun(work, {"oracle": oracle}, {"adamw": optimizer}, {"data": data_gen}, config, args.resume_from_checkpoint)
    oracle.train()
    while run.running(args.max_steps, args.max_minutes):
        step = run.step
        factors = sample_factors(args.batch_size, generator=data_gen)
        if args.background_swap_prob > 0:
            images = corrupt(training_images(renderer, factors, data_gen, args.background_swap_prob), data_gen)
        else:  # exactly the shipped oracle's data stream
            images = corrupt(renderer.render(factors, generator=data_gen), data_gen)
        lr = args.learning_rate * 0.5 * (1 + math.cos(math.pi * step / args.max_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = oracle_loss(oracle(images), factors)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"non-finite oracle loss at step {step}; lower --learning_rate")
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
    metrics["background_swap_style_accuracy"] = background_swap_accuracy(oracle, renderer, 200, seed=55_555)
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
    run_script(main)  # a UserError: one line, exit status 2
