#!/usr/bin/env python
"""Diff-IPL: adapt a diffusion autoencoder to a domain described only by text.

One readable training script in the style of diffusers' examples. It runs the whole method:

1. load a source ``IPLPipeline`` (DiffAE + CLIP; default: the embedded Shapes model);
2. take source-domain images (``--images``) or sample them with the latent net;
3. encode them once -- ``z_sem`` and the DDIM inversion ``x_{t0}`` with the source UNet;
4. Stage 1: learn image-specific prompts with the latent mapper (IPL Eq. 6);
5. Stage 2: fine-tune a copy of the UNet with the adaptive directional CLIP loss (Eq. 7-9);
6. save the adapted pipeline (``save_pretrained``) and optionally push it to the Hub.

Steps 3-5 are ``IPLPipeline.adapt`` -- the same code ``ipl adapt`` runs. Every option of the
method is a field of ``ipl_diffusion.configs`` (``Stage1Config``, ``DiffAEStage2Config``) and
the arguments below are generated from them with transformers' ``HfArgumentParser``, under the
same names as ``ipl adapt``'s flags, ``pipe.adapt``'s keywords and ``run_config.json``. Here
every option has the config's default (the paper's / DiffusionCLIP's), not the model's
recommended ``adapt_defaults``: a training script states its whole recipe.

Single process::

    python examples/train_ipl_diffae.py --target sketch --output_dir runs/sketch

Several processes / GPUs (work is sharded, gradients averaged, only the main process writes)::

    accelerate launch --num_processes 2 examples/train_ipl_diffae.py --target sketch \\
        --output_dir runs/sketch --mixed_precision bf16 --checkpointing_steps 50

Resume an interrupted run (ends with the same weights as an uninterrupted one)::

    python examples/train_ipl_diffae.py ... --resume_from_checkpoint latest

Outputs in ``--output_dir``: ``pipeline/`` (the adapted pipeline), ``run_config.json``,
``samples/step_*.png`` (rows: source | reconstruction | adapted), ``checkpoints/``, and the
losses (``losses.csv``, and TensorBoard events in ``logs/`` when tensorboard is installed).
"""

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from accelerate.logging import get_logger
from accelerate.utils import set_seed
from transformers import HfArgumentParser

from ipl_diffusion import IPLPipeline
from ipl_diffusion.adaptation.distributed import make_accelerator
from ipl_diffusion.adaptation.step_choice import remove_earlier_reports
from ipl_diffusion.checkpointing import check_output_dir
from ipl_diffusion.cli import run_script
from ipl_diffusion.configs import AdaptArguments, DiffAEStage2Config, Stage1Config
from ipl_diffusion.outputs import atomic_folder, atomic_write_text, check_writable, output_lock
from ipl_diffusion.pipelines.loading import from_pretrained_with_clip
from ipl_diffusion.shapes import default_model_path

logger = get_logger(__name__)


@dataclass
class HubArguments:
    _argument_group_name = "GPU and Hub"

    enable_xformers_memory_efficient_attention: bool = field(default=False, metadata={"help": "xformers attention (GPU)"})
    push_to_hub: bool = field(default=False, metadata={"help": "push the adapted pipeline to the Hub"})
    hub_model_id: Optional[str] = field(default=None, metadata={"help": "Hub repo id (default: the output folder's name)"})
    hub_token: Optional[str] = field(default=None, metadata={"help": "Hub token (default: the logged-in one)"})


def parse_args(argv=None):
    """``(AdaptArguments, Stage1Config, DiffAEStage2Config, HubArguments)`` from the command line."""
    parser = HfArgumentParser((AdaptArguments, Stage1Config, DiffAEStage2Config, HubArguments))
    run, stage1, stage2, hub = parser.parse_args_into_dataclasses(args=argv)
    if run.backend not in (None, "diffae"):
        parser.error("this script adapts a DiffAE (IPLPipeline); for StyleGAN2 use `ipl adapt --backend stylegan2`")
    if run.output_dir is None:
        parser.error("--output_dir is required")
    return run, stage1, stage2, hub


def main(argv=None):
    run, stage1, stage2, hub = parse_args(argv)
    # Before any model loads: the output folder must be writable, new or empty (unless this run
    # continues its checkpoints, or --overwrite) and not in use by another run (its lock is held
    # until the end). The rule is ipl adapt's.
    check_writable(run.output_dir, "--output_dir")
    with output_lock(run.output_dir, "--output_dir"):
        check_output_dir(run.output_dir, run.resume_from_checkpoint, run.overwrite, ["pipeline"])
        train(run, stage1, stage2, hub)


def train(run, stage1, stage2, hub):
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    accelerator = make_accelerator(stage2.mixed_precision)
    logger.info(accelerator.state, main_process_only=False)
    set_seed(stage2.seed)

    # 1. The source pipeline: frozen semantic encoder, source UNet, scheduler, CLIP.
    model = run.model or default_model_path()
    pipe = from_pretrained_with_clip(IPLPipeline, model, run.clip_model).to(accelerator.device)  # None: its own CLIP
    pipe.set_progress_bar_config(disable=not accelerator.is_local_main_process)
    if hub.enable_xformers_memory_efficient_attention:
        # Where xformers cannot run the models this warns once and keeps SDPA.
        pipe.source_unet.enable_xformers_memory_efficient_attention()
        pipe.semantic_encoder.enable_xformers_memory_efficient_attention()

    # 2-5. Source images (the folder, else sampled), encode + cache, Stage 1, Stage 2
    # (checkpointed, resumable, sharded over processes).
    options = {**dataclasses.asdict(stage1), **dataclasses.asdict(stage2)}
    adapted = pipe.adapt(
        run.target, run.source, images=run.images, stage1_images=run.stage1_images, target_images=run.target_images,
        validation_images=run.validation_images, accelerator=accelerator,
        output_dir=run.output_dir, resume_from_checkpoint=run.resume_from_checkpoint, overwrite=run.overwrite,
        **options,
    )

    # 6. Save (main process only) and optionally push.
    if accelerator.is_main_process:
        output = Path(run.output_dir)
        config = {**adapted.adaptation_config, "args": dataclasses.asdict(run)}
        atomic_write_text(output / "run_config.json", json.dumps(config, indent=2))
        with atomic_folder(output / "pipeline") as folder:  # a crash leaves the old pipeline or the new one
            adapted.save_pretrained(folder)
        if "step_choice" not in config:  # --overwrite: the replaced result's reports go with it
            remove_earlier_reports(output)
        logger.info(f"saved the adapted pipeline to {output / 'pipeline'}")
        if hub.push_to_hub:
            adapted.push_to_hub(hub.hub_model_id or output.name, token=hub.hub_token)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    run_script(main)  # a UserError: one line, exit status 2
