#!/usr/bin/env python
"""Assemble the shipped Shapes source pipelines (``ipl_diffusion/shapes_models/``).

* ``--backend diffae``: the trained Shapes DiffAE (a ``DiffAEPipeline`` folder written by
  ``examples/shapes/train_diffae.py``: semantic encoder, UNet, scheduler, latent net) + the
  Shapes CLIP -> one *source* ``IPLPipeline`` (``shapes_models/diffae-ipl``), the default model
  of ``ipl adapt``.
* ``--backend stylegan2``: the trained Shapes ``g_ema`` (a ``StyleGAN2Generator`` folder
  written by ``examples/shapes/train_stylegan2.py``) + the Shapes CLIP -> one source
  ``StyleGANIPLPipeline`` (``shapes_models/stylegan2``), the default of
  ``ipl adapt --backend stylegan2``.

Both record the domains the Shapes CLIP knows (``adapt`` refuses other labels) and the
CPU-sized ``adapt`` defaults of :mod:`ipl_diffusion.shapes`. No weights are changed; the
training run's ``training_record.json`` and ``samples.png`` are copied alongside.

A folder written inside ``ipl_diffusion/shapes_models`` (the default ``--output``) with the
shipped CLIP (the default ``--clip``) leaves the CLIP components out
(``ipl_diffusion.shapes.CLIP_COMPONENTS``): the package stores the CLIP once, in ``clip/``, and
the pipelines' ``from_pretrained`` fills it in. Any other output folder is complete and self-contained.

    python examples/assemble_shapes_ipl.py                      # runs/shapes_diffae_out -> diffae-ipl/
    python examples/assemble_shapes_ipl.py --backend stylegan2  # runs/shapes_stylegan2_out -> stylegan2/
"""

import shutil
from pathlib import Path

from ipl_diffusion.cli import run_script
from ipl_diffusion.cli.parser import IplArgumentParser
from ipl_diffusion.shapes import (  # the SHAPES_* defaults are recorded in the folder
    CLIP_COMPONENTS,
    MODELS_DIR,
    SHAPES_ADAPT_DEFAULTS,
    SHAPES_GAN_ADAPT_DEFAULTS,
    SOURCE_STYLE,
    default_model_path,
    is_shipped,
    known_domains,
)

TRAINED = {"diffae": "runs/shapes_diffae_out", "stylegan2": "runs/shapes_stylegan2_out"}
SHIPPED = {"diffae": MODELS_DIR / "diffae-ipl", "stylegan2": MODELS_DIR / "stylegan2"}
RECORDS = ("training_record.json", "samples.png")


def build(backend, trained, clip):
    if backend == "stylegan2":
        from ipl_diffusion.pipelines.pipeline_stylegan_ipl import StyleGANIPLPipeline as cls

        defaults = SHAPES_GAN_ADAPT_DEFAULTS
    else:
        from ipl_diffusion.pipelines.pipeline_ipl import IPLPipeline as cls

        defaults = SHAPES_ADAPT_DEFAULTS
    pipe = cls.from_components(str(trained), str(clip), source_label=SOURCE_STYLE, base_model=f"ipl-diffusion/shapes-{backend} (shipped)")
    # The Shapes CLIP knows only the Shapes styles; adapt() refuses any other label.
    pipe.register_to_config(known_domains=list(known_domains()), adapt_defaults=dict(defaults))
    return cls, pipe


def assemble(backend, trained, clip, output):
    cls, pipe = build(backend, trained, clip)
    output = Path(output)
    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    # The package's one CLIP copy is clip/, and loading a shipped folder fills these in from it;
    # a folder built with another CLIP keeps its own (it would otherwise load the wrong one).
    if is_shipped(output) and Path(clip).resolve() == default_model_path("clip").resolve():
        for name in CLIP_COMPONENTS:
            shutil.rmtree(tmp / name, ignore_errors=True)
    for name in RECORDS:
        if (Path(trained) / name).is_file():
            shutil.copy2(Path(trained) / name, tmp / name)
    cls.from_pretrained(str(tmp))  # check it loads through the real path before replacing
    shutil.rmtree(output, ignore_errors=True)
    tmp.rename(output)
    return output


def main(argv=None):
    parser = IplArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("diffae", "stylegan2"), default="diffae")
    parser.add_argument("--trained", default=None, help="trained model folder (default: the training script's --output_dir)")
    parser.add_argument("--clip", default=None, help="CLIP folder (default: the shipped Shapes CLIP)")
    parser.add_argument("--output", default=None, help="output folder (default: the shipped folder of --backend)")
    args = parser.parse_args(argv)
    trained = args.trained or TRAINED[args.backend]
    clip = args.clip or default_model_path("clip")
    print(f"wrote {assemble(args.backend, trained, clip, args.output or SHIPPED[args.backend])}")


if __name__ == "__main__":
    run_script(main)  # a UserError: one line, exit status 2
