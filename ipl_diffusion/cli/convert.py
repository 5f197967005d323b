"""``ipl convert``: turn an upstream checkpoint into a folder our pipelines load.

``ipl convert diffae`` reads a DiffAE Lightning checkpoint (``ffhq256_autoenc/last.ckpt``,
or ``ffhq256_autoenc_latent/last.ckpt`` which adds the latent DDIM for unconditional
sampling), takes the EMA weights and writes a ``DiffAEPipeline`` folder
(``DiffAEPipeline.from_pretrained(DIR)``). ``ipl convert stylegan2`` reads a rosinality
StyleGAN2 ``.pt`` and writes a ``StyleGAN2Generator`` folder. Checkpoints are read with
``torch.load(weights_only=True)`` (no pickled code runs); everything written is safetensors + JSON.
"""

import argparse

DESCRIPTION = __doc__.split("\n\n", 1)[1]
EPILOG = """examples:
  ipl convert diffae --checkpoint checkpoints/ffhq256_autoenc_latent/last.ckpt --output ffhq256-diffae
  ipl convert stylegan2 --checkpoint stylegan2-ffhq-config-f.pt --output ffhq-stylegan2
"""


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "convert",
        help="convert an upstream DiffAE / StyleGAN2 checkpoint to our format",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    families = parser.add_subparsers(dest="family", metavar="FAMILY")
    families.required = True

    diffae = families.add_parser(
        "diffae",
        help="DiffAE Lightning last.ckpt -> DiffAEPipeline folder",
        description="Convert an upstream DiffAE (phizaz/diffae) Lightning checkpoint into a DiffAEPipeline folder.",
    )
    diffae.add_argument("--checkpoint", required=True, help="upstream last.ckpt (or a .safetensors of its state_dict)")
    diffae.add_argument("--output", required=True, help="folder to write (must be empty or absent)")
    diffae.add_argument(
        "--weights",
        choices=("ema", "raw"),
        default="ema",
        help="ema_model.* (default, what upstream samples with) or the raw model.* weights",
    )
    diffae.add_argument(
        "--image-size", type=int, default=None, help="training resolution if the checkpoint lacks hyper_parameters (256)"
    )
    diffae.add_argument("--overwrite", action="store_true", help="write into a non-empty --output folder")

    stylegan2 = families.add_parser(
        "stylegan2",
        help="rosinality StyleGAN2 .pt -> StyleGAN2Generator folder",
        description="Convert a rosinality stylegan2-pytorch checkpoint (g_ema) into a StyleGAN2Generator folder.",
    )
    stylegan2.add_argument("--checkpoint", required=True, help="rosinality .pt file")
    stylegan2.add_argument("--output", required=True, help="folder to write (must be empty or absent)")
    stylegan2.add_argument("--overwrite", action="store_true", help="write into a non-empty --output folder")
    return parser


def run(args) -> int:
    if args.family == "diffae":
        from ipl_diffusion.conversion.diffae import convert_diffae_checkpoint

        pipe = convert_diffae_checkpoint(
            args.checkpoint,
            args.output,
            prefix="ema_model." if args.weights == "ema" else "model.",
            image_size=args.image_size,
            overwrite=args.overwrite,
        )
        parts = ["semantic_encoder", "unet"] + (["latent_net"] if pipe.latent_net is not None else [])
        print(
            f"wrote DiffAEPipeline ({', '.join(parts)}; {pipe.image_size}x{pipe.image_size}) to {args.output}; "
            f"load it with DiffAEPipeline.from_pretrained({str(args.output)!r})"
        )
        return 0
    from ipl_diffusion.conversion.stylegan2 import convert_stylegan2_checkpoint

    output = convert_stylegan2_checkpoint(args.checkpoint, args.output, overwrite=args.overwrite)
    print(f"wrote StyleGAN2Generator to {output}")
    return 0
