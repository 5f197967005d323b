"""``StyleGANIPLPipeline``: GAN-IPL -- zero-shot adaptation of a StyleGAN2 generator with
Image-specific Prompt Learning, sampling, and real-image translation by projection.

Usage::

    from ipl_diffusion import StyleGANIPLPipeline

    pipe = StyleGANIPLPipeline.from_components("ffhq-256/", "clip-vit-base-patch32/")
    adapted = pipe.adapt("Wall painting", source="Photo", iterations=300)
    images = adapted(num_images=4, generator=torch.Generator().manual_seed(0)).images
    faces = adapted.translate(["me.jpg"])                     # project + re-synthesise
    adapted.save_pretrained("ffhq-wall-painting")
    adapted.push_to_hub("me/ffhq-wall-painting")

``from_components`` takes a generator folder (``ipl convert stylegan2`` output), a rosinality
``.pt`` (read with ``weights_only=True``) or a :class:`StyleGAN2Generator`.

Components (safetensors + JSON):

* ``source_generator`` -- the pretrained StyleGAN2 (:class:`StyleGAN2Generator`, never trained);
* ``generator`` -- the adapted generator (``g_ema`` of Stage 2); ``None`` until :meth:`adapt`;
* ``text_encoder`` / ``tokenizer`` -- the CLIP model and tokenizer that guide adaptation;
* ``mapper`` -- Stage 1's prompt module: the latent mapper (Eq. 2) for the adaptive / random
  schemes, the shared prompt vectors for learned / manual;
* ``feature_extractor`` -- the CLIP image processor (mean / std; optional).

Config (``model_index.json``): ``source_label``, ``target_label``, ``base_model``,
``adaptation`` (every hyper-parameter of the run that produced ``generator``),
``adapt_defaults`` (the options :meth:`StyleGANIPLPipeline.adapt` uses when not given) and
``known_domains`` (the labels a closed-vocabulary CLIP was trained on; ``adapt`` refuses others).

diffusers 0.42 only loads custom components whose module is already imported, hence the
imports of our model modules below.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

# Imported for their side effect too: from_pretrained needs these modules in sys.modules.
import ipl_diffusion.mapper  # noqa: F401
import ipl_diffusion.models.stylegan2  # noqa: F401
from ipl_diffusion.adaptation import stylegan2 as gan_ipl
from ipl_diffusion.models.stylegan2 import StyleGAN2Generator
from ipl_diffusion.outputs import atomic_save_image
from ipl_diffusion.errors import UserError, UserFileNotFoundError
from ipl_diffusion.pipelines.adapted_pipeline import SAMPLE_GRID_NAME, AdaptedPipelineMixin
from ipl_diffusion.pipelines.hub_layout import RemoteCodeLayoutMixin
from ipl_diffusion.pipelines.loading import (
    clip_components, component_dtype, is_generator_folder, load_pipeline, requested_dtype,
)
from ipl_diffusion.pipelines.model_card import build_model_card, summarize_history

_COMPONENTS = ("source_generator", "generator", "text_encoder", "tokenizer", "mapper", "feature_extractor")


def _is_bare_generator(path: str) -> bool:
    """A rosinality ``.pt`` file, or a ``StyleGAN2Generator.save_pretrained`` folder."""
    return os.path.isfile(path) or is_generator_folder(path, StyleGAN2Generator.__name__)


class StyleGANIPLPipeline(AdaptedPipelineMixin, RemoteCodeLayoutMixin, DiffusionPipeline):
    r"""GAN-IPL pipeline: adapt (:meth:`adapt`), sample (``__call__``), translate (:meth:`translate`).

    See the module docstring for the components.
    """

    model_cpu_offload_seq = "source_generator->generator"
    _optional_components = ["generator", "text_encoder", "tokenizer", "mapper", "feature_extractor"]

    def __init__(
        self,
        source_generator: StyleGAN2Generator,
        generator: Optional[StyleGAN2Generator] = None,
        text_encoder=None,
        tokenizer=None,
        mapper=None,
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
            source_generator=source_generator,
            generator=generator,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            mapper=mapper,
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
        self.sample_grid = None  # PIL grid (source row | adapted row) of the adaptation run
        self._mean_latent = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a folder written by :meth:`save_pretrained` (or a Hub id in the cache).

        Also accepts a bare generator -- a folder written by ``StyleGAN2Generator.save_pretrained``
        (``ipl convert stylegan2`` output) or a rosinality ``.pt`` file -- and then builds a
        *source* pipeline with :meth:`from_components`, taking CLIP from ``text_encoder=``
        (object or folder; default ``openai/clip-vit-base-patch32`` from the Hub cache; None:
        no CLIP, enough to sample and translate).

        The shipped Shapes folder (``default_model_path("stylegan2")``) holds no CLIP: its
        ``text_encoder`` / ``tokenizer`` / ``feature_extractor`` come from the package's
        ``clip/`` unless passed (:func:`ipl_diffusion.pipelines.loading.load_pipeline`).

        Raises:
            FileNotFoundError: no ``model_index.json``, a listed component folder is missing,
                or a Hub id / CLIP model that is not available (offline: at once), or the
                package's Shapes ``clip/`` folder is missing (a shipped folder).
            ValueError: the folder holds a pipeline of the other generator family (the
                message names the class that loads it).
        """
        path = str(pretrained_model_name_or_path)
        if _is_bare_generator(path):
            return cls._from_bare_generator(path, kwargs)
        pipe = load_pipeline(super().from_pretrained, path, _COMPONENTS, kwargs, backend="stylegan2")
        pipe.load_sample_grid(path)
        return pipe

    @classmethod
    def _from_bare_generator(cls, path: str, kwargs: dict):
        """:meth:`from_pretrained` of a bare generator: :meth:`from_components`, with the
        components it loads (the generator; the CLIP model unless passed as an object) cast to
        the ``dtype`` / ``torch_dtype`` asked for, by diffusers' rules."""
        from ipl_diffusion.clip_loading import DEFAULT_CLIP_ID

        dtype = requested_dtype(kwargs)
        kwargs = {key: value for key, value in kwargs.items() if key not in ("dtype", "torch_dtype")}
        # Given as None (diffusers' way of leaving a component out): no CLIP, as for sampling.
        text_encoder = kwargs.pop("text_encoder", DEFAULT_CLIP_ID)
        pipe = cls.from_components(
            path, text_encoder, kwargs.pop("tokenizer", None), kwargs.pop("feature_extractor", None),
            source_label=kwargs.pop("source_label", "Photo"),
        )
        if kwargs:  # what diffusers does with options its pipeline does not take
            warnings.warn(f"Keyword arguments {kwargs} are not expected by {cls.__name__} for a bare generator and will be ignored.", stacklevel=3)
        loaded = {"source_generator": pipe.source_generator}
        if isinstance(text_encoder, (str, os.PathLike)):
            loaded["text_encoder"] = pipe.text_encoder
        if dtype is not None and not isinstance(dtype, (dict, torch.dtype)):
            warnings.warn(f"Passed dtype {dtype} is not a torch.dtype. Defaulting to torch.float32.", stacklevel=3)
        for name, module in loaded.items():
            target = component_dtype(dtype, name)
            if target is not None:
                # nn.Module.to: ModelMixin.to would warn the user to pass the dtype to
                # from_pretrained, which is what they did.
                torch.nn.Module.to(module, target)
        return pipe

    @classmethod
    def from_components(cls, generator, text_encoder=None, tokenizer=None, feature_extractor=None, source_label: str = "Photo", base_model: Optional[str] = None):
        """Assemble a *source* pipeline.

        Args:
            generator: a :class:`StyleGAN2Generator`, a folder written by its ``save_pretrained``
                (``ipl convert stylegan2`` output) or a rosinality ``.pt`` file.
            text_encoder: ``transformers.CLIPModel`` or a folder holding model + tokenizer (+
                image processor); optional for sampling / translation, required by :meth:`adapt`.
            tokenizer, feature_extractor: ``CLIPTokenizer``, ``CLIPImageProcessor``.
        """
        if isinstance(generator, (str, os.PathLike)):
            base_model = base_model or str(generator)
            if not Path(generator).exists():
                raise UserFileNotFoundError(f"generator {str(generator)!r} does not exist (expected a StyleGAN2Generator folder or a rosinality .pt)")
            if Path(generator).is_file():
                from ipl_diffusion.conversion.stylegan2 import generator_from_checkpoint

                generator = generator_from_checkpoint(generator)
            else:
                generator = StyleGAN2Generator.from_pretrained(str(generator))
        if isinstance(text_encoder, (str, os.PathLike)):
            clip = clip_components(str(text_encoder), tokenizer, feature_extractor)
            text_encoder, tokenizer, feature_extractor = clip["text_encoder"], clip["tokenizer"], clip["feature_extractor"]
        return cls(
            source_generator=generator.eval(),
            text_encoder=text_encoder.eval() if text_encoder is not None else None,
            tokenizer=tokenizer,
            feature_extractor=feature_extractor,
            source_label=source_label,
            base_model=base_model,
        )

    # ------------------------------------------------------------------------- helpers
    @property
    def is_adapted(self) -> bool:
        return self.generator is not None

    @property
    def adapted_generator(self) -> StyleGAN2Generator:
        """The adapted generator, or the source one before :meth:`adapt`."""
        return self.generator if self.generator is not None else self.source_generator

    @property
    def adaptation_config(self) -> dict:
        """The resolved options of the run that produced ``generator`` (``{}`` before adapting)."""
        return dict(self.config.adaptation or {})

    @property
    def image_size(self) -> int:
        return int(self.source_generator.config.size)

    def mean_latent(self) -> torch.Tensor:
        """Truncation centre ``(1, style_dim)``: the source mapping network's mean ``w``
        (4096 samples, seed 0; the mapping network is shared, so it serves both generators)."""
        if self._mean_latent is None or self._mean_latent.device != self.source_generator.device:
            self._mean_latent = self.source_generator.mean_latent(4096, seed=0)
        return self._mean_latent

    # ------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        num_images: int = 1,
        generator: Optional[torch.Generator] = None,
        latents: Optional[torch.Tensor] = None,
        truncation: float = 0.7,
        source: bool = False,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Sample images from the adapted generator (``source=True``: the source generator).

        Args:
            num_images: how many (ignored when ``latents`` is given).
            generator: ``torch.Generator`` for ``z`` (a fixed seed gives the same images: the
                noise maps are the generators' fixed ``noises.noise_i``).
            latents: ``z`` ``(N, style_dim)`` to use instead of sampling (finite).
            truncation: psi around the mean ``w`` (0.7 as NADA/IPL samples; 1 = off).
            output_type: ``"pil"`` / ``"np"`` (``(B,H,W,3)`` in [0,1]) / ``"pt"`` (``(B,3,H,W)`` in [0,1]).
        Returns:
            ``ImagePipelineOutput(images=...)`` or a 1-tuple when ``return_dict=False``.

        Raises:
            ValueError: ``num_images < 1``, non-finite ``latents``, or ``latents`` not ``(N, style_dim)``.
        """
        model = self.source_generator if source else self.adapted_generator
        if latents is None:
            if num_images < 1:
                raise UserError(f"num_images must be >= 1, got {num_images}")
            latents = torch.randn((num_images, model.style_dim), generator=generator)
        elif not torch.isfinite(latents).all():
            raise UserError("latents contain NaN or inf; pass finite z of shape (N, style_dim)")
        latents = latents.to(self.device, model.dtype)
        # Map with the *source* mapping network: NADA/IPL never train it (unless phase="all"),
        # and the source and adapted samples of one z must share their w.
        w = self.source_generator.get_latent(latents)
        images, _ = model([w], input_is_latent=True, truncation=truncation, truncation_latent=self.mean_latent(), randomize_noise=False)
        result = self.postprocess(images, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=result) if return_dict else (result,)

    @torch.no_grad()
    def make_sample_grid(self, num_images: int = 8, seed: int = 31337, truncation: float = 0.7):
        """Labelled PIL grid: source samples (top row) | adapted samples (bottom row) of the
        same ``z`` (``seed``: a stream that training never draws from)."""
        from ipl_diffusion.before_after import row_labels
        from ipl_diffusion.grids import labelled_grid

        z = torch.randn((num_images, self.source_generator.style_dim), generator=torch.Generator().manual_seed(seed))
        top = self(latents=z, truncation=truncation, source=True, output_type="pt").images
        bottom = self(latents=z, truncation=truncation, output_type="pt").images
        labels = row_labels("stylegan2", self.config.target_label or "adapted")
        return labelled_grid([top * 2 - 1, bottom * 2 - 1], labels, [str(i) for i in range(num_images)])

    # ---------------------------------------------------------------------- translation
    def invert(self, images, space: str = "w+", num_steps: int = 300, learning_rate: float = 0.1, perceptual_loss=None, lpips_weights=None, encoder=None, seed: int = 0):
        """Real images -> W+ latents ``(B, n_latent, style_dim)`` of the *source* generator.

        By optimisation (:func:`ipl_diffusion.projection.project`: pixel MSE, plus LPIPS when
        ``lpips_weights`` (torchvision AlexNet file) or a ``perceptual_loss`` is given), or by a
        user's ``encoder`` (e4e / ReStyle: ``images -> w | w+``; ``num_steps=0`` uses it as is).
        """
        from ipl_diffusion.projection import lpips_loss, project

        x = self.preprocess(images)
        if perceptual_loss is None and lpips_weights is not None:
            perceptual_loss = lpips_loss(lpips_weights)
        return project(self.source_generator, x, space=space, num_steps=num_steps, learning_rate=learning_rate, perceptual_loss=perceptual_loss, encoder=encoder, seed=seed, progress_bar=self.progress_bar).latents

    def translate(
        self,
        images,
        generator: Optional[torch.Generator] = None,
        space: str = "w+",
        num_steps: int = 300,
        learning_rate: float = 0.1,
        perceptual_loss=None,
        lpips_weights=None,
        encoder=None,
        output_type: str = "pil",
        return_latents: bool = False,
    ):
        """Translate real images: project into the source generator's W/W+, re-synthesise with
        the adapted generator (same latents, same fixed noise maps).

        Args:
            images: folder / path(s) / PIL image(s) / ``(B,3,H,W)`` tensor in [-1, 1]; any mode
                and size (resized and centre-cropped to the generator's resolution).
            generator: seeds the projection's latent noise (default seed 0; deterministic).
            space, num_steps, learning_rate, perceptual_loss, lpips_weights, encoder: see :meth:`invert`.
            output_type: ``"pil"`` (list of PIL images), ``"np"`` or ``"pt"`` (in [0, 1]).
        Returns:
            the translated images; with ``return_latents`` a tuple ``(images, w_plus)``.
        """
        seed = generator.initial_seed() if generator is not None else 0
        w_plus = self.invert(images, space=space, num_steps=num_steps, learning_rate=learning_rate, perceptual_loss=perceptual_loss, lpips_weights=lpips_weights, encoder=encoder, seed=seed)
        with torch.no_grad():
            out, _ = self.adapted_generator(w_plus, input_is_latent=True, randomize_noise=False)
        result = self.postprocess(out, output_type)
        return (result, w_plus) if return_latents else result

    # ------------------------------------------------------------------------ adaptation
    def adapt(self, target: Optional[str] = None, source: Optional[str] = None, *, target_images=None, prompt_learner=None,
              output_dir: Optional[str] = None,
              resume_from_checkpoint: Optional[str] = None, overwrite: bool = False, accelerator=None,
              progress: bool = True, **options) -> "StyleGANIPLPipeline":
        """Adapt the source generator to ``target`` (IPL Stage 1 + GAN-IPL Stage 2).

        Stage 1 (prompt learning, Eq. 6) learns the latent mapper on source samples ``w``
        from the frozen mapping network; Stage 2 fine-tunes a copy of the generator with the
        adaptive directional loss (Eq. 7-9) on fresh ``w`` every iteration, NADA's layer
        freezing and an EMA (``g_ema``, what is sampled and saved).

        Args:
            target / source: domain labels ("Wall painting" / "Photo"; ``source`` defaults to
                the pipeline's ``source_label``); ``target`` may be ``None`` when
                ``target_images`` are given (the prompts then use the neutral word "style").
            target_images: a few target-style images (folder, paths, PIL list or a
                ``(N, 3, H, W)`` tensor in ``[-1, 1]``): their CLIP features define the target
                (StyleGAN-NADA's ``--style_img_dir``; how they combine with IPL's per-image
                prompts: :mod:`ipl_diffusion.adaptation.image_target`).
            prompt_learner: a ready Stage-1 result (``text_features(w, label)``): Stage 1 is skipped.
            output_dir: when given, ``stage1/``, ``checkpoints/``, ``samples/``, ``losses.csv``
                and the final ``sample_grid.png`` go there (main process only) and
                ``resume_from_checkpoint="latest"`` continues an interrupted run bit for bit.
            overwrite: with ``output_dir``, a fresh run replaces an earlier run's checkpoints
                there instead of being refused (as ``ipl adapt --overwrite``); they are deleted
                only once every input, label and option has passed its check.
            accelerator: an ``accelerate.Accelerator`` (default: one on the generator's device).
            **options: any field of :class:`ipl_diffusion.configs.Stage1Config` or
                :class:`ipl_diffusion.configs.GANStage2Config` (``scheme``, ``lambda_domain``,
                ``stage1_iterations``, ``iterations``, ``learning_rate``, ``seed``, ...). An
                option not given takes the pipeline's recommended value
                (``config.adapt_defaults``, e.g. the shipped Shapes GAN's CPU-sized settings),
                else the config's default (IPL's / NADA's).

        Returns:
            A new pipeline sharing the frozen components, with ``generator`` the adapted
            ``g_ema``, ``mapper`` the Stage 1 mapper, ``sample_grid`` (source | adapted, fixed
            seed) and the run's options in ``config.adaptation``. ``self`` is unchanged.

        Raises:
            UserError: no CLIP components, an unknown option, bad labels or values, fp16
                without a GPU, half-precision weights on a CPU, an ``output_dir`` that is not
                writable or is in use by another run, a damaged checkpoint;
                NonFiniteLossError (a ``UserError``): a NaN / inf loss.
        """
        if self.text_encoder is None or self.tokenizer is None:
            raise UserError("adapt needs the CLIP text_encoder and tokenizer components; this pipeline has none")
        return gan_ipl.adapt_pipeline(self, target, source, target_images=target_images, prompt_learner=prompt_learner,
                                      output_dir=output_dir,
                                      resume_from_checkpoint=resume_from_checkpoint, overwrite=overwrite,
                                      accelerator=accelerator, progress=progress, **options)

    def with_adaptation(self, result, output_dir=None) -> "StyleGANIPLPipeline":
        """A new pipeline sharing this one's frozen components, with the adapted ``g_ema`` and
        mapper of ``result`` (:class:`ipl_diffusion.adaptation.stylegan2.GANIPLResult`); its
        sample grid is also written to ``output_dir`` when given (main process)."""
        config = {**result.run_config, "base_model": self.config.base_model}
        adapted = type(self)(
            source_generator=self.source_generator,
            generator=result.generator,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            mapper=result.mapper,
            feature_extractor=self.feature_extractor,
            source_label=config["source"],
            target_label=config["target"],
            base_model=self.config.base_model,
            adaptation=config,
            adapt_defaults=self.config.get("adapt_defaults"),
            known_domains=self.config.get("known_domains"),
            run_summary=summarize_history(result.history),
        )
        adapted.sample_grid = adapted.make_sample_grid(num_images=config["stage2"]["num_sample_images"])
        if output_dir is not None and result.is_main_process:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            atomic_save_image(adapted.sample_grid, Path(output_dir) / SAMPLE_GRID_NAME)
        return adapted

    # ---------------------------------------------------------------------- saving / hub
    def model_card(self, repo_id: str):
        """The model card (``huggingface_hub.ModelCard``, saved as README.md) for ``repo_id``
        (a Hub id or a local folder): see :func:`ipl_diffusion.pipelines.model_card.build_model_card`."""
        source, target = self.config.source_label, self.config.target_label or "(not adapted)"
        usage = f"""
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True)
images = pipe(num_images=4, generator=torch.Generator().manual_seed(0)).images  # new {target} images
images[0].save("sample.png")
translated = pipe.translate(["sample.png"])  # real images: projected into W+, re-synthesised
"""
        return build_model_card(
            self,
            repo_id,
            title=f"{source} → {target} (GAN-IPL, StyleGAN2)",
            description=(
                f"A StyleGAN2 generator adapted zero-shot from **{source}** to **{target}** with Image-specific "
                "Prompt Learning (IPL, Guo et al., CVPR 2023): only CLIP and the two domain labels, no "
                "target-domain images."
            ),
            tags=["diffusers", "ipl", "stylegan2", "gan", "zero-shot-domain-adaptation"],
            grid_caption="Top row: source generator; bottom row: adapted generator (same latents).",
            usage=usage,
            pipeline_tag="unconditional-image-generation",
        )


__all__ = ["StyleGANIPLPipeline"]
