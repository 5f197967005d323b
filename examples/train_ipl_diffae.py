#!/usr/bin/env python
"""Diff-IPL: adapt a diffusion autoencoder to a domain described only by text.

One readable training script in the style of diffusers' examples. It runs the whole method:

1. load a source ``IPLPipeline`` (DiffAE + CLIP; default: the embedded Shapes model);
2. take source-domain images (``--train_data_dir``) or sample them with the latent net;
3. encode them once -- ``z_sem`` and the DDIM inversion ``x_{t0}`` with the source UNet;
4. Stage 1: learn image-specific prompts with the latent mapper (IPL Eq. 6);
5. Stage 2: fine-tune a copy of the UNet with the adaptive directional CLIP loss (Eq. 7-9);
6. save the adapted pipeline (``save_pretrained``) and optionally push it to the Hub.

Steps 3-5 are ``ipl_diffusion.adaptation.diffae.adapt_diffae`` -- the same code ``ipl adapt``
and ``IPLPipeline.adapt`` run.

Single process::

    python examples/train_ipl_diffae.py --target sketch --output_dir runs/sketch

Several processes / GPUs (work is sharded, gradients averaged, only the main process writes)::

    accelerate launch --num_processes 2 examples/train_ipl_diffae.py --target sketch \\
        --output_dir runs/sketch --mixed_precision bf16 --checkpointing_steps 50

Resume an interrupted run (ends with the same weights as an uninterrupted one)::

    python examples/train_ipl_diffae.py ... --resume_from_checkpoint latest

Outputs in ``--output_dir``: ``pipeline/`` (the adapted pipeline), ``run_config.json``,
``samples/step_*.png`` (rows: source | reconstruction | adapted), ``checkpoints/``, and the
losses (TensorBoard events in ``logs/`` when tensorboard is installed, else ``losses.csv``).
"""

import argparse
import json
import logging
from pathlib import Path

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed

from ipl_diffusion.adaptation.diffae import Stage1Options, Stage2Config, adapt_diffae
from ipl_diffusion.adaptation.distributed import make_accelerator
from ipl_diffusion.outputs import atomic_folder, atomic_write_text, check_writable, output_lock, refuse_earlier_result
from ipl_diffusion.pipelines.pipeline_ipl import IPLPipeline

logger = get_logger(__name__)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    io = parser.add_argument_group("model and data")
    io.add_argument("--pretrained_model_name_or_path", default=None,
                    help="source IPLPipeline folder or Hub id (default: the embedded Shapes model)")
    io.add_argument("--source", default=None, help="source domain label (default: the pipeline's)")
    io.add_argument("--target", required=True, help='target domain label, e.g. "Wall painting"')
    io.add_argument("--train_data_dir", default=None, help="folder of source-domain images")
    io.add_argument("--stage1_data_dir", default=None,
                    help="folder of source-domain images for Stage 1's pool (default: --train_data_dir); give "
                         "thousands: a mapper trained on a few dozen memorises them (see heldout_retrieval)")
    io.add_argument("--num_source_images", type=int, default=32, help="latents to sample without --train_data_dir")
    io.add_argument("--output_dir", required=True)
    stage1 = parser.add_argument_group("Stage 1: prompt learning")
    stage1.add_argument("--scheme", default="adaptive", choices=("adaptive", "learned", "random", "manual"))
    stage1.add_argument("--lambda_domain", type=float, default=1.0)
    stage1.add_argument("--stage1_iterations", type=int, default=300)
    stage1.add_argument("--stage1_batch_size", type=int, default=32)
    stage1.add_argument("--stage1_learning_rate", type=float, default=None)
    stage1.add_argument("--n_ctx", type=int, default=4)
    stage2 = parser.add_argument_group("Stage 2: UNet fine-tuning")
    stage2.add_argument("--t0", type=int, default=400)
    stage2.add_argument("--num_inversion_steps", type=int, default=40)
    stage2.add_argument("--num_train_steps", type=int, default=6)
    stage2.add_argument("--num_inference_steps", type=int, default=40)
    stage2.add_argument("--learning_rate", type=float, default=8e-6)
    stage2.add_argument("--max_train_steps", type=int, default=300, help="Stage 2 iterations")
    stage2.add_argument("--train_batch_size", type=int, default=2, help="images per process per iteration")
    stage2.add_argument("--clip_loss_weight", type=float, default=3.0)
    stage2.add_argument("--l1_loss_weight", type=float, default=0.0)
    stage2.add_argument("--id_loss_weight", type=float, default=0.0)
    stage2.add_argument("--gradient_mode", default="full_chain", choices=("full_chain", "per_step"))
    stage2.add_argument("--gradient_checkpointing", action="store_true")
    stage2.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient-norm clipping (Stage2Config)")
    run = parser.add_argument_group("run")
    run.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"), help="fp16 needs a GPU")
    run.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    run.add_argument("--checkpointing_steps", type=int, default=None)
    run.add_argument("--checkpoints_total_limit", type=int, default=2)
    run.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint folder')
    run.add_argument("--overwrite", action="store_true", help="replace the pipeline/ of an earlier run in --output_dir")
    run.add_argument("--validation_steps", type=int, default=None, help="write a sample grid every N iterations")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--push_to_hub", action="store_true")
    run.add_argument("--hub_model_id", default=None)
    run.add_argument("--hub_token", default=None)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # Before any model loads: the output folder must be writable, hold no earlier result (unless
    # resumed or --overwrite) and not be in use by another run (its lock is held until the end).
    check_writable(args.output_dir, "--output_dir")
    with output_lock(args.output_dir, "--output_dir"):
        if args.resume_from_checkpoint is None and not args.overwrite:
            refuse_earlier_result(args.output_dir, ["pipeline"], "--output_dir")
        train(args)


def train(args):
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    accelerator = make_accelerator(args.mixed_precision)
    logger.info(accelerator.state, main_process_only=False)
    set_seed(args.seed)

    # 1. The source pipeline: frozen semantic encoder, source UNet, scheduler, CLIP.
    model = args.pretrained_model_name_or_path
    if model is None:
        from ipl_diffusion.shapes import default_model_path

        model = default_model_path()
    pipe = IPLPipeline.from_pretrained(str(model)).to(accelerator.device)
    pipe.set_progress_bar_config(disable=not accelerator.is_local_main_process)
    if args.enable_xformers_memory_efficient_attention:
        # On machines where xformers cannot run the models warn once and keep SDPA.
        pipe.source_unet.enable_xformers_memory_efficient_attention()
        pipe.semantic_encoder.enable_xformers_memory_efficient_attention()

    # 2. Source-domain images, (N, 3, H, W) in [-1, 1]; every process holds the same set.
    if args.train_data_dir is not None:
        images = pipe.preprocess(args.train_data_dir)
    else:
        generator = torch.Generator().manual_seed(args.seed)
        images = pipe.sample(args.num_source_images, generator=generator, output_type="latent", source=True,
                             num_inference_steps=args.num_inference_steps).images

    # 3-5. Encode + cache, Stage 1, Stage 2 (checkpointed, resumable, sharded).
    stage1 = Stage1Options(scheme=args.scheme, lambda_domain=args.lambda_domain, iterations=args.stage1_iterations,
                           batch_size=args.stage1_batch_size, learning_rate=args.stage1_learning_rate, n_ctx=args.n_ctx)
    stage2 = Stage2Config(
        t0=args.t0, num_inversion_steps=args.num_inversion_steps, num_train_steps=args.num_train_steps,
        num_inference_steps=args.num_inference_steps, learning_rate=args.learning_rate,
        iterations=args.max_train_steps, batch_size=args.train_batch_size, clip_loss_weight=args.clip_loss_weight,
        l1_loss_weight=args.l1_loss_weight, id_loss_weight=args.id_loss_weight, gradient_mode=args.gradient_mode,
        gradient_checkpointing=args.gradient_checkpointing, mixed_precision=args.mixed_precision,
        max_grad_norm=args.max_grad_norm, seed=args.seed, checkpointing_steps=args.checkpointing_steps,
        checkpoints_total_limit=args.checkpoints_total_limit, sample_steps=args.validation_steps,
    )
    result = adapt_diffae(
        semantic_encoder=pipe.semantic_encoder, source_unet=pipe.source_unet, scheduler=pipe.scheduler,
        clip_model=pipe.text_encoder, tokenizer=pipe.tokenizer, feature_extractor=pipe.feature_extractor,
        images=images, source=args.source or pipe.config.source_label, target=args.target,
        stage1_images=pipe.preprocess(args.stage1_data_dir) if args.stage1_data_dir else None,
        stage1=stage1, stage2=stage2, accelerator=accelerator, output_dir=args.output_dir,
        resume_from_checkpoint=args.resume_from_checkpoint, base_model=pipe.config.base_model or str(model),
    )

    # 6. Save (main process only) and optionally push.
    if accelerator.is_main_process:
        output = Path(args.output_dir)
        result.run_config["args"] = vars(args)
        atomic_write_text(output / "run_config.json", json.dumps(result.run_config, indent=2))
        adapted = pipe.with_adaptation(result)
        with atomic_folder(output / "pipeline") as folder:  # a crash leaves the old pipeline or the new one
            adapted.save_pretrained(folder)
        logger.info(f"saved the adapted pipeline to {output / 'pipeline'}")
        if args.push_to_hub:
            repo_id = args.hub_model_id or output.name
            adapted.push_to_hub(repo_id, token=args.hub_token)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
