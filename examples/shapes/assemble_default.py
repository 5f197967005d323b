#!/usr/bin/env python
"""Assemble the embedded default: the Shapes Diff-IPL source pipeline folder.

Joins the trained Shapes DiffAE (a ``DiffAEPipeline`` folder written by ``train_diffae.py``)
and the Shapes CLIP (``train_clip.py``) into one ``IPLPipeline`` with
``IPLPipeline.from_components`` and writes it with ``save_pretrained``. That folder is what
``ipl_diffusion.shapes.default_model_path("diffae")`` returns and what ``ipl adapt`` loads
when no ``--model`` is given.

Example::

    python examples/shapes/assemble_default.py \
        --diffae ipl_diffusion/shapes_models/parts --clip ipl_diffusion/shapes_models/clip \
        --output_dir ipl_diffusion/shapes_models/diffae-ipl
"""

import argparse
import json
from pathlib import Path

from pipelines.pipeline_ipl import IPLPipeline


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--diffae", default="ipl_diffusion/shapes_models/parts")
    p.add_argument("--clip", default="ipl_diffusion/shapes_models/clip")
    p.add_argument("--output_dir", default="ipl_diffusion/shapes_models/diffae-ipl")
    p.add_argument("--base_model", default="ipl-diffusion/shapes-diffae (embedded default)")
    args = p.parse_args(argv)
    pipe = IPLPipeline.from_components(args.diffae, args.clip, None, source_label="photo", base_model=args.base_model)
    pipe.save_pretrained(args.output_dir)
    # Keep the provenance of the parts beside the pipeline.
    records = {}
    for name, folder in (("diffae", args.diffae), ("clip", args.clip)):
        record = Path(folder) / "training_record.json"
        if record.is_file():
            records[name] = json.loads(record.read_text())
    (Path(args.output_dir) / "training_records.json").write_text(json.dumps(records, indent=1))
    print(f"saved the Shapes IPLPipeline to {args.output_dir}")


if __name__ == "__main__":
    main()
