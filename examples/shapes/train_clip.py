#!/usr/bin/env python
"""Train the Shapes CLIP: a small ``transformers.CLIPModel`` on the Shapes world, all styles.

The Shapes world replaces OpenAI's CLIP where no pretrained weights can be downloaded: IPL and
NADA only need a joint image-text space in which the domain labels ("photo", "sketch", ...)
and the content words are meaningful, and this model provides exactly that for the Shapes
renderer's styles.

Training is CLIP's symmetric contrastive objective with *multi-positive* targets: a caption
mentions only some factors ("a neon sign", "a red ring"), so every image that agrees with
everything a caption says is a positive for it, and the cross-entropy targets are spread
uniformly over those positives (in both directions). Images are rendered on the fly, so every
batch is fresh data.

The result is a normal CLIP folder (``CLIPModel`` + ``CLIPTokenizer`` + ``CLIPImageProcessor``
configs, safetensors) loadable with ``from_pretrained``; zero-shot accuracy on fresh images
(style / colour / shape) is measured at the end and written to ``training_record.json``.

Example (what the shipped model was trained with, see the record in its folder)::

    python examples/shapes/train_clip.py --max_minutes 40 \
        --output_dir ipl_diffusion/shapes_models/clip --work_dir runs/shapes_clip

Stop it at any time; ``--resume_from_checkpoint latest`` (the default) continues where the
newest checkpoint in ``--work_dir`` left off.
"""

import json
import math
import random
import shlex
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

from ipl_diffusion.checkpointing import ResumableRun
from ipl_diffusion.cli import run_script
from ipl_diffusion.cli.parser import IplArgumentParser
from ipl_diffusion.cli.argtypes import nonempty_text, nonnegative_int, positive_float, positive_int
from ipl_diffusion.errors import UserError
from ipl_diffusion.outputs import output_lock
from ipl_diffusion.shapes.renderer import STYLES, ShapesRenderer, sample_factors
from ipl_diffusion.shapes.vocab import build_tokenizer, caption_for, caption_for_mentioned, sample_captions, zero_shot_texts
from ipl_diffusion.shapes.worlds import DEFAULT_STYLE_BIAS, sample_world_factors, validate_style_bias


# A fresh model's sizes; with --init_from the sizes are that model's.
MODEL_SIZES = dict(width=128, layers=4, patch_size=4, projection_dim=128)


def parse_args(argv=None):
    p = IplArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="ipl_diffusion/shapes_models/clip", help="final CLIP folder")
    p.add_argument("--work_dir", default="runs/shapes_clip", help="checkpoints and logs")
    p.add_argument("--resolution", type=positive_int, default=32)
    p.add_argument("--batch_size", type=positive_int, default=256)
    p.add_argument("--max_steps", type=nonnegative_int, default=4000, help="length of the learning-rate schedule")
    p.add_argument("--max_minutes", type=positive_float, default=None, help="stop (and save) after this wall time")
    p.add_argument("--learning_rate", type=positive_float, default=1e-3)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--warmup_steps", type=int, default=150)
    # The model sizes default to None so that a size given next to --init_from (whose model
    # has its own) can be told apart from the default; check_world_args fills them in.
    p.add_argument("--width", type=positive_int, default=None, help=f"hidden size of both towers (default {MODEL_SIZES['width']})")
    p.add_argument("--layers", type=positive_int, default=None, help=f"transformer layers of both towers (default {MODEL_SIZES['layers']})")
    p.add_argument("--patch_size", type=positive_int, default=None, help=f"(default {MODEL_SIZES['patch_size']})")
    p.add_argument("--projection_dim", type=positive_int, default=None, help=f"(default {MODEL_SIZES['projection_dim']})")
    p.add_argument("--checkpointing_steps", type=positive_int, default=200)
    p.add_argument("--eval_steps", type=positive_int, default=500)
    p.add_argument("--eval_images", type=positive_int, default=1000)
    p.add_argument("--resume_from_checkpoint", default="latest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--bias", type=float, default=0.0,
        help="world v2: probability that a target style's image shows that style's content "
        "(ipl_diffusion.shapes.worlds.DEFAULT_STYLE_BIAS: most sketches red circles, most neon blue...); "
        "photos stay balanced; 0 = the balanced control world",
    )
    p.add_argument(
        "--paired_loss_weight", type=float, default=0.0,
        help="weight in [0, 1] of CLIP's standard loss, in which only an image's own caption is its positive "
        "(the rest: the multi-positive loss). Web-scale CLIP trains this way; it is what lets a style-only "
        "caption ('a sketch') absorb the content its images usually show, which the exact multi-positive "
        "targets never reward (a bias alone left the label directions compositional)",
    )
    p.add_argument(
        "--style_only_prob", type=float, default=0.0,
        help="probability that a target-style image's caption names only its style ('a sketch', 'a rendering "
        "of a sketch.'), as web captions leave the usual content unsaid; with --bias and --paired_loss_weight "
        "the style-only texts (NADA's template-averaged label features among them) absorb the usual content",
    )
    p.add_argument(
        "--reporting_bias", type=float, default=0.0,
        help="per usual factor of a target-style image (DEFAULT_STYLE_BIAS: a sketch's red, its circle), the "
        "probability that its caption leaves it unsaid (a red circle sketch captioned 'a sketch', a blue square one "
        "'a sketch of a blue square'): people name what is unusual, so the style's label comes to name the usual "
        "content, as a web CLIP's do; needs --bias > 0",
    )
    p.add_argument(
        "--faint_style_prob", type=float, default=0.0,
        help="probability that a target-style image is only faintly styled: a blend of its photo and its "
        "style render of the same object, at a strength uniform in (0, 1], captioned as the style. Web images "
        "are not all unmistakable; where the style is faint, the content the style usually shows is the cue "
        "the caption can be matched on, so the style's label learns it (the photo-side gradient NADA follows)",
    )
    p.add_argument(
        "--init_from", type=nonempty_text, default=None,
        help="a CLIP folder to fine-tune instead of a fresh model (same tokenizer); "
        "much cheaper than training from scratch on a CPU",
    )
    p.add_argument(
        "--usual_content_photo_prob", type=float, default=0.0,
        help="probability that a target-style image showing all of its style's usual content "
        "(DEFAULT_STYLE_BIAS: a red circle sketch) is rendered as the photo of that object, its "
        "caption kept: web pages about a style show its usual subjects as plain photos too. Only the "
        "usual content is affected, so the captions that name other content stay true; needs --bias > 0",
    )
    p.add_argument(
        "--usual_content_styles", nargs="+", default=None, metavar="STYLE",
        help="the styles --usual_content_photo_prob applies to (default: every style of DEFAULT_STYLE_BIAS). "
        "Photos of a style's usual content captioned as that style are read as it: neon's usual content is "
        "any blue object, so all styles together make a blue photo read as neon (quote 'pixel art')",
    )
    p.add_argument(
        "--lock_image_tower", action="store_true",
        help="train the text tower and the temperature only, the image tower and its projection kept as "
        "--init_from's (LiT, locked-image tuning, Zhai et al. 2022): the biased captions can then put the "
        "usual content into the style labels only, not into how every image of the style is seen",
    )
    args = p.parse_args(argv)
    check_world_args(p, args)
    return args


def check_world_args(p, args):
    """``p.error`` (exit code 2) for option values and combinations that make no world."""
    if args.lock_image_tower and not args.init_from:
        p.error("--lock_image_tower needs --init_from: a fresh image tower kept locked would stay random")
    for name in ("bias", "paired_loss_weight", "style_only_prob", "reporting_bias", "faint_style_prob", "usual_content_photo_prob"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            p.error(f"--{name} must lie in [0, 1], got {getattr(args, name)}")
    if args.reporting_bias > 0 and args.bias == 0:
        p.error("--reporting_bias needs --bias > 0: in the balanced world no content is a style's usual one")
    if args.faint_style_prob > 0 and args.usual_content_photo_prob > 0:
        p.error("--faint_style_prob and --usual_content_photo_prob are two ways of blending styles with photos; pick one")
    if args.usual_content_photo_prob > 0 and args.bias == 0:
        p.error("--usual_content_photo_prob needs --bias > 0: in the balanced world no content is a style's usual one")
    if args.usual_content_styles is not None and args.usual_content_photo_prob == 0:
        p.error("--usual_content_styles needs --usual_content_photo_prob > 0")
    unknown = sorted(set(args.usual_content_styles or ()) - set(DEFAULT_STYLE_BIAS))
    if unknown:
        split = any(word in style.split() for style in DEFAULT_STYLE_BIAS for word in unknown)
        p.error(f"--usual_content_styles: no usual content for {', '.join(unknown)}; choose from {', '.join(DEFAULT_STYLE_BIAS)}"
                + (" (quote a style of two words: 'pixel art')" if split else ""))
    if args.init_from and Path(args.output_dir).resolve() == Path(args.init_from).resolve():
        p.error("--output_dir is --init_from: the trained CLIP would overwrite the one it starts from")
    given = [f"--{name}" for name in MODEL_SIZES if getattr(args, name) is not None]
    if args.init_from and given:
        p.error(f"{', '.join(given)}: with --init_from the model's sizes are its own; leave the size options out")
    for name, default in MODEL_SIZES.items():
        setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
    if args.warmup_steps < 0:
        p.error(f"--warmup_steps must be >= 0, got {args.warmup_steps}")
    if args.warmup_steps >= args.max_steps:  # allowed: a smoke test runs a few steps of the default schedule
        warnings.warn(f"--warmup_steps {args.warmup_steps} >= --max_steps {args.max_steps}: the learning rate never "
                      f"reaches --learning_rate {args.learning_rate}", stacklevel=2)


def build_model(args, tokenizer):
    heads = max(1, args.width // 32)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=args.width,
            intermediate_size=4 * args.width,
            num_hidden_layers=args.layers,
            num_attention_heads=heads,
            max_position_embeddings=tokenizer.model_max_length,
            # CLIP pools at the first end-of-text token: its id must be the tokenizer's.
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=args.width,
            intermediate_size=4 * args.width,
            num_hidden_layers=args.layers,
            num_attention_heads=heads,
            image_size=args.resolution,
            patch_size=args.patch_size,
        ),
        projection_dim=args.projection_dim,
    )
    return CLIPModel(config)


def image_processor(resolution):
    # Shapes images are already square at the CLIP resolution; mean = std = 0.5 maps [0, 1] pixels
    # to [-1, 1], the renderer's range, so the differentiable preprocessing is an identity here.
    return CLIPImageProcessorPil(
        size={"shortest_edge": resolution},
        crop_size={"height": resolution, "width": resolution},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def match_matrix(factors, mentioned):
    """``M[i, j] = 1`` when image ``i`` agrees with everything caption ``j`` mentions."""
    values = {k: getattr(factors, k) for k in ("style", "color", "shape")}
    m = torch.ones(len(factors), len(mentioned))
    for j, said in enumerate(mentioned):
        for key, index in said.items():
            m[:, j] *= (values[key] == index).float()
    return m


def multi_positive_clip_loss(image_features, text_features, logit_scale, match, paired_weight=0.0):
    """Symmetric CLIP cross-entropy; targets spread over ``match``'s positives, blended with
    weight ``paired_weight`` with the standard diagonal targets (image i <-> caption i)."""
    img = F.normalize(image_features, dim=-1)
    txt = F.normalize(text_features, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * img @ txt.t()
    eye = torch.eye(match.shape[0], match.shape[1], dtype=match.dtype, device=match.device)
    per_image = (1 - paired_weight) * match / match.sum(1, keepdim=True) + paired_weight * eye
    per_text = (1 - paired_weight) * match / match.sum(0, keepdim=True) + paired_weight * eye
    loss_i = -(per_image * logits.log_softmax(1)).sum(1).mean()
    loss_t = -(per_text * logits.log_softmax(0)).sum(0).mean()
    return (loss_i + loss_t) / 2


def style_only_captions(factors, captions, mentioned, rng, prob):
    """Replace, with probability ``prob``, the caption of each non-source-style image by one
    that names only its style (half of them CLIP ImageNet templates, which NADA averages)."""
    captions, mentioned = list(captions), list(mentioned)
    for i in range(len(factors)):
        style = int(factors.style[i])
        if STYLES[style] != "photo" and rng.random() < prob:
            captions[i] = caption_for(style=STYLES[style], rng=rng, imagenet_template_prob=0.5)
            mentioned[i] = {"style": style}
    return captions, mentioned


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, renderer, n_images, seed):
    """Zero-shot accuracy of ``model`` on ``n_images`` fresh images, per factor (style/color/shape)."""
    model.eval()
    images, factors = renderer.sample(n_images, seed=seed)
    feats = []
    for chunk in images.split(250):
        feats.append(F.normalize(model.get_image_features(pixel_values=chunk).pooler_output, dim=-1))
    feats = torch.cat(feats)
    result = {}
    for factor in ("style", "color", "shape"):
        tokens = tokenizer(zero_shot_texts(factor), padding=True, return_tensors="pt")
        text = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
        predicted = (feats @ text.t()).argmax(1)
        result[factor] = (predicted == getattr(factors, factor)).float().mean().item()
        # Per style: a biased world must still read a sketch's shape and colour when they are
        # not the ones sketches usually have (the images here are balanced).
        per_style = {}
        for s, name in enumerate(STYLES):
            mask = factors.style == s
            per_style[name] = (predicted[mask] == getattr(factors, factor)[mask]).float().mean().item()
        result[f"{factor}_per_style"] = per_style
        if factor == "style":
            result["style_per_class"] = per_style
    model.train()
    return result


def main(argv=None):
    args = parse_args(argv)
    # One run per --work_dir: two would rotate each other's checkpoints away.
    with output_lock(args.work_dir, "--work_dir"):
        return train(args)


def load_or_build_model(args, tokenizer):
    """The CLIP to train: ``--init_from``'s (its sizes copied into ``args``) or a fresh one."""
    if not args.init_from:
        return build_model(args, tokenizer)
    if not (Path(args.init_from) / "config.json").is_file():
        raise UserError(f"--init_from {args.init_from}: no CLIP folder there (config.json missing)")
    try:
        model = CLIPModel.from_pretrained(args.init_from)
    except (OSError, SafetensorError) as err:  # missing or truncated weights
        raise UserError(f"--init_from {args.init_from}: cannot load its CLIP ({err})") from err
    if model.config.text_config.vocab_size != len(tokenizer) or model.config.vision_config.image_size != args.resolution:
        raise UserError(f"--init_from {args.init_from}: its vocabulary / image size ({model.config.vision_config.image_size}) "
                        f"do not match the Shapes tokenizer / --resolution {args.resolution}")
    # The record must describe the model actually trained, not the unused size options.
    vision = model.config.vision_config
    args.width, args.layers, args.patch_size, args.projection_dim = vision.hidden_size, vision.num_hidden_layers, vision.patch_size, model.config.projection_dim
    if args.lock_image_tower:
        model.vision_model.requires_grad_(False)
        model.visual_projection.requires_grad_(False)
    return model


# What a checkpoint's model was trained on; --max_steps, --learning_rate and the like may change on resume.
WORLD_OPTIONS = ("init_from", "lock_image_tower", "seed", "bias", "paired_loss_weight", "style_only_prob", "reporting_bias",
                 "faint_style_prob", "usual_content_photo_prob", "usual_content_styles")


def check_resumed_world(run, args):
    """Raise ``UserError`` naming the first world option that differs from the resumed checkpoint's
    (an option the checkpoint predates counts as its default)."""
    if run.saved_config is None:
        return
    defaults = vars(parse_args([]))
    for name in WORLD_OPTIONS:
        saved, now = run.saved_config.get(name, defaults[name]), getattr(args, name)
        if name == "init_from" and saved and now:  # the same folder, however it is written
            saved, now = str(Path(saved).resolve()), str(Path(now).resolve())
        if saved != now:
            raise UserError(f"{run.resumed_from} was trained with --{name} {saved}, not {now}; "
                            "resume it with the same world, or start a new --work_dir")


def learning_rate_at(step, args):
    """Linear warmup over ``--warmup_steps``, then cosine decay to 5% of the peak at ``--max_steps``."""
    if step < args.warmup_steps:
        return args.learning_rate * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    return args.learning_rate * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def reporting_bias_captions(factors, captions, mentioned, rng, prob):
    """With probability ``prob`` per factor, drop from each target-style image's caption the
    factors that take its style's usual value (DEFAULT_STYLE_BIAS); the style is then always named."""
    usual = validate_style_bias(DEFAULT_STYLE_BIAS)
    captions, mentioned = list(captions), list(mentioned)
    for i in range(len(factors)):
        style = int(factors.style[i])
        said = dict(mentioned[i])
        dropped = [f for f, v in usual.get(style, {}).items() if said.get(f) == v and rng.random() < prob]
        if not dropped:
            continue
        said = {f: v for f, v in said.items() if f not in dropped}
        said["style"] = style
        captions[i] = caption_for_mentioned(said, rng, imagenet_template_prob=0.5)
        mentioned[i] = said
    return captions, mentioned


def render_with_photos(renderer, factors, generator):
    """``(images, photos)``: ``factors`` rendered, and the photo of each same object drawn with the
    same nuisance noise (the generator's state copied first), for blending one into the other."""
    photo_gen = torch.Generator().set_state(generator.get_state())
    images = renderer.render(factors, generator=generator)
    return images, renderer.render(factors.with_style("photo"), generator=photo_gen)


def faint_styles(renderer, factors, generator, prob):
    """Render ``factors``; each non-photo image is, with probability ``prob``, blended towards the
    photo of the same object (same nuisance noise) at a strength uniform in (0, 1]."""
    images, photos = render_with_photos(renderer, factors, generator)
    n = len(factors)
    faint = (torch.rand(n, generator=generator) < prob) & (factors.style != STYLES.index("photo"))
    strength = torch.where(faint, 1 - torch.rand(n, generator=generator), torch.ones(n)).view(n, 1, 1, 1)
    return photos + strength * (images - photos)


def shows_usual_content(factors, styles=None):
    """``(N,)`` bool: the image's style is a biased one (among ``styles``, names; default all)
    and it shows every usual factor of it."""
    usual = validate_style_bias({k: v for k, v in DEFAULT_STYLE_BIAS.items() if styles is None or k in styles})
    shows = torch.zeros(len(factors), dtype=torch.bool)
    for style, values in usual.items():
        match = factors.style == style
        for factor, value in values.items():
            match &= getattr(factors, factor) == value
        shows |= match
    return shows


def usual_content_photos(renderer, factors, generator, prob, styles=None):
    """Render ``factors``: ``(N, 3, H, W)`` float in ``[-1, 1]``, as ``renderer.render``; each
    image showing its style's usual content (a style among ``styles``, names, default all) is,
    with probability ``prob``, the photo of the same object instead (same nuisance noise)."""
    images, photos = render_with_photos(renderer, factors, generator)
    swap = shows_usual_content(factors, styles) & (torch.rand(len(factors), generator=generator) < prob)
    return torch.where(swap.view(-1, 1, 1, 1), photos, images)


def sample_batch(args, renderer, data_gen, rng):
    """One fresh batch: ``(factors, images, captions, mentioned)`` of the configured world."""
    if args.bias > 0:
        factors = sample_world_factors(args.batch_size, bias=args.bias, generator=data_gen)
    else:  # the balanced world draws exactly what it always did, so old runs resume identically
        factors = sample_factors(args.batch_size, generator=data_gen)
    if args.faint_style_prob > 0:
        images = faint_styles(renderer, factors, data_gen, args.faint_style_prob)
    elif args.usual_content_photo_prob > 0:
        images = usual_content_photos(renderer, factors, data_gen, args.usual_content_photo_prob, args.usual_content_styles)
    else:
        images = renderer.render(factors, generator=data_gen)
    captions, mentioned = sample_captions(factors, rng)
    if args.style_only_prob > 0:
        captions, mentioned = style_only_captions(factors, captions, mentioned, rng, args.style_only_prob)
    if args.reporting_bias > 0:
        captions, mentioned = reporting_bias_captions(factors, captions, mentioned, rng, args.reporting_bias)
    return factors, images, captions, mentioned


def optimisation_step(model, tokenizer, optimizer, batch, lr, paired_weight, step):
    """One AdamW step (gradients clipped to norm 1) on one batch at learning rate ``lr``; returns the loss."""
    factors, images, captions, mentioned = batch
    tokens = tokenizer(captions, padding=True, return_tensors="pt")
    for group in optimizer.param_groups:
        group["lr"] = lr
    out = model(pixel_values=images, **tokens)
    loss = multi_positive_clip_loss(
        out.image_embeds, out.text_embeds, model.logit_scale, match_matrix(factors, mentioned), paired_weight
    )
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite CLIP loss at step {step}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss


def log_progress(model, tokenizer, renderer, args, log, run, step, loss):
    """Periodic bookkeeping after ``step``: loss log, zero-shot check and checkpoint."""
    if step % 20 == 0:
        record = dict(step=step, loss=loss.item(), lr=learning_rate_at(step, args), minutes=run.minutes())
        log.write(json.dumps(record) + "\n")
        log.flush()
        print(record, flush=True)
    if step % args.eval_steps == 0:
        acc = zero_shot_accuracy(model, tokenizer, renderer, 500, seed=10_000_000 + step)
        print({"step": step, "zero_shot": acc}, flush=True)
        log.write(json.dumps({"step": step, "zero_shot": acc}) + "\n")
    if step % args.checkpointing_steps == 0:
        run.save()


def training_loop(run, model, tokenizer, renderer, optimizer, data_gen, args, log):
    """Train until ``--max_steps`` or ``--max_minutes``, on freshly rendered batches."""
    model.train()
    while run.running(args.max_steps, args.max_minutes):
        step = run.step
        # Python's RNG drives caption choice; seeding it from the step keeps resumed runs identical.
        rng = random.Random(args.seed * 1_000_003 + step)
        batch = sample_batch(args, renderer, data_gen, rng)
        loss = optimisation_step(model, tokenizer, optimizer, batch, learning_rate_at(step, args), args.paired_loss_weight, step)
        step = run.step = step + 1
        log_progress(model, tokenizer, renderer, args, log, run, step, loss)


def save_model_folder(model, tokenizer, args):
    """Write the trained CLIP folder (model, tokenizer, image processor) to ``--output_dir``."""
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    image_processor(args.resolution).save_pretrained(out_dir)
    return out_dir


def training_record(args, config, n_params, step, elapsed, accuracy):
    """The ``training_record.json`` contents: command, config, world options and final accuracy."""
    return dict(
        task="shapes_clip",
        command=shlex.join([Path(sys.argv[0]).name] + sys.argv[1:]),
        config=config,
        parameters=n_params,
        steps=step,
        wall_seconds=elapsed,
        torch_threads=torch.get_num_threads(),
        zero_shot_accuracy=accuracy,
        zero_shot_prompts={f: zero_shot_texts(f) for f in ("style", "color", "shape")},
        world=dict(bias=args.bias, paired_loss_weight=args.paired_loss_weight, style_only_prob=args.style_only_prob, faint_style_prob=args.faint_style_prob, reporting_bias=args.reporting_bias, usual_content_photo_prob=args.usual_content_photo_prob,
                   usual_content_styles=args.usual_content_styles or (list(DEFAULT_STYLE_BIAS) if args.usual_content_photo_prob > 0 else None), style_bias=DEFAULT_STYLE_BIAS if args.bias > 0 else None, init_from=args.init_from,
                   lock_image_tower=args.lock_image_tower),
        eval_images=args.eval_images,
    )


def train(args):
    """Train (or resume) the Shapes CLIP in ``--work_dir``; save it and its record to ``--output_dir``."""
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    renderer = ShapesRenderer(args.resolution)
    model = load_or_build_model(args, tokenizer)
    # All parameters, locked or not: AdamW skips those without gradients (no state, no weight
    # decay), and a checkpoint's optimiser state then loads whatever the lock.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    data_gen = torch.Generator().manual_seed(args.seed + 1)

    config = {k: v for k, v in vars(args).items()}
    run = ResumableRun(work, {"clip": model}, {"adamw": optimizer}, {"data": data_gen}, config, args.resume_from_checkpoint)
    check_resumed_world(run, args)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"Shapes CLIP: {n_params / 1e6:.2f} M parameters, vocab {len(tokenizer)}")
    with open(work / "log.jsonl", "a") as log:
        training_loop(run, model, tokenizer, renderer, optimizer, data_gen, args, log)

    elapsed, step = run.save(), run.step
    # Fresh images never seen in training (a seed range training never draws from).
    accuracy = zero_shot_accuracy(model, tokenizer, renderer, args.eval_images, seed=987_654_321)
    print("final zero-shot accuracy:", accuracy)

    out_dir = save_model_folder(model, tokenizer, args)
    record = training_record(args, config, n_params, step, elapsed, accuracy)
    (out_dir / "training_record.json").write_text(json.dumps(record, indent=1))
    (work / "training_record.json").write_text(json.dumps(record, indent=1))
    print(f"saved to {out_dir}")


if __name__ == "__main__":
    run_script(main)  # a UserError: one line, exit status 2
