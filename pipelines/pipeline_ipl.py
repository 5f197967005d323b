"""``IPLPipeline``: Diff-IPL -- zero-shot adaptation of a diffusion autoencoder with
Image-specific Prompt Learning, and real-image translation with the adapted model.

Usage::

    from ipl_diffusion import IPLPipeline

    pipe = IPLPipeline.from_pretrained("path/or/hub-id")     # a source DiffAE + CLIP
    adapted = pipe.adapt("Wall painting", source="Photo", images="faces/")
    out = adapted(["me.jpg"], output_type="pil").images      # translate real images
    adapted.save_pretrained("ffhq-wall-painting")
    adapted.push_to_hub("me/ffhq-wall-painting")

Components (all diffusers / transformers objects, saved as safetensors + JSON):

* ``semantic_encoder`` -- DiffAE semantic encoder, image -> ``z_sem (B, 512)``;
* ``source_unet`` -- the source DiffAE UNet ``(x_t, t, z_sem) -> eps`` (never trained);
* ``scheduler`` -- a ``DDIMScheduler`` whose ``alphas_cumprod`` define the diffusion;
* ``unet`` -- the adapted UNet (``None`` until :meth:`adapt` has run: a *source* pipeline);
* ``text_encoder`` / ``tokenizer`` -- the CLIP model and its tokenizer that guide adaptation;
* ``mapper`` -- the latent mapper of Stage 1 (Eq. 2), ``None`` for the manual scheme;
* ``latent_net`` / ``latent_scheduler`` -- DiffAE's latent DDIM, to sample ``z_sem`` when no
  source images are given (optional);
* ``feature_extractor`` -- the CLIP image processor config (mean / std / size; optional).

Config (``model_index.json``): ``source_label``, ``target_label``, ``base_model`` and
``adaptation`` (every hyper-parameter of the run that produced ``unet``).

Translation follows DiffusionCLIP: images are inverted with the *source* UNet to ``t0`` by
deterministic DDIM and decoded with the adapted UNet. diffusers 0.42 only loads custom
components whose module is already imported, hence the imports of our model modules below.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

# Imported for their side effect too: from_pretrained needs these modules in sys.modules.
import ipl_diffusion.mapper  # noqa: F401
import ipl_diffusion.models  # noqa: F401
from ipl_diffusion import ddim
from ipl_diffusion.adaptation import diffae as diff_ipl
from ipl_diffusion.configs import DiffAEStage2Config
from ipl_diffusion.pipelines.adapted_pipeline import AdaptedPipelineMixin
from ipl_diffusion.pipelines.hub_layout import RemoteCodeLayoutMixin
from ipl_diffusion.pipelines.loading import clip_components, load_pipeline
from ipl_diffusion.pipelines.model_card import build_model_card, summarize_history
from ipl_diffusion.errors import UserError
from ipl_diffusion.pipelines.pipeline_diffae import XFormersFallbackPipelineMixin, check_codes, sample_z_sem

# Inference options fall back to the Diff-IPL defaults when neither the run nor the model set them.
_INFERENCE_DEFAULTS = DiffAEStage2Config()
_COMPONENTS = (
    "semantic_encoder",
    "source_unet",
    "scheduler",
    "unet",
    "text_encoder",
    "tokenizer",
    "mapper",
    "latent_net",
    "latent_scheduler",
    "feature_extractor",
)


class IPLPipeline(AdaptedPipelineMixin, RemoteCodeLayoutMixin, XFormersFallbackPipelineMixin, DiffusionPipeline):
    r"""Diff-IPL pipeline: adapt (:meth:`adapt`), translate (``__call__``), sample (:meth:`sample`).

    See the module docstring for the components. Construct it from a folder or Hub id with
    :meth:`from_pretrained`, or from parts with :meth:`from_components`.
    """

    model_cpu_offload_seq = "semantic_encoder->source_unet->unet"
    _optional_components = [
        "unet",
        "text_encoder",
        "tokenizer",
        "mapper",
        "latent_net",
        "latent_scheduler",
        "feature_extractor",
    ]

    def __init__(
        self,
        semantic_encoder,
        source_unet,
        scheduler: DDIMScheduler,
        unet=None,
        text_encoder=None,
        tokenizer=None,
        mapper=None,
        latent_net=None,
        latent_scheduler=None,
        feature_extractor=None,
        source_label: str = "Photo",
        target_label: Optional[str] = None,
        base_model: Optional[str] = None,
        adaptation: Optional[dict] = None,
        adapt_defaults: Optional[dict] = None,
        known_domains: Optional[list] = None,
        run_summary: Optional[dict] = None,
    ):
        super().__init__()
        self.register_modules(
            semantic_encoder=semantic_encoder,
            source_unet=source_unet,
            scheduler=scheduler,
            unet=unet,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            mapper=mapper,
            latent_net=latent_net,
            latent_scheduler=latent_scheduler,
            feature_extractor=feature_extractor,
        )
        self.register_to_config(
            source_label=source_label,
            target_label=target_label,
            base_model=base_model,
            adaptation=adaptation,
            adapt_defaults=adapt_defaults,
            known_domains=known_domains,
            run_summary=run_summary,
        )
        self.sample_grid = None  # PIL before/after grid of the adaptation run, saved beside the weights

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a folder written by :meth:`save_pretrained` or a Hub id.

        The shipped Shapes folder (``ipl_diffusion.shapes.default_model_path()``) holds no CLIP:
        its ``text_encoder`` / ``tokenizer`` / ``feature_extractor`` come from the package's
        ``clip/`` unless passed (:func:`ipl_diffusion.pipelines.loading.load_pipeline`).

        Raises:
            FileNotFoundError: the folder lacks ``model_index.json`` or a component's
                sub-folder (named in the message), or a Hub id is neither cached nor
                downloadable (e.g. ``HF_HUB_OFFLINE=1``) -- fails at once, no network wait; or
                the package's Shapes ``clip/`` folder is missing (a shipped folder).
            ValueError: the folder holds a pipeline of the other generator family (the
                message names the class that loads it).
        """
        path = str(pretrained_model_name_or_path)
        pipe = load_pipeline(super().from_pretrained, path, _COMPONENTS, kwargs, backend="diffae")
        pipe.load_sample_grid(path)
        return pipe

    @classmethod
    def from_components(
        cls,
        diffae,
        text_encoder,
        tokenizer=None,
        feature_extractor=None,
        source_label: str = "Photo",
        base_model: Optional[str] = None,
        adapt_defaults: Optional[dict] = None,
    ) -> "IPLPipeline":
        """Assemble a *source* pipeline from a DiffAE and a CLIP model.

        Args:
            diffae: a ``DiffAEPipeline`` (or a folder / Hub id of one, loaded with
                ``DiffAEPipeline.from_pretrained``); its semantic encoder, UNet, scheduler and
                latent net are taken.
            text_encoder, tokenizer: ``transformers.CLIPModel`` and ``CLIPTokenizer``, or a CLIP
                folder / Hub id holding both, given as ``text_encoder`` with ``tokenizer=None``
                (loaded by ``pipelines.loading.clip_components``).
            feature_extractor: ``CLIPImageProcessor`` (optional; read from the CLIP folder or Hub
                id when one is given and it has one; None means OpenAI CLIP's mean / std).
            source_label: the domain the DiffAE was trained on (e.g. ``"photo"``).
            base_model: name recorded in model cards (default: the DiffAE folder / id).
            adapt_defaults: options :meth:`adapt` uses when not given (any field of ``Stage1Config`` / ``DiffAEStage2Config``),
                e.g. steps and iterations sized for this model.
        """
        if isinstance(diffae, (str, os.PathLike)):
            from ipl_diffusion.pipelines.pipeline_diffae import DiffAEPipeline

            base_model = base_model or str(diffae)
            diffae = DiffAEPipeline.from_pretrained(str(diffae))
        if isinstance(text_encoder, (str, os.PathLike)):
            clip = clip_components(str(text_encoder), tokenizer, feature_extractor)
            text_encoder, tokenizer, feature_extractor = clip["text_encoder"], clip["tokenizer"], clip["feature_extractor"]
        if tokenizer is None:
            raise UserError("from_components needs a tokenizer (or a CLIP folder holding one as text_encoder)")
        parts = diffae.components
        unet = parts.get("unet") or parts.get("source_unet")
        return cls(
            semantic_encoder=parts["semantic_encoder"],
            source_unet=unet,
            scheduler=parts["scheduler"],
            text_encoder=text_encoder.eval(),
            tokenizer=tokenizer,
            latent_net=parts.get("latent_net"),
            latent_scheduler=parts.get("latent_scheduler"),
            feature_extractor=feature_extractor,
            source_label=source_label,
            base_model=base_model,
            adapt_defaults=adapt_defaults,
        )

    # ------------------------------------------------------------------------- helpers
    @property
    def is_adapted(self) -> bool:
        return self.unet is not None

    @property
    def adapted_unet(self):
        """The adapted UNet, or the source UNet for a pipeline that was not adapted yet."""
        return self.unet if self.unet is not None else self.source_unet

    @property
    def adaptation_config(self) -> dict:
        """The resolved options of the run that produced ``unet`` (``{}`` before adapting)."""
        return dict(self.config.adaptation or {})

    @property
    def image_size(self) -> int:
        return int(self.source_unet.config.sample_size)

    def _option(self, name, value, default):
        """``value`` if given, else the adaptation run's value, else the model's recommended
        value (``config.adapt_defaults``), else ``default``."""
        if value is not None:
            return value
        recommended = (self.config.adapt_defaults or {}).get(name, default)
        return self.adaptation_config.get("stage2", {}).get(name, recommended)

    @torch.no_grad()
    def encode(self, images, t0: Optional[int] = None, num_inversion_steps: Optional[int] = None):
        """Images -> ``(z_sem (B, 512), x_t0 (B, 3, H, W))`` with the *source* UNet.

        ``x_t0`` is the deterministic DDIM inversion to timestep ``t0`` (DiffusionCLIP's
        partial inversion; ``t0 = num_train_timesteps - 1`` inverts all the way).
        """
        x0 = self.preprocess(images)
        t0 = ddim.check_t0(self._option("t0", t0, _INFERENCE_DEFAULTS.t0), self.scheduler)
        steps = self._option("num_inversion_steps", num_inversion_steps, _INFERENCE_DEFAULTS.num_inversion_steps)
        z_sem = self.semantic_encoder(x0)
        x_t0 = ddim.invert_to_t0(self.source_unet, x0, z_sem, self.scheduler, t0, steps, self.progress_bar)
        return z_sem, x_t0

    @torch.no_grad()
    def decode(self, z_sem, x_t0, t0: Optional[int] = None, num_inference_steps: Optional[int] = None, unet=None):
        """``x_t0 -> x0 (B, 3, H, W)`` in ``[-1, 1]`` with the adapted UNet (or ``unet``).

        Raises:
            UserError: ``z_sem`` / ``x_t0`` of the wrong shape (``x_t0`` must be at the model's
                size), with NaN / inf, or of different batch sizes.
        """
        t0 = ddim.check_t0(self._option("t0", t0, _INFERENCE_DEFAULTS.t0), self.scheduler)
        steps = self._option("num_inference_steps", num_inference_steps, _INFERENCE_DEFAULTS.num_inference_steps)
        unet = unet or self.adapted_unet
        z_sem, x_t0 = check_codes(self.source_unet, z_sem, x_t0, "x_t0")
        return ddim.decode_from_t0(unet, x_t0, z_sem, self.scheduler, t0, steps, self.progress_bar)

    # ---------------------------------------------------------------------- translation
    @torch.no_grad()
    def __call__(
        self,
        images=None,
        t0: Optional[int] = None,
        num_inversion_steps: Optional[int] = None,
        num_inference_steps: Optional[int] = None,
        num_images: int = 1,
        generator: Optional[torch.Generator] = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Translate ``images`` to the target domain (or sample, when ``images`` is None).

        Args:
            images: folder, path(s), PIL image(s) or a ``(B,3,H,W)`` tensor in ``[-1, 1]``
                (see :meth:`preprocess`).
            t0: inversion depth (default: the adaptation's ``t0``).
            num_inversion_steps / num_inference_steps: DDIM steps (default: the adaptation's).
            num_images, generator: for sampling only (``images=None``); translation is
                deterministic.
            output_type: ``"pil"`` (list of ``PIL.Image``), ``"np"`` (``(B,H,W,3)`` in
                ``[0,1]``) or ``"pt"`` (``(B,3,H,W)`` in ``[0,1]``).
        Returns:
            ``ImagePipelineOutput(images=...)`` or a 1-tuple when ``return_dict=False``.
        """
        if images is None:
            x0 = self.sample(num_images=num_images, generator=generator, num_inference_steps=num_inference_steps, output_type="latent").images
        else:
            z_sem, x_t0 = self.encode(images, t0=t0, num_inversion_steps=num_inversion_steps)
            x0 = self.decode(z_sem, x_t0, t0=t0, num_inference_steps=num_inference_steps)
        result = self.postprocess(x0, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)

    # ------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample_z_sem(self, num_images: int, generator: Optional[torch.Generator] = None, num_inference_steps: int = 200):
        """Sample ``z_sem (num_images, 512)`` with DiffAE's latent DDIM network
        (:func:`ipl_diffusion.pipelines.pipeline_diffae.sample_z_sem`, upstream's 200 steps).

        Raises:
            UserError: the pipeline has no ``latent_net`` (give source images instead).
        """
        if self.latent_net is None:
            raise UserError("this pipeline has no latent_net to sample z_sem; pass source images instead")
        return sample_z_sem(self.latent_net, self.latent_scheduler, num_images, generator, self.device,
                            num_inference_steps, self.progress_bar)

    @torch.no_grad()
    def sample(
        self,
        num_images: int = 1,
        generator: Optional[torch.Generator] = None,
        num_inference_steps: Optional[int] = None,
        output_type: str = "pil",
        source: bool = False,
        return_dict: bool = True,
    ):
        """Unconditional samples: ``z_sem`` from the latent net, ``x_T`` from noise.

        The noisy part ``T -> t0`` is decoded with the source UNet and ``t0 -> 0`` with the
        adapted UNet -- the adapted UNet was trained only on ``t <= t0`` (DiffusionCLIP).
        ``source=True`` decodes everything with the source UNet.

        Args:
            output_type: ``"pil"`` (list of ``PIL.Image``), ``"np"`` (``(B,H,W,3)`` in ``[0,1]``),
                ``"pt"`` (``(B,3,H,W)`` in ``[0,1]``) or ``"latent"`` (``(B,3,H,W)`` in ``[-1,1]``).
        Returns:
            ``ImagePipelineOutput(images=...)`` like ``__call__`` and ``StyleGANIPLPipeline``'s
            ``__call__``, or a 1-tuple when ``return_dict=False``.
        Raises:
            ValueError: the pipeline has no ``latent_net``, or a bad ``output_type``.
        """
        z_sem = self.sample_z_sem(num_images, generator)
        size = self.image_size
        x = torch.randn((num_images, 3, size, size), generator=generator).to(self.device)
        steps = self._option("num_inference_steps", num_inference_steps, _INFERENCE_DEFAULTS.num_inference_steps)
        if source or self.unet is None:
            x = ddim.ddim_decode(self.source_unet, x, z_sem, self.scheduler, steps, progress_bar=self.progress_bar)
        else:
            t0 = ddim.check_t0(self._option("t0", None, _INFERENCE_DEFAULTS.t0), self.scheduler)
            x = ddim.decode_to_t0(self.source_unet, x, z_sem, self.scheduler, t0, steps, self.progress_bar)
            x = ddim.decode_from_t0(self.unet, x, z_sem, self.scheduler, t0, steps, self.progress_bar)
        images = x if output_type == "latent" else self.postprocess(x, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    # ------------------------------------------------------------------------ adaptation
    def adapt(self, target: Optional[str] = None, source: Optional[str] = None, images=None, stage1_images=None,
              validation_images=None, *, target_images=None, prompt_learner=None, output_dir: Optional[str] = None, resume_from_checkpoint: Optional[str] = None,
              overwrite: bool = False, accelerator=None, progress: bool = True, **options) -> "IPLPipeline":
        """Adapt the source DiffAE to ``target`` (IPL Stage 1 + Diff-IPL Stage 2).

        Args:
            target / source: domain labels ("Wall painting" / "Photo"; ``source`` defaults to
                the pipeline's ``source_label``); ``target`` may be ``None`` when
                ``target_images`` are given (the prompts then use the neutral word "style").
            images: source-domain images (folder, paths, PIL list or a ``(N, 3, H, W)`` tensor
                in ``[-1, 1]``); when ``None``, ``num_images`` are sampled with the latent net
                and the source UNet.
            stage1_images: Stage 1's pool (same forms; default: ``stage1_num_images`` sampled,
                else ``images``). Give thousands when you can: a mapper trained on a few dozen
                memorises them (``adaptation_config["stage1"]["heldout_retrieval"]`` shows how
                well the prompts carry over to images Stage 1 held out).
            validation_images: what the returned ``sample_grid`` shows (default: the first
                training images), e.g. photos the run never trained on.
            target_images: a few target-style images (folder, paths, PIL list or a
                ``(N, 3, H, W)`` tensor in ``[-1, 1]``): their CLIP features define the target
                (StyleGAN-NADA's ``--style_img_dir``; how they combine with IPL's per-image
                prompts: :mod:`ipl_diffusion.adaptation.image_target`).
            prompt_learner: a ready Stage-1 result (``text_features(z_sem, label)``): Stage 1 is skipped.
            output_dir: when given, the cache, ``stage1/``, checkpoints, grids and
                ``losses.csv`` are written there and ``resume_from_checkpoint="latest"``
                continues an interrupted run.
            overwrite: with ``output_dir``, a fresh run replaces an earlier run's checkpoints
                there instead of being refused (as ``ipl adapt --overwrite``); they are deleted
                only once every input, label and option has passed its check.
            accelerator: an ``accelerate.Accelerator`` to use (default: one is made).
            **options: any field of :class:`ipl_diffusion.configs.Stage1Config` or
                :class:`ipl_diffusion.configs.DiffAEStage2Config` (``scheme``, ``t0``,
                ``learning_rate``, ``iterations``, ``seed``, ...). An option not given takes
                the model's recommended value (``config.adapt_defaults``, e.g. the shipped
                Shapes model's CPU-sized settings), else the config's default (the paper's /
                DiffusionCLIP's).

        Returns:
            A new ``IPLPipeline`` sharing this one's frozen components, with ``unet`` the
            adapted UNet, ``mapper`` the Stage-1 mapper, ``sample_grid`` a PIL grid
            (source | reconstruction | adapted) and the run's options in its config. This
            pipeline is left unchanged.

        Raises:
            UserError: an unknown option, bad labels (empty, too long, unknown to a Shapes
                CLIP) or values, a missing / empty image folder, half-precision weights on a
                CPU, an ``output_dir`` that is not writable or is in use by another run, a
                damaged checkpoint; NonFiniteLossError (a ``UserError``): a NaN / inf loss.
        """
        return diff_ipl.adapt_pipeline(
            self, target, source, images, stage1_images, validation_images, target_images=target_images,
            prompt_learner=prompt_learner,
            output_dir=output_dir, resume_from_checkpoint=resume_from_checkpoint, overwrite=overwrite,
            accelerator=accelerator, progress=progress, **options,
        )

    def with_adaptation(self, result) -> "IPLPipeline":
        """A new pipeline sharing this one's frozen components, with the adapted UNet and
        mapper of ``result`` (:class:`ipl_diffusion.adaptation.diffae.DiffIPLResult`)."""
        config = result.run_config
        adapted = type(self)(
            semantic_encoder=self.semantic_encoder,
            source_unet=self.source_unet,
            scheduler=self.scheduler,
            unet=result.unet,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            mapper=result.mapper,
            latent_net=self.latent_net,
            latent_scheduler=self.latent_scheduler,
            feature_extractor=self.feature_extractor,
            source_label=config["source"],
            target_label=config["target"],
            base_model=self.config.base_model,
            adaptation=config,
            adapt_defaults=self.config.adapt_defaults,
            known_domains=self.config.get("known_domains"),
            run_summary=summarize_history(result.history),
        )
        adapted.sample_grid = result.sample_grid
        return adapted

    # ---------------------------------------------------------------------- saving / hub
    def model_card(self, repo_id: str):
        """The model card (``huggingface_hub.ModelCard``, saved as README.md) for ``repo_id``
        (a Hub id or a local folder): see :func:`ipl_diffusion.pipelines.model_card.build_model_card`."""
        source, target = self.config.source_label, self.config.target_label or "(not adapted)"
        if self.latent_net is not None:
            usage = f"""
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True)
samples = pipe(num_images=4, generator=torch.Generator().manual_seed(0)).images  # new {target} images
samples[0].save("sample.png")
translated = pipe(["sample.png"]).images  # translate images (paths, a folder or PIL images)
"""
        else:
            usage = f"""
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True)
translated = pipe(["photo.jpg"]).images  # translate images (paths, a folder or PIL images)
"""
        return build_model_card(
            self,
            repo_id,
            title=f"{source} → {target} (Diff-IPL)",
            description=(
                f"A diffusion autoencoder adapted zero-shot from **{source}** to **{target}** with Image-specific "
                "Prompt Learning (IPL, Guo et al., CVPR 2023): no target-domain images were used, only CLIP and "
                "the two domain labels."
            ),
            tags=["diffusers", "ipl", "diffusion-autoencoder", "zero-shot-domain-adaptation", "image-to-image"],
            grid_caption="Rows: source images, source-model reconstructions, adapted images.",
            usage=usage + f"# or: ipl translate --model {repo_id} --input photos --output out\n",
            pipeline_tag="image-to-image",
        )
