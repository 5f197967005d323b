#!/usr/bin/env python
"""Assemble the shipped Shapes ``IPLPipeline`` (``ipl_diffusion/shapes_models/diffae-ipl``).

Takes the trained Shapes DiffAE (a ``DiffAEPipeline`` folder: semantic encoder, UNet,
scheduler, latent net) and the Shapes CLIP (``CLIPModel`` + ``CLIPTokenizer`` +
``CLIPImageProcessor`` folder) and saves them as one *source* ``IPLPipeline`` -- the default
model of ``ipl adapt`` -- with ``IPLPipeline.from_components``. No weights are changed.

    python examples/assemble_shapes_ipl.py            # shipped parts -> shipped diffae-ipl/
"""

import argparse
import shutil
from pathlib import Path

from ipl_diffusion.cli.adapt import SHAPES_ADAPT_DEFAULTS  # CPU-sized settings, recorded in the folder
from ipl_diffusion.shapes import SOURCE_STYLE, default_model_path, known_domains
from pipelines.pipeline_ipl import IPLPipeline


def assemble(parts, clip, output):
    pipe = IPLPipeline.from_components(
        str(parts),
        str(clip),
        source_label=SOURCE_STYLE,
        base_model="ipl-diffusion/shapes-diffae (shipped)",
        adapt_defaults=SHAPES_ADAPT_DEFAULTS,
    )
    # The Shapes CLIP knows only the Shapes styles; adapt() refuses any other label.
    pipe.register_to_config(known_domains=list(known_domains()))
    output = Path(output)
    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    IPLPipeline.from_pretrained(tmp)  # check it loads through the real path before replacing
    shutil.rmtree(output, ignore_errors=True)
    tmp.rename(output)
    return output


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=None, help="DiffAEPipeline folder (default: the shipped Shapes parts)")
    parser.add_argument("--clip", default=None, help="CLIP folder (default: the shipped Shapes CLIP)")
    parser.add_argument("--output", default=None, help="output folder (default: shapes_models/diffae-ipl)")
    args = parser.parse_args(argv)
    parts = args.parts or default_model_path("diffae-parts")
    clip = args.clip or default_model_path("clip")
    output = args.output or Path(parts).parent / "diffae-ipl"
    print(f"wrote {assemble(parts, clip, output)}")


if __name__ == "__main__":
    main()
