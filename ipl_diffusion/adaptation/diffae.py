"""Diff-IPL end to end: encode the sources, Stage 1 (Eq. 6), Stage 2 (Eq. 7-9) on a DiffAE.

1. the source images are encoded once -- ``z_sem`` by the semantic encoder, ``x_{t0}`` by
   DiffusionCLIP's deterministic DDIM inversion to ``t0`` with the *source* UNet
   (:func:`ipl_diffusion.ddim.invert_to_t0`) -- and cached in ``cache.safetensors``;
2. Stage 1 learns the prompt vectors on a pool of ``z_sem`` and CLIP image features
   (:func:`ipl_diffusion.prompt_learning.learn_prompts`), saved in ``stage1/``
   (:mod:`ipl_diffusion.adaptation.stage1`);
3. Stage 2 fine-tunes a copy of the UNet (:class:`~ipl_diffusion.adaptation.diffae_trainer.DiffAEStage2Trainer`).

:func:`adapt_pipeline` is what ``IPLPipeline.adapt`` calls: it resolves the options
(:func:`ipl_diffusion.configs.resolve_configs`), prepares the source images and returns the
adapted pipeline. :func:`adapt_diffae` is the same run on given tensors and configs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import torch

from ipl_diffusion import checkpointing, ddim
from ipl_diffusion.adaptation import image_target
from ipl_diffusion.adaptation import stage1 as stage1_store
from ipl_diffusion.adaptation.diffae_trainer import DiffAEStage2Trainer
from ipl_diffusion.adaptation.distributed import check_weights_dtype, gather_in_order, make_accelerator, shard_indices
from ipl_diffusion.adaptation.trainer import frozen
from ipl_diffusion.configs import DiffAEStage2Config, Stage1Config, as_dict, resolve_configs
from ipl_diffusion.errors import UserError


@dataclass
class DiffIPLResult:
    """What :func:`adapt_diffae` returns: the adapted UNet, Stage 1's prompt module, the
    before/after grid (PIL, main process), the Stage-2 history, the run's options and the
    ``(N, D)`` source / target prompt features of the Stage-2 images (with ``target_images``,
    the ``-/+ ΔT_i^img / 2`` pairs Stage 2 used, :mod:`ipl_diffusion.adaptation.image_target`)."""

    unet: torch.nn.Module
    mapper: torch.nn.Module | None
    sample_grid: object | None
    history: list
    run_config: dict
    source_text_features: torch.Tensor
    target_text_features: torch.Tensor


# ----------------------------------------------------------------------- the cache


@torch.no_grad()
def encode_sources(semantic_encoder, source_unet, scheduler, images: torch.Tensor, t0: int, num_inversion_steps: int,
                   batch_size: int = 8, accelerator=None, progress: bool = True) -> dict[str, torch.Tensor]:
    """Encode the source images once (step 1).

    Args:
        images: ``(N, 3, H, W)`` float in ``[-1, 1]`` (any device).
    Returns:
        CPU float32 tensors: ``x0`` (the inputs, the source images of ``ΔI``), ``z_sem (N, 512)``
        and ``x_t0`` (inversion to ``t0`` with the source UNet). With several processes each
        encodes every ``world``-th image and the results are gathered.
    """
    from tqdm.auto import tqdm

    device = next(source_unet.parameters()).device
    n = images.shape[0]
    mine, order = shard_indices(n, accelerator)
    parts = {"z_sem": [], "x_t0": []}
    main = accelerator is None or accelerator.is_local_main_process
    for start in tqdm(range(0, len(mine), batch_size), desc="Encoding source images", disable=not (progress and main)):
        x0 = images[mine[start : start + batch_size]].to(device, torch.float32)
        z_sem = semantic_encoder(x0)
        parts["z_sem"].append(z_sem.float())
        parts["x_t0"].append(ddim.invert_to_t0(source_unet, x0, z_sem, scheduler, t0, num_inversion_steps).float())
    result = {"x0": images.detach().float().cpu()}
    for key, chunks in parts.items():
        result[key] = gather_in_order(torch.cat(chunks), order, n, accelerator)
    return result


def _load_cache(cache_file: Path, images: torch.Tensor, key: dict) -> dict | None:
    """The saved encodings when they were made from the same images with the same options."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not cache_file.is_file():
        return None
    with safe_open(str(cache_file), "pt") as handle:
        metadata = handle.metadata() or {}
    if json.loads(metadata.get("key", "null")) != key:
        return None
    cache = load_file(str(cache_file))
    checkpointing.verify_tensors(cache_file, cache, metadata)  # resume from damaged codes: refused
    if cache["x0"].shape != images.shape or not torch.equal(cache["x0"], images.detach().float().cpu()):
        return None
    return cache


def _save_cache(cache_file: Path, cache: dict, key: dict) -> None:
    from ipl_diffusion.outputs import atomic_save_safetensors

    digest = checkpointing.tensors_sha256(cache)  # checked when a resume reuses the cache
    atomic_save_safetensors({k: v.contiguous() for k, v in cache.items()}, cache_file,
                            metadata={"key": json.dumps(key), "sha256": digest})


@torch.no_grad()
def encode_pool(semantic_encoder, image_features, images: torch.Tensor, device, batch_size: int = 64):
    """Stage 1's pool: ``(z_sem (N, 512), CLIP image features (N, D))`` of ``images``
    ``(N, 3, H, W)`` in ``[-1, 1]`` -- no DDIM: Stage 1 sees only these two."""
    z, f = [], []
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size].to(device, torch.float32)
        z.append(semantic_encoder(x).float())
        f.append(image_features(x).float())
    return torch.cat(z), torch.cat(f)


# ------------------------------------------------------------------------- Stage 1


def run_stage1(encoder, z_sem, image_features, source, target, config: Stage1Config, seed: int, progress=True,
               anchor=None):
    """IPL Stage 1 on a pool of cached features; returns the ``PromptLearner``.

    ``z_sem (N, 512)`` is the mapper input (Eq. 2), ``image_features (N, D)`` the CLIP
    features of the same images. The last :func:`~ipl_diffusion.adaptation.stage1.heldout_size`
    of them are held out for the prompt-retrieval diagnostic (``learner.heldout_retrieval``).
    ``anchor``: Eq. 5's target feature ``(D,)`` in place of the label's (an image target).
    """
    from ipl_diffusion.prompt_learning import learn_prompts

    k = stage1_store.heldout_size(z_sem.shape[0])
    train = slice(0, z_sem.shape[0] - k)
    return learn_prompts(encoder, z_sem[train], source, target, config, image_features=image_features[train],
                         heldout=(z_sem[-k:], image_features[-k:]) if k else None, seed=seed, progress=progress,
                         target_label_features=anchor)


def _stage1(models, encoder, image_features, stage1_images, source, target, stage1, stage2, out, resume, accelerator,
            progress, anchor=None):
    """Stage 1's ``PromptLearner``: the saved one of a resumed run with the same options,
    else trained now (every process, same seed: the same prompts without a broadcast).
    ``anchor``: an image target's Eq. 5 anchor ``(D,)`` (:mod:`.image_target`)."""
    key = {"source": source, "target": target, "seed": stage2.seed, "stage1": as_dict(stage1),
           "stage1_images": checkpointing.tensors_sha256({"x": stage1_images.float()})}
    if anchor is not None:
        key["anchor"] = checkpointing.tensors_sha256({"anchor": anchor.float().cpu()})
    learner = stage1_store.load_stage1(out, key, encoder) if resume is not None else None
    if learner is None:
        pool = encode_pool(models.semantic_encoder, image_features, stage1_images, accelerator.device)
        learner = run_stage1(encoder, *pool, source, target, stage1, stage2.seed, progress and accelerator.is_local_main_process,
                             anchor=anchor)
        if accelerator.is_main_process:
            stage1_store.save_stage1(out, key, learner)
    return learner


# ------------------------------------------------------------------------- the run


def _check_images(**tensors):
    for name, x in tensors.items():
        if x is not None and (x.ndim != 4 or x.shape[1] != 3 or x.shape[0] < 1):
            raise UserError(f"{name} must be (N, 3, H, W) in [-1, 1] with N >= 1; got {tuple(x.shape)}")


def _encoded_sources(models, images, stage2, out, resume, accelerator, progress):
    """The Stage-2 cache (:func:`encode_sources`), reused from ``out`` on resume."""
    key = {"t0": stage2.t0, "num_inversion_steps": stage2.num_inversion_steps}
    cache_file = out / checkpointing.STAGE2_CACHE_NAME if out is not None else None
    cache = _load_cache(cache_file, images, key) if (cache_file is not None and resume) else None
    if cache is None:
        cache = encode_sources(models.semantic_encoder, models.source_unet, models.scheduler, images, stage2.t0,
                               stage2.num_inversion_steps, accelerator=accelerator, progress=progress)
        if cache_file is not None and accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            _save_cache(cache_file, cache, key)
    return cache


def _run_config(models, images, source, target, stage1, stage2, accelerator) -> dict:
    return {"backend": "diffae", "source": source, "target": target, "base_model": models.config.base_model,
            "seed": stage2.seed, "num_source_images": int(images.shape[0]), "image_size": int(images.shape[-1]),
            "num_processes": accelerator.num_processes, "stage1": as_dict(stage1), "stage2": as_dict(stage2)}


@dataclass
class DiffIPLImages:
    """The images of one Diff-IPL run, each ``(N, 3, H, W)`` float in ``[-1, 1]``.

    ``images``: Stage 2's sources (and, with ``target_images``, the image direction's start);
    ``stage1_images``: Stage 1's pool (default ``images``; a fifth of it, at most 256, is held out
    to measure how the prompts carry over to unseen images); ``validation_images``: what the
    returned ``sample_grid`` shows (default: the first ``images``), e.g. photos the run never
    trained on, and, with ``candidate_steps`` (:mod:`~ipl_diffusion.adaptation.step_choice`),
    the held-out photos every candidate is scored on (required then, >= 2); ``target_images``:
    style images defining the target (:mod:`ipl_diffusion.adaptation.image_target`).
    """

    images: torch.Tensor
    stage1_images: torch.Tensor | None = None
    validation_images: torch.Tensor | None = None
    target_images: torch.Tensor | None = None

    def __post_init__(self):
        _check_images(images=self.images, stage1_images=self.stage1_images,
                      validation_images=self.validation_images, target_images=self.target_images)

    @property
    def pool(self) -> torch.Tensor:
        return self.images if self.stage1_images is None else self.stage1_images


def adapt_diffae(models, data: DiffIPLImages, source: str, target: str | None, stage1: Stage1Config | None = None,
                 stage2: DiffAEStage2Config | None = None, *, prompt_learner=None, output_dir=None,
                 resume_from_checkpoint=None, overwrite: bool = False, accelerator=None,
                 progress: bool = True) -> DiffIPLResult:
    """Diff-IPL on the source images of ``data`` (:class:`DiffIPLImages`).

    Args:
        models: the source ``IPLPipeline`` (or any object with its ``semantic_encoder``,
            ``source_unet``, ``scheduler``, ``text_encoder`` (a ``CLIPModel``), ``tokenizer``,
            ``feature_extractor`` and ``config.base_model``); never modified.
        source / target: domain labels (checked: empty / too long raise ``UserError``);
            ``target`` may be ``None`` when ``data.target_images`` define the target.
        stage1 / stage2: the options (default: the configs' defaults).
        prompt_learner: a ready Stage-1 result (anything with ``text_features(z_sem (B, 512),
            label) -> (B, D)``): Stage 1 is skipped.
        output_dir: ``run_config.json``, ``cache.safetensors``, ``stage1/``, checkpoints,
            grids and ``losses.csv`` go there (main process); ``resume_from_checkpoint="latest"``
            continues an interrupted run bit for bit.
        overwrite: a fresh run replaces the earlier run's checkpoints in ``output_dir`` instead
            of being refused, once every input, label and option has passed its check.

    Raises:
        UserError: bad labels, images or options, half-precision weights on a CPU, a damaged
            cache / checkpoint; NonFiniteLossError (a ``UserError``): a NaN / inf loss.
    """
    from ipl_diffusion.clip_image import clip_image_features
    from ipl_diffusion.clip_text import CLIPPromptEncoder

    stage1, stage2 = stage1 or Stage1Config(), stage2 or DiffAEStage2Config()
    accelerator = accelerator or make_accelerator(stage2.mixed_precision, next(models.source_unet.parameters()).device)
    check_weights_dtype({"semantic_encoder": models.semantic_encoder, "source_unet": models.source_unet,
                         "text_encoder": models.text_encoder}, accelerator.device)
    if stage2.candidate_steps:  # before any encoding or Stage 1
        _check_step_choice(data, target)
    encoder = CLIPPromptEncoder(models.text_encoder, models.tokenizer)
    target, label_given = image_target.resolve_label(target, data.target_images is not None)
    source, target = _checked_labels(models, source, target, stage1, stage2, prompt_learner)
    out = Path(output_dir) if output_dir is not None else None
    if out is not None:  # before the cache / Stage 1 are written
        identity = {"source": source, "target": target, "stage1": as_dict(stage1), "stage2": as_dict(stage2)}
        checkpointing.prepare_checkpoint_folder(out / "checkpoints", resume_from_checkpoint, identity, overwrite,
                                                accelerator)
    for module in (models.semantic_encoder, models.source_unet, models.text_encoder):
        module.to(accelerator.device).eval()
    run = _Run(models, encoder, clip_image_features(models.text_encoder, models.feature_extractor), stage1, stage2,
               out, resume_from_checkpoint, accelerator, progress)
    run_config = _run_config(models, data.images, source, target, stage1, stage2, accelerator)
    with frozen(models.semantic_encoder, models.source_unet, models.text_encoder):
        cache = _encoded_sources(models, data.images, stage2, out, resume_from_checkpoint, accelerator, progress)
        learner, src_text, tgt_text = _prompt_features(run, data, cache, source, target, label_given,
                                                       prompt_learner, run_config)
        if out is not None and accelerator.is_main_process:
            (out / "run_config.json").write_text(json.dumps(run_config, indent=2))
        trainer = DiffAEStage2Trainer(
            models.source_unet, models.scheduler, cache, src_text, tgt_text, run.image_features, stage2,
            identity_features=models.semantic_encoder if stage2.id_loss_weight > 0 else None,
            accelerator=accelerator, output_dir=out, run_config=run_config,
        )
        shown = _encoded_validation(models, data.validation_images, stage2)
        if stage2.candidate_steps:
            labels = [encoder.label_features(x, templates=stage1.label_templates) for x in (source, target)]
            trainer.enable_step_choice(run.image_features, *labels, heldout=shown)
        unet = trainer.train(resume_from_checkpoint=resume_from_checkpoint, progress=progress)
        if "step_choice" in run_config and out is not None and accelerator.is_main_process:
            (out / "run_config.json").write_text(json.dumps(run_config, indent=2))  # now with the choice
        grid = trainer.sample_grid(unet, items=shown) if accelerator.is_main_process else None
    return DiffIPLResult(unet=unet, mapper=getattr(learner, "prompt_module", None), sample_grid=grid,
                         history=trainer.history, run_config=run_config,
                         source_text_features=src_text.cpu(), target_text_features=tgt_text.cpu())


def _check_step_choice(data: DiffIPLImages, target) -> None:
    """The step choice (``candidate_steps``) scores held-out photos along the target label's
    CLIP direction: both must be there. Raises :class:`UserError`."""
    if data.validation_images is None or data.validation_images.shape[0] < 2:
        raise UserError("the step choice (candidate_steps) scores held-out photos the run does not train on: "
                        "pass >= 2 validation_images (ipl adapt --validation_images FOLDER)")
    if target is None:
        raise UserError("the step choice (candidate_steps) scores along the target label's CLIP direction: "
                        "give a target label with the target_images")


def _encoded_validation(models, validation_images, stage2):
    """The held-out photos encoded (:func:`encode_sources`; every process, so the step choice
    scores alike everywhere), or None: what the before/after grid shows and the step choice scores."""
    if validation_images is None:
        return None
    return encode_sources(models.semantic_encoder, models.source_unet, models.scheduler, validation_images,
                          stage2.t0, stage2.num_inversion_steps, progress=False)


@dataclass
class _Run:
    """What the steps of one :func:`adapt_diffae` call share."""

    models: object
    encoder: object
    image_features: Callable
    stage1: Stage1Config
    stage2: DiffAEStage2Config
    out: Path | None
    resume: object
    accelerator: object
    progress: bool


def _prompt_features(run, data, cache, source, target, label_given, prompt_learner, run_config):
    """Stage 1 (or the given ``prompt_learner``) and the per-image source / target prompt
    features of the Stage-2 images, ``(learner, (N, D), (N, D))``; with target images, ΔT_i
    becomes ``d + (u_i - ū)`` (:mod:`ipl_diffusion.adaptation.image_target`)."""
    goal = anchor = None
    if data.target_images is not None:  # the Stage-2 source images are the image direction's start
        goal, anchor = image_target.setup(run.encoder, run.image_features, data.target_images,
                                          image_target.unit_features(run.image_features, cache["x0"]), source, target,
                                          label_given, run.stage1.label_templates)
        run_config["target_images"] = goal.report(label_given)
    learner = prompt_learner or _stage1(run.models, run.encoder, run.image_features, data.pool, source, target,
                                        run.stage1, run.stage2, run.out, run.resume, run.accelerator, run.progress, anchor)
    k = stage1_store.heldout_size(data.pool.shape[0]) if prompt_learner is None else 0
    run_config["stage1"].update(stage1_store.stage1_report(learner, data.pool.shape[0] - k, k))
    src_text, tgt_text = stage1_store.prompt_text_features(learner, cache["z_sem"].to(run.accelerator.device), source, target)
    if goal is not None:
        src_text, tgt_text = image_target.stage2_features(learner, goal, src_text, tgt_text)
    return learner, src_text, tgt_text


# ------------------------------------------------------------------ from the pipeline


def _source_images(pipe, images, count, stage2, seed, offset=0):
    """``images`` preprocessed, or ``count`` sampled with the source model (latent net for
    ``z_sem``, source UNet for ``x``) from the run's seed."""
    if images is not None:
        return pipe.preprocess(images)
    generator = torch.Generator().manual_seed(seed + offset)
    return pipe.sample(num_images=count, generator=generator, num_inference_steps=stage2.num_inference_steps,
                       output_type="latent", source=True).images


def _checked_labels(models, source, target, stage1, stage2, prompt_learner):
    """The checks of :func:`adapt_diffae` that need no images, which ``adapt_pipeline`` also makes
    before it samples or encodes any (minutes at 256²): ``t0`` against the scheduler, the labels
    against the CLIP, with Stage 1's ``n_ctx`` prompt vectors before them. Returns the cleaned
    labels (``None`` stays ``None``); ``UserError`` otherwise."""
    from ipl_diffusion.clip_text import CLIPPromptEncoder

    ddim.check_t0(stage2.t0, models.scheduler)
    encoder = CLIPPromptEncoder(models.text_encoder, models.tokenizer)
    n_ctx = stage1.n_ctx if prompt_learner is None else 0  # a given prompt learner skips Stage 1
    return tuple(None if label is None else encoder.validate_label(label, n_ctx=n_ctx) for label in (source, target))


def adapt_pipeline(pipe, target: str | None, source=None, images=None, stage1_images=None, validation_images=None, *,
                   target_images=None, prompt_learner=None, output_dir=None, resume_from_checkpoint=None,
                   overwrite: bool = False, accelerator=None, progress: bool = True, **options):
    """``IPLPipeline.adapt``: resolve the options (the configs' defaults, then the pipeline's
    recorded ``adapt_defaults``, then ``options``), sample the sources the caller did not give
    (with ``candidate_steps`` and no ``images``, also ``num_candidate_images`` held-out ones for
    the step choice, from another seed stream), load the ``target_images``
    (:func:`~ipl_diffusion.adaptation.image_target.load_target_images`), run :func:`adapt_diffae`
    and return ``pipe.with_adaptation(result)``.

    Raises:
        UserError: an unknown option (with the nearest names), a label the pipeline's CLIP
            does not know, a pipeline without CLIP, or anything :func:`adapt_diffae` refuses.
    """
    if pipe.text_encoder is None or pipe.tokenizer is None:
        raise UserError("adapt needs the CLIP text_encoder and tokenizer components; this pipeline has none")
    stage1, stage2 = resolve_configs("diffae", pipe.config.get("adapt_defaults"), options)
    source = source or pipe.config.source_label or "Photo"
    pipe.check_known_domains(source, *([target] if target is not None else []))
    style = None if target_images is None else image_target.load_target_images(
        target_images, int(pipe.text_encoder.config.vision_config.image_size))
    check_weights_dtype({"semantic_encoder": pipe.semantic_encoder, "source_unet": pipe.source_unet,
                         "text_encoder": pipe.text_encoder}, accelerator.device if accelerator is not None else pipe.device)
    _checked_labels(pipe, source, target, stage1, stage2, prompt_learner)
    with pipe.guard_output_dir(output_dir, resume_from_checkpoint, overwrite):  # before the (slow) sampling / encoding
        x0 = _source_images(pipe, images, stage2.num_images, stage2, stage2.seed)
        pool = None
        if stage1_images is not None or stage1.stage1_num_images is not None:
            pool = _source_images(pipe, stage1_images, stage1.stage1_num_images, stage2, stage2.seed, offset=10_007)
        shown = pipe.preprocess(validation_images) if validation_images is not None else None
        if shown is None and images is None and stage2.candidate_steps:  # sampled sources: sample held-out ones too
            shown = _source_images(pipe, None, stage2.num_candidate_images, stage2, stage2.seed, offset=20_011)
        data = DiffIPLImages(x0, stage1_images=pool, validation_images=shown, target_images=style)
        result = adapt_diffae(pipe, data, source, target, stage1, stage2, prompt_learner=prompt_learner, output_dir=output_dir,
                              resume_from_checkpoint=resume_from_checkpoint, overwrite=overwrite,
                              accelerator=accelerator, progress=progress)
    return pipe.with_adaptation(result)
