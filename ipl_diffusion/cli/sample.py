"""`ipl sample`: draw unconditional samples from a (source or adapted) pipeline.

DiffAE: `z_sem` from the latent DDIM network and `x_T` from Gaussian noise, decoded
with the adapted UNet (`--source` decodes with the source UNet, for comparison).
StyleGAN2: `z` from Gaussian noise through the (adapted) generator. Images are written as
`sample_0000.png`, ... plus `samples_grid.png`; the same `--seed` gives the same images.
"""

import argparse
from pathlib import Path

DESCRIPTION = __doc__.split("\n\n", 1)[1]
EPILOG = """examples:
  ipl sample --model ipl-sketch/pipeline --num-images 16 --output samples
  ipl sample --num-images 8 --output shapes-photo        # the embedded Shapes source model
"""


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "sample",
        help="draw unconditional samples from a pipeline",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="pipeline folder or Hub id (default: the embedded Shapes model)")
    parser.add_argument("--output", required=True, help="folder for the samples (created)")
    parser.add_argument("--num-images", type=int, default=8, help="number of samples (default: 8)")
    parser.add_argument(
        "--backend",
        choices=("diffae", "stylegan2"),
        default=None,
        help="generator family (default: read from the --model folder; diffae for the embedded default)",
    )
    parser.add_argument("--source", action="store_true", help="sample the source (un-adapted) generator")
    parser.add_argument("--steps", type=int, default=None, help="DiffAE: DDIM decoding steps")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    return parser


def grid_of(images, columns=8):
    from PIL import Image

    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % columns) * width, (i // columns) * height))
    return grid


def run(args) -> int:
    import torch

    from ipl_diffusion.cli.adapt import detect_backend, load_pipeline

    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    backend = detect_backend(args.backend, args.model)
    pipe = load_pipeline(backend, args.model, args.device)
    generator = torch.Generator().manual_seed(args.seed)
    kwargs = {"num_images": args.num_images, "generator": generator, "source": args.source, "output_type": "pil"}
    if backend == "stylegan2":
        images = pipe(**kwargs).images
    else:
        if args.steps is not None:
            kwargs["num_inference_steps"] = args.steps
        images = pipe.sample(**kwargs).images
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(output / f"sample_{i:04d}.png")
    grid_of(images).save(output / "samples_grid.png")
    print(f"wrote {len(images)} sample(s) and samples_grid.png to {output}")
    return 0
