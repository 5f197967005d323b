"""``ipl adapt``: adapt a source generator to a domain described by text or images (IPL Stage 1 + 2).

Stage 1 learns image-specific prompts with a latent mapper; Stage 2 fine-tunes the
generator with the adaptive directional CLIP loss. With no --model it adapts the embedded
Shapes models (shipped with the package, so it works offline), e.g. `ipl adapt --target sketch`.
--target_images FOLDER (a few style images, with or without --target) defines the target by
the images' CLIP features, as StyleGAN-NADA's --style_img_dir (ipl_diffusion.adaptation.image_target).

Every option of the method is a field of ipl_diffusion.configs (Stage1Config,
DiffAEStage2Config, GANStage2Config), under the same name here, in pipe.adapt(...), in
run_config.json and in the checkpoints. An option not given takes the model's recommended
value (model_index.json adapt_defaults), else the config's default. A number option whose help
gives None a meaning also takes `none`, e.g. --max_grad_norm none (no gradient clipping).

The run writes into --output_dir (default ./ipl-<target>): a new or empty folder, or the folder
of the run it resumes (--resume_from_checkpoint), or any folder with --overwrite (which replaces
an earlier result and its checkpoints, and leaves other files):
  pipeline/          the adapted pipeline: use it with `ipl translate --model OUTPUT/pipeline`
                     or IPLPipeline.from_pretrained("OUTPUT/pipeline")
  before_after.png   {before_after_rows}
  run_config.json    every resolved option of the run
  step_choice.json/.csv/.png   with --candidate_steps N: every candidate's held-out scores and the
                     chosen step (candidates/ with --keep_candidates)
  losses.csv, stage1/, checkpoints/, cache.safetensors (for --resume_from_checkpoint)
"""

import argparse
import dataclasses
import json
from pathlib import Path

from ipl_diffusion import before_after
from ipl_diffusion.errors import UserError


def _before_after_help() -> str:
    """before_after.png's rows as the trainers label them (ipl_diffusion.before_after)."""
    indent = "\n" + " " * 21
    return (f"labelled rows, diffae: {before_after.rows_help('diffae')}{indent}(first row "
            f"{before_after.TRAINING_SOURCE_ROW!r}: the training images, when no held-out ones are given);"
            f"{indent}stylegan2: {before_after.rows_help('stylegan2')}, on the same z")


DESCRIPTION = __doc__.split("\n\n", 1)[1].replace("{before_after_rows}", _before_after_help())

EPILOG = """examples:
  ipl adapt --target sketch                        # Shapes default model, a few CPU minutes
  ipl adapt --target neon --scheme manual          # the NADA baseline (fixed prompts)
  ipl adapt --backend stylegan2 --target sketch    # GAN-IPL on the Shapes StyleGAN2 default
  ipl adapt --target_images ./style                # the target defined by a few style images only
  ipl adapt --model ./ffhq256-ipl --source Photo --target "Wall painting" \\
            --images ./faces --iterations 300 --mixed_precision bf16
  ipl adapt --backend stylegan2 --model ./ffhq-sg2 --source Photo --target Sketch   # GAN-IPL
"""


class _NotGiven:
    """The parsed value of an option the command line did not set: None cannot say it, since
    None is a value some options are given (``--max_grad_norm none``: no clipping)."""

    def __repr__(self):
        return "<not given>"


NOT_GIVEN = _NotGiven()


def _option_fields() -> dict:
    """Every adaptation option once (``name -> dataclass field``), first declaration first."""
    from ipl_diffusion.configs import adapt_option_groups

    found = {}
    for cls, _ in adapt_option_groups():
        for f in dataclasses.fields(cls):
            found.setdefault(f.name, (cls, f))
    return found


def _group_dataclasses():
    """One dataclass per ``--help`` group, each option in exactly one of them: Stage 1, both
    Stage-2 backends, DiffAE only, StyleGAN2 only (generated from the configs' fields)."""
    from typing import get_type_hints

    from ipl_diffusion.configs import adapt_option_groups

    seen, made = set(), []
    for cls, title in adapt_option_groups():
        hints = get_type_hints(cls)
        own = [f for f in dataclasses.fields(cls) if f.name not in seen]
        seen |= {f.name for f in own}
        # --help shows each config default (which a model's adapt_defaults may replace).
        spec = [(f.name, hints[f.name], dataclasses.field(
            default=f.default, metadata={**f.metadata, "help": f"{f.metadata.get('help', '')} (default: {f.default})"}))
            for f in own]
        group = dataclasses.make_dataclass(cls.__name__ + "Options", spec)
        group._argument_group_name = title
        made.append(group)
    return made


def add_parser(subparsers):
    from transformers import HfArgumentParser

    from ipl_diffusion.configs import AdaptArguments

    generated = HfArgumentParser([AdaptArguments, *_group_dataclasses()], add_help=False)
    parser = subparsers.add_parser(
        "adapt", parents=[generated], help="adapt a generator to a domain described by text or a few images (IPL)",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # "Not given" is NOT_GIVEN for every option of the method, so that a model's recommended value
    # (adapt_defaults) is used for it; the configs hold the real defaults.
    parser.set_defaults(**{name: NOT_GIVEN for name in _option_fields()})
    nullable = _nullable_numbers()
    for action in parser._actions:
        if action.dest in nullable:
            action.type = _none_or(action.type)
    return parser


def _nullable_numbers() -> set:
    """The options whose field is ``Optional[int]`` / ``Optional[float]``, where None means
    something (``max_grad_norm``: no clipping; ``checkpoints_total_limit``: keep all).
    HfArgumentParser types them as the bare number, which cannot say None."""
    from typing import Optional, get_type_hints

    return {name for name, (cls, _) in _option_fields().items()
            if get_type_hints(cls)[name] in (Optional[int], Optional[float])}


def _none_or(kind):
    """argparse type: ``none`` (any case) -> None, any other text -> ``kind(text)``."""
    def parse(text):
        return None if text.strip().lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its refusal: "invalid float value: 'x'"
    return parse


def load_pipeline(backend, model, device=None, clip=True, clip_model=None):
    """Load the ``backend`` pipeline from ``model`` (folder / Hub id; None = Shapes default).

    ``clip=False`` for the commands that never read CLIP (sample, translate): its components
    are left out, so a folder without them (a copy of a shipped Shapes folder, a bare
    generator offline) still loads, and the CLIP is not loaded for nothing. ``clip_model``
    (``--clip_model``, a CLIP folder or Hub id) replaces the folder's own CLIP components
    (``pipelines.loading.clip_components``).
    """
    if model is None:  # the shipped Shapes model; its folder records its adapt defaults
        from ipl_diffusion.shapes import default_model_path

        model = default_model_path(backend)
    _check_backend(backend, Path(model))  # before the (slow) imports below
    import torch

    if backend == "stylegan2":
        from ipl_diffusion.pipelines.pipeline_stylegan_ipl import StyleGANIPLPipeline as cls
    else:
        from ipl_diffusion.pipelines.pipeline_ipl import IPLPipeline as cls
    from ipl_diffusion.clip_loading import CLIPNotFoundError
    from ipl_diffusion.errors import UserFileNotFoundError
    from ipl_diffusion.pipelines.loading import from_pretrained_with_clip
    from ipl_diffusion.shapes import CLIP_COMPONENTS

    try:
        if clip:  # a bare generator's own CLIP is the Hub's ViT-B/32
            pipe = from_pretrained_with_clip(cls, model, clip_model)
        else:
            pipe = cls.from_pretrained(str(model), **dict.fromkeys(CLIP_COMPONENTS))
    except CLIPNotFoundError as err:  # its advice names the Python API; here the flag is the way
        where = "--clip_model: " if clip_model is not None else ""
        raise UserFileNotFoundError(where + err.with_advice("`--clip_model ./clip`")) from err
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return pipe.to(device)


def detect_backend(backend, model) -> str:
    """``backend`` when given, else the generator family of the pipeline folder ``model``
    (read from its ``model_index.json``; a bare StyleGAN2 generator folder is ``"stylegan2"``),
    else ``"diffae"`` (the default ``--backend``; also for Hub ids, whose folder is not read
    before loading)."""
    if backend is not None:
        return backend
    if model is not None:
        from ipl_diffusion.pipelines.loading import is_generator_folder, pipeline_family  # light: json and pathlib only

        found = pipeline_family(Path(model))
        if found is not None:
            return found[1]
        if is_generator_folder(Path(model)):  # a bare generator (ipl convert stylegan2 output)
            return "stylegan2"
    return "diffae"


def _check_backend(backend, folder):
    """A local pipeline folder of the other generator family gets a hint at --backend, rather
    than diffusers' list of expected components."""
    from ipl_diffusion.pipelines.loading import pipeline_family  # light: json and pathlib only

    found = pipeline_family(folder)
    if found is not None and found[1] != backend:
        raise UserError(f"--model {folder} is {found[0]} folder; use --backend {found[1]}")

def run(args) -> int:
    from ipl_diffusion.checkpointing import check_output_dir
    from ipl_diffusion.outputs import check_writable, output_lock

    output = Path(args.output_dir or f"ipl-{'_'.join((args.target or 'image-target').split()).lower() or 'target'}")
    args.backend = detect_backend(args.backend, args.model)
    _check_inputs(args, output)
    check_writable(output, "--output_dir")  # before any model is loaded
    # One run per folder: a second `ipl adapt` into it is refused at once, before it reads or
    # writes anything there (its checkpoint rotation and losses.csv would clobber the first's).
    with output_lock(output, "--output_dir"):
        check_output_dir(output, args.resume_from_checkpoint, args.overwrite, RESULT_NAMES)
        pipe = load_pipeline(args.backend, args.model, args.device, clip_model=args.clip_model)
        style = {"target_images": args.target_images} if args.target_images is not None else {}
        adapted = pipe.adapt(args.target, args.source, **_data(args, pipe), **style, output_dir=str(output),
                             resume_from_checkpoint=args.resume_from_checkpoint, overwrite=args.overwrite,
                             **given_options(args))
        grid = _save_outputs(adapted, output, run_arguments(args))
    _report_stage1(adapted.adaptation_config)
    _report_step_choice(adapted.adaptation_config, output)
    print(f"adapted pipeline: {output / 'pipeline'}")
    if grid is not None:
        print(f"before/after grid: {output / before_after.FILE_NAME}")
    return 0


def given_options(args) -> dict:
    """The options of the method the command line set (name -> value, None included)."""
    return {name: getattr(args, name) for name in _option_fields() if getattr(args, name, NOT_GIVEN) is not NOT_GIVEN}


def _data(args, pipe) -> dict:
    """The source images ``pipe.adapt`` gets: the user's folders, the Shapes renderer's photos
    for the embedded DiffAE, or none (sampled by the pipeline)."""
    if args.backend == "stylegan2":
        return {}
    held_out = {"validation_images": args.validation_images} if args.validation_images else {}
    if args.images is not None:
        return {"images": args.images, **({"stage1_images": args.stage1_images} if args.stage1_images else {}), **held_out}
    if args.model is None:
        from ipl_diffusion.configs import resolve_configs
        from ipl_diffusion.shapes import shapes_source_images

        stage1, stage2 = resolve_configs("diffae", pipe.config.get("adapt_defaults"), given_options(args))
        # The step choice scores num_candidate_images held-out photos; the grid shows 8 of them.
        count = stage2.num_candidate_images if stage2.candidate_steps else 8
        return {**shapes_source_images(pipe, stage2.num_images, stage2.seed, stage1.stage1_num_images, count), **held_out}
    return {**({"stage1_images": args.stage1_images} if args.stage1_images else {}), **held_out}


def _check_inputs(args, output):
    """Checks a user can fail, made before any model is loaded or encoded."""
    if args.clip_model is not None and not args.clip_model.strip():
        raise UserError("--clip_model is empty; give a CLIP folder or Hub id")
    if output.exists() and not output.is_dir():
        raise UserError(f"--output_dir {output} is an existing file; give a folder")
    if args.backend == "stylegan2" and (args.images or args.stage1_images):
        raise UserError("--images / --stage1_images are for --backend diffae; GAN-IPL samples its source latents")
    if not (args.target or "").strip() and args.target_images is None:
        raise UserError("give --target LABEL, --target_images FOLDER (a few style images), or both")
    if args.backend == "stylegan2" and args.validation_images:
        raise UserError("--validation_images is for --backend diffae; GAN-IPL scores fixed held-out z")
    for name in ("images", "stage1_images", "target_images", "validation_images"):
        folder = getattr(args, name)
        if folder is None:
            continue
        if output.resolve() == Path(folder).resolve():
            # The run writes before_after.png, pipeline/ ... there, over the user's images.
            raise UserError(f"--output_dir {output} is the --{name} folder; give a separate output folder")
        _check_image_files(name, folder)
    if args.model is None and args.clip_model is None:
        # The shipped Shapes models' CLIP knows only the Shapes domains: say which before any
        # work is done, and use the canonical names ("Pixel-Art" -> "pixel art"). With
        # --clip_model the pipeline checks the labels against what that CLIP knows.
        from ipl_diffusion.shapes import check_domain

        if args.target is not None:
            args.target = check_domain(args.target)
        if args.source is not None:
            args.source = check_domain(args.source)
    # Option values and names are checked now too, before the (slow) model load.
    from ipl_diffusion.configs import resolve_configs

    resolve_configs(args.backend, None, given_options(args))


def _check_image_files(name, folder):
    """Refuse now, naming --<name> and the file, a missing or empty folder and any image the run
    would refuse after loading the model (unreadable, corrupt, a mode that cannot become RGB):
    each file is opened and verified, its pixels are not kept (they are read at their size later)."""
    from ipl_diffusion.images import check_image_file, list_image_files

    files = [Path(folder)] if Path(folder).is_file() else list_image_files(folder, option=f"--{name}")
    for file in files:
        try:
            check_image_file(file)
        except UserError as err:
            raise type(err)(f"--{name}: {err}") from err


# What an earlier `ipl adapt` leaves in --output as its result.
RESULT_NAMES = ("pipeline", before_after.FILE_NAME)


def _report_stage1(config):
    """One line on whether prompts were learned: held-out retrieval against chance."""
    stage1 = (config or {}).get("stage1", {})
    if stage1.get("heldout_retrieval") is not None:
        print(
            f"Stage 1: held-out prompt retrieval {stage1['heldout_retrieval']:.2f} "
            f"(chance {stage1['retrieval_chance']:.2f}, {stage1['heldout_images']} held-out images)"
        )


def _report_step_choice(config, output):
    """One line on the automatic step choice (--candidate_steps): the chosen step and its scores."""
    choice = (config or {}).get("step_choice")
    if not choice:
        return
    chosen = next(c for c in choice["candidates"] if c["step"] == choice["chosen_step"])
    print(f"step choice: step {chosen['step']} of {choice['last_step']} (CLIP direction {chosen['direction']:.2f}, "
          f"preservation {chosen['preservation_ratio']:.2f} and diversity {chosen['diversity_ratio']:.2f} of the "
          f"sources'); scores in {output / 'step_choice.csv'}, plot {output / 'step_choice.png'}")


def run_arguments(args) -> dict:
    """What the run read and wrote (the ``AdaptArguments`` fields: --model, --clip_model, the
    image folders, ...), recorded under ``"args"`` in run_config.json as
    examples/train_ipl_diffae.py records them."""
    from ipl_diffusion.configs import AdaptArguments

    return {field.name: getattr(args, field.name) for field in dataclasses.fields(AdaptArguments)}


def _save_outputs(adapted, output, arguments):
    """Write pipeline/, before_after.png and run_config.json (the resolved options of the method
    and, under ``"args"``, ``arguments``), each atomically (a crash leaves the earlier version or
    the new one); returns the grid (or None)."""
    from ipl_diffusion.adaptation.step_choice import remove_earlier_reports
    from ipl_diffusion.outputs import atomic_folder, atomic_save_image, atomic_write_text
    from ipl_diffusion.pipelines.adapted_pipeline import MODEL_CARD_NAME

    output.mkdir(parents=True, exist_ok=True)
    with atomic_folder(output / "pipeline") as folder:
        adapted.save_pretrained(folder)
        # The card's usage snippet loads the folder it was saved to: the final one, not the
        # temporary sibling that is renamed into place.
        adapted.model_card(str(output / "pipeline")).save(Path(folder) / MODEL_CARD_NAME)
    grid = getattr(adapted, "sample_grid", None)
    if grid is not None:
        atomic_save_image(grid, output / before_after.FILE_NAME)
    config = getattr(adapted, "adaptation_config", None)
    if config:
        config = {**config, "args": arguments}
        atomic_write_text(output / "run_config.json", json.dumps(config, indent=2, sort_keys=True))
        if "step_choice" not in config:  # --overwrite: the replaced result's reports go with it
            remove_earlier_reports(output)
    return grid
