"""`ipl sample`: draw unconditional samples from a (source or adapted) pipeline.

DiffAE: `z_sem` from the latent DDIM network and `x_T` from Gaussian noise, decoded
with the adapted UNet (`--source` decodes with the source UNet, for comparison).
StyleGAN2: `z` from Gaussian noise through the (adapted) generator. Images are written as
`sample_0000.png`, ... plus `samples_grid.png`; the same `--seed` gives the same images.
Files already in `--output` under those names are refused before the model loads, unless
`--overwrite`.
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
    parser.add_argument("--overwrite", action="store_true", help="replace samples already in --output")
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


GRID_NAME = "samples_grid.png"


def run(args) -> int:
    from ipl_diffusion.errors import UserError
    from ipl_diffusion.outputs import check_writable, output_lock, refuse_earlier_result

    if args.num_images < 1:
        raise UserError(f"--num-images must be >= 1, got {args.num_images}")
    output = Path(args.output)
    names = [f"sample_{i:04d}.png" for i in range(args.num_images)] + [GRID_NAME]
    check_writable(output, "--output")  # all before the model loads
    with output_lock(output, "--output"):
        if not args.overwrite:
            refuse_earlier_result(output, names, "--output")
        images = _sample(args)
        _write(images, output, names)
    print(f"wrote {len(images)} sample(s) and {GRID_NAME} to {output}")
    return 0


def _sample(args):
    import torch

    from ipl_diffusion.cli.adapt import detect_backend, load_pipeline

    backend = detect_backend(args.backend, args.model)
    pipe = load_pipeline(backend, args.model, args.device, clip=False)
    generator = torch.Generator().manual_seed(args.seed)
    kwargs = {"num_images": args.num_images, "generator": generator, "source": args.source, "output_type": "pil"}
    if backend == "stylegan2":
        return pipe(**kwargs).images
    if args.steps is not None:
        kwargs["num_inference_steps"] = args.steps
    return pipe.sample(**kwargs).images


def _write(images, output: Path, names):
    """Each file atomically: a crash never leaves a half-written sample."""
    from ipl_diffusion.grids import image_grid
    from ipl_diffusion.outputs import atomic_save_image

    output.mkdir(parents=True, exist_ok=True)
    for image, name in zip(images, names):
        atomic_save_image(image, output / name)
    atomic_save_image(image_grid(images, columns=8), output / names[-1])  # 8 to a row, seamless, full size
