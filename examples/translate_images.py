#!/usr/bin/env python
"""Translate your own images with an adapted Diff-IPL pipeline.

Every image is inverted with the *source* UNet (deterministic DDIM, to the ``t0`` the
pipeline was adapted with) and decoded with the *adapted* UNet, so identity and layout
come from your image and the style from the target domain.

    python examples/translate_images.py --model ipl-sketch/pipeline --input photos/ --output sketches/

Images of any size and mode (RGBA, grayscale, 16-bit) are converted, resized and centre-cropped
to the model's resolution by ``ipl_diffusion.images.load_image``. Files that cannot be read are
skipped with a message. The same thing from the command line: ``ipl translate``.
"""

from pathlib import Path

import torch

from ipl_diffusion.cli import run_script
from ipl_diffusion.cli.parser import IplArgumentParser
from ipl_diffusion.images import list_image_files, load_image, to_pil
from ipl_diffusion.outputs import atomic_save_image, check_writable, output_lock, refuse_earlier_result
from ipl_diffusion.pipelines.pipeline_ipl import IPLPipeline


def main(argv=None):
    parser = IplArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="adapted pipeline folder or Hub id")
    parser.add_argument("--input", required=True, help="folder of images")
    parser.add_argument("--output", required=True, help="folder for the results (must differ from --input)")
    parser.add_argument("--t0", type=int, default=None, help="edit strength (default: the adaptation's)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM decoding steps (default: the adaptation's)")
    parser.add_argument("--overwrite", action="store_true", help="replace same-name files already in --output")
    args = parser.parse_args(argv)

    # Everything a user can get wrong is refused before the model loads, and nothing is written.
    output = Path(args.output)
    if output.resolve() == Path(args.input).resolve():
        parser.error("--output must not be the --input folder")
    check_writable(output, "--output")
    paths = list_image_files(args.input, option="--input")
    if not args.overwrite:
        refuse_earlier_result(output, [f"{path.stem}.png" for path in paths], "--output")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = IPLPipeline.from_pretrained(args.model).to(device)
    with output_lock(output, "--output"):  # as `ipl translate`: one run per folder
        translate(pipe, paths, output, args)


def translate(pipe, paths, output, args):
    for path in paths:
        try:
            image = load_image(path, pipe.image_size)
        except ValueError as err:
            print(f"skipping {path.name}: {err}")
            continue
        result = pipe(image[None], t0=args.t0, num_inference_steps=args.steps, output_type="pt").images
        translated = to_pil(result * 2 - 1)[0]  # "pt" output is in [0, 1]
        atomic_save_image(translated, output / f"{path.stem}.png")
        print(f"{path.name} -> {output / (path.stem + '.png')}")


if __name__ == "__main__":
    run_script(main)  # a UserError: one line, exit status 2
