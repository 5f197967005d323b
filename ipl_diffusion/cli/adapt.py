"""``ipl adapt``: adapt a source generator to a domain described by text (IPL Stage 1 + 2).

Stage 1 learns image-specific prompts with a latent mapper; Stage 2 fine-tunes the
generator with the adaptive directional CLIP loss. With no --model it adapts the embedded
Shapes models (shipped with the package, so it works offline), e.g. `ipl adapt --target sketch`.

The run writes into --output (default ./ipl-<target>):
  pipeline/          the adapted pipeline: use it with `ipl translate --model OUTPUT/pipeline`
                     or IPLPipeline.from_pretrained("OUTPUT/pipeline")
  before_after.png   rows: source images | source-model reconstructions | adapted images
  run_config.json    every resolved option of the run
  losses.csv (or TensorBoard logs/), checkpoints/, cache.safetensors (for --resume-from-checkpoint)
"""

import argparse
import inspect
import json
import math
from pathlib import Path

from ipl_diffusion.errors import UserError

DESCRIPTION = __doc__.split("\n\n", 1)[1]

EPILOG = """examples:
  ipl adapt --target sketch                       # Shapes default model, a few CPU minutes
  ipl adapt --target neon --scheme manual         # the NADA baseline (fixed prompts)
  ipl adapt --backend stylegan2 --target sketch   # GAN-IPL on the Shapes StyleGAN2 default
  ipl adapt --model ./ffhq256-ipl --source Photo --target "Wall painting" \\
            --images ./faces --iterations 300 --mixed-precision bf16
  ipl adapt --backend stylegan2 --model ./ffhq-sg2 --source Photo --target Sketch   # GAN-IPL
"""


def positive_int(text):
    """argparse type: an integer >= 1 (0 iterations would leave the generator unchanged)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return value


def positive_float(text):
    """argparse type: a finite number > 0 (a learning rate)."""
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0; got {text}")
    return value


def non_negative_float(text):
    """argparse type: a finite number >= 0 (a loss weight)."""
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0; got {text}")
    return value


def _finite_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number; got {text}")
    return value


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "adapt",
        help="adapt a generator to a text-described domain (IPL)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", required=True, help='target domain label, e.g. "sketch" or "Wall painting"')
    parser.add_argument("--source", default=None, help="source domain label (default: the model's, else 'Photo')")
    parser.add_argument(
        "--model",
        default=None,
        help="pipeline folder or Hub id of the source model (default: the embedded Shapes model of --backend)",
    )
    parser.add_argument("--backend", choices=("diffae", "stylegan2"), default="diffae", help="generator family")
    parser.add_argument("--output", default=None, help="output folder (default: ./ipl-<target>)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the result of an earlier run in --output (its pipeline/, grid and checkpoints); "
        "without it such a folder is refused",
    )
    parser.add_argument(
        "--images", default=None, help="folder of source-domain images; default: sample source latents"
    )
    parser.add_argument("--num-images", type=positive_int, default=None, help="how many source latents to sample")

    ipl = parser.add_argument_group("prompt learning (Stage 1)")
    ipl.add_argument(
        "--scheme",
        choices=("adaptive", "learned", "random", "manual"),
        default="adaptive",
        help="prompt scheme: adaptive = IPL, manual = NADA's fixed prompts, learned = one shared "
        "learned prompt (CoOp), random = untrained mapper (default: adaptive)",
    )
    ipl.add_argument("--lambda", dest="lambda_domain", type=non_negative_float, default=None, help="weight of the domain loss (Eq. 6)")
    ipl.add_argument("--stage1-iterations", type=positive_int, default=None, help="mapper training iterations")

    train = parser.add_argument_group("generator fine-tuning (Stage 2)")
    train.add_argument("--iterations", type=positive_int, default=None, help="fine-tuning iterations")
    train.add_argument("--batch-size", type=positive_int, default=None, help="images per iteration")
    train.add_argument("--lr", type=positive_float, default=None, help="learning rate")
    train.add_argument("--t0", type=positive_int, default=None, help="DiffAE: timestep the images are inverted to (edit strength)")
    train.add_argument("--inversion-steps", type=positive_int, default=None, help="DiffAE: DDIM steps of the inversion")
    train.add_argument("--train-steps", type=positive_int, default=None, help="DiffAE: DDIM steps decoded while training")
    train.add_argument("--sampling-steps", type=positive_int, default=None, help="DiffAE: DDIM steps decoded for outputs")
    train.add_argument("--l1-weight", type=non_negative_float, default=None, help="weight of the L1 loss to the source image")
    train.add_argument("--id-weight", type=non_negative_float, default=None, help="weight of the identity loss")
    train.add_argument(
        "--gradient-mode",
        choices=("full_chain", "per_step"),
        default=None,
        help="DiffAE: back-propagate through all decoding steps, or DiffusionCLIP's "
        "memory-efficient update after every step",
    )
    train.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    train.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no", help="GPU only")
    train.add_argument("--checkpointing-steps", type=positive_int, default=None, help="save a resumable checkpoint every N iterations")
    train.add_argument(
        "--resume-from-checkpoint", default=None, help="'latest' or a checkpoint folder in OUTPUT/checkpoints"
    )
    train.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    train.add_argument("--device", default=None, help="torch device, e.g. cuda or cpu (default: cuda if available)")
    return parser


# Options forwarded to ``adapt`` only when given, so each backend keeps its own defaults.
_FORWARDED = (
    "num_images",
    "scheme",
    "lambda_domain",
    "stage1_iterations",
    "iterations",
    "batch_size",
    "lr",
    "t0",
    "inversion_steps",
    "train_steps",
    "sampling_steps",
    "l1_weight",
    "id_weight",
    "gradient_mode",
    "checkpointing_steps",
    "resume_from_checkpoint",
    "mixed_precision",
    "seed",
)
# CLI name -> keyword of IPLPipeline.adapt / StyleGANIPLPipeline.adapt
_KEYWORDS = {
    "lambda_domain": "lambda_domain",
    "lr": "learning_rate",
    "inversion_steps": "num_inversion_steps",
    "train_steps": "num_train_steps",
    "sampling_steps": "num_inference_steps",
    "l1_weight": "l1_loss_weight",
    "id_weight": "id_loss_weight",
}


def load_pipeline(backend, model, device=None):
    """Load the ``backend`` pipeline from ``model`` (folder / Hub id; None = Shapes default)."""
    if model is None:  # the shipped Shapes model; its folder records its adapt defaults
        from ipl_diffusion.shapes import default_model_path

        model = default_model_path(backend)
    _check_backend(backend, Path(model))  # before the (slow) imports below
    import torch

    if backend == "stylegan2":
        from ipl_diffusion.pipelines.pipeline_stylegan_ipl import StyleGANIPLPipeline as cls
    else:
        from ipl_diffusion.pipelines.pipeline_ipl import IPLPipeline as cls
    pipe = cls.from_pretrained(str(model))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return pipe.to(device)


def detect_backend(backend, model) -> str:
    """``backend`` when given, else the generator family of the pipeline folder ``model``
    (read from its ``model_index.json``), else ``"diffae"`` (the default ``--backend``; also
    for Hub ids, whose folder is not read before loading)."""
    if backend is not None:
        return backend
    if model is not None:
        from ipl_diffusion.pipelines.loading import pipeline_family  # light: json and pathlib only

        found = pipeline_family(Path(model))
        if found is not None:
            return found[1]
    return "diffae"


def _check_backend(backend, folder):
    """A local pipeline folder of the other generator family gets a hint at --backend, rather
    than diffusers' list of expected components."""
    from ipl_diffusion.pipelines.loading import pipeline_family  # light: json and pathlib only

    found = pipeline_family(folder)
    if found is not None and found[1] != backend:
        raise UserError(f"--model {folder} is {found[0]} folder; use --backend {found[1]}")

def shapes_source_images(pipe, num_images, seed, stage1_num_images=None):
    """The embedded Shapes DiffAE's inputs: rendered photos (its latent net, trained for
    minutes, samples z_sem less faithfully than the renderer draws) -- the Stage-2 images, a
    large Stage-1 pool (so that the mapper generalises) and 8 photos for the before/after
    grid that neither stage sees. Three disjoint seed streams of the run's seed; a count left
    None is the folder's recorded adapt_defaults."""
    from ipl_diffusion.shapes import source_images

    defaults = pipe.config.adapt_defaults or {}
    size = pipe.image_size
    return {
        "images": source_images(num_images or defaults.get("num_images", 16), seed=seed, resolution=size),
        "stage1_images": source_images(
            stage1_num_images or defaults.get("stage1_num_images", 2048), seed=seed + 10_007, resolution=size
        ),
        "validation_images": source_images(8, seed=seed + 20_011, resolution=size),
    }


def run(args) -> int:
    from ipl_diffusion.outputs import check_writable, output_lock

    output = Path(args.output or f"ipl-{'_'.join(args.target.split()).lower() or 'target'}")
    _check_inputs(args, output)
    check_writable(output, "--output")  # before any model is loaded
    # One run per folder: a second `ipl adapt` into it is refused at once, before it reads or
    # writes anything there (its checkpoint rotation and losses.csv would clobber the first's).
    with output_lock(output, "--output"):
        _check_earlier_result(args, output)
        pipe = load_pipeline(args.backend, args.model, args.device)
        adapted = pipe.adapt(args.target, **_adapt_kwargs(args, pipe, output))
        grid = _save_outputs(adapted, output)
    _report_stage1(adapted.adaptation_config)
    print(f"adapted pipeline: {output / 'pipeline'}")
    if grid is not None:
        print(f"before/after grid: {output / 'before_after.png'}")
    return 0


def _check_inputs(args, output):
    """Checks a user can fail, made before any model is loaded or encoded."""
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is an existing file; give a folder")
    if args.num_images is not None and args.num_images < 2:
        raise UserError(f"--num-images must be >= 2 (the contrastive loss needs pairs), got {args.num_images}")
    if args.images is not None and output.resolve() == Path(args.images).resolve():
        # The run writes before_after.png, pipeline/ ... there, over the user's images.
        raise UserError(f"--output {output} is the --images folder; give a separate output folder")
    if args.images is not None and not Path(args.images).is_file():
        from ipl_diffusion.images import list_image_files

        list_image_files(args.images)  # a missing / empty folder fails now, before any model is built
    if args.model is None:
        # The shipped Shapes models know only the Shapes domains: say which before any work is
        # done, and use the canonical names ("Pixel-Art" -> "pixel art").
        from ipl_diffusion.shapes import check_domain

        args.target = check_domain(args.target)
        if args.source is not None:
            args.source = check_domain(args.source)


# What an earlier `ipl adapt` leaves in --output as its result.
RESULT_NAMES = ("pipeline", "before_after.png")


def _check_earlier_result(args, output):
    """Refuse to replace an earlier run's result unless --overwrite; with --overwrite, drop the
    earlier run's checkpoints (a fresh run would refuse them, a resumed one continues them)."""
    import shutil

    from ipl_diffusion.checkpointing import check_before_run, list_checkpoints
    from ipl_diffusion.outputs import refuse_earlier_result

    resuming = args.resume_from_checkpoint is not None and (
        args.resume_from_checkpoint != "latest" or list_checkpoints(output / "checkpoints")
    )
    if not (args.overwrite or resuming):
        refuse_earlier_result(output, RESULT_NAMES, "--output")
    if args.overwrite and args.resume_from_checkpoint is None and (output / "checkpoints").is_dir():
        shutil.rmtree(output / "checkpoints")
    # A misspelt checkpoint name, a damaged checkpoint or a fresh run over old checkpoints fails
    # now, before the model is loaded.
    check_before_run(output / "checkpoints", args.resume_from_checkpoint)


def _adapt_kwargs(args, pipe, output) -> dict:
    """The keywords of ``pipe.adapt`` that the command line sets."""
    kwargs = {}
    for name in _FORWARDED:
        value = getattr(args, name)
        if value is not None:
            kwargs[_KEYWORDS.get(name, name)] = value
    if args.gradient_checkpointing:
        kwargs["gradient_checkpointing"] = True
    if args.images is not None:
        kwargs["images"] = args.images
    elif args.model is None and args.backend == "diffae":
        kwargs.update(shapes_source_images(pipe, args.num_images, args.seed))
    if args.source is not None:
        kwargs["source"] = args.source
    kwargs["output_dir"] = str(output)
    accepted = inspect.signature(pipe.adapt).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        ignored = sorted(k for k in kwargs if k not in accepted)
        if ignored:
            print(f"ipl adapt: note: the {args.backend} backend ignores {', '.join(ignored)}")
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    return kwargs


def _report_stage1(config):
    """One line on whether prompts were learned: held-out retrieval against chance."""
    stage1 = (config or {}).get("stage1", {})
    if stage1.get("heldout_retrieval") is not None:
        print(
            f"Stage 1: held-out prompt retrieval {stage1['heldout_retrieval']:.2f} "
            f"(chance {stage1['retrieval_chance']:.2f}, {stage1['heldout_images']} held-out images)"
        )


def _save_outputs(adapted, output):
    """Write pipeline/, before_after.png and run_config.json, each atomically (a crash leaves the
    earlier version or the new one); returns the grid (or None)."""
    from ipl_diffusion.outputs import atomic_folder, atomic_save_image, atomic_write_text

    output.mkdir(parents=True, exist_ok=True)
    with atomic_folder(output / "pipeline") as folder:
        adapted.save_pretrained(folder)
    grid = getattr(adapted, "sample_grid", None)
    if grid is not None:
        atomic_save_image(grid, output / "before_after.png")
    config = getattr(adapted, "adaptation_config", None)
    if config:
        atomic_write_text(output / "run_config.json", json.dumps(config, indent=2, sort_keys=True))
    return grid
