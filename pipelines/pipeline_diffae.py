"""``DiffAEPipeline``: a diffusion autoencoder (Preechakul et al., CVPR 2022) in diffusers.

Usage::

    from ipl_diffusion import DiffAEPipeline

    pipe = DiffAEPipeline.from_pretrained("converted/ffhq256_autoenc_latent")
    z_sem, x_T = pipe.encode(["face.png"])                  # semantic code + stochastic code
    image = pipe.decode(z_sem, x_T, output_type="pil")[0]   # near-exact reconstruction
    out = pipe(batch_size=4, generator=torch.Generator().manual_seed(0))  # unconditional samples
    out = pipe(images="faces/")                              # reconstructions of a folder

Components:

* ``semantic_encoder`` -- :class:`~ipl_diffusion.models.SemanticEncoder`, image -> ``z_sem``;
* ``unet`` -- :class:`~ipl_diffusion.models.DiffAEUNetModel`, ``(x_t, t, z_sem) -> eps``;
* ``scheduler`` -- ``DDIMScheduler`` whose alphas / grid / clipping define image DDIM
  (DiffAE: linear betas 1e-4..0.02, ``clip_sample=True``, ``timestep_spacing="leading"``);
* ``latent_net`` -- :class:`~ipl_diffusion.models.LatentNetModel` (optional), samples
  normalised ``z_sem`` for unconditional generation;
* ``latent_scheduler`` -- ``DDIMScheduler`` of the latent DDIM (optional; default upstream's
  constant beta 0.008, no clipping).

Images in: paths, a folder, ``PIL.Image`` s (any mode / size, converted by
:mod:`ipl_diffusion.images`, the project's one preprocessing path) or tensors ``(B, 3, H, W)``
in ``[-1, 1]``. Encoding is deterministic DDIM inversion (:func:`ipl_diffusion.ddim.ddim_invert`),
decoding deterministic DDIM (:func:`ipl_diffusion.ddim.ddim_decode`, upstream's renderer).

diffusers 0.42 only loads custom components whose module is already imported; importing
this module imports :mod:`ipl_diffusion.models`, so ``DiffAEPipeline.from_pretrained`` works in
a fresh process.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

# Imported for their side effect too: from_pretrained needs these modules in sys.modules.
import ipl_diffusion.models  # noqa: F401
from ipl_diffusion import ddim
from ipl_diffusion.images import OUTPUT_TYPES, postprocess_images, prepare_images
from ipl_diffusion.models.diffae_blocks import warn_xformers_fallback, xformers_unavailable_reason
from ipl_diffusion.pipelines.hub_layout import RemoteCodeLayoutMixin
from ipl_diffusion.pipelines.loading import load_pipeline
from ipl_diffusion.errors import UserError

__all__ = ["DiffAEPipeline", "DiffAEPipelineOutput", "default_latent_scheduler", "diffae_scheduler"]

Generator = Optional[Union[torch.Generator, List[torch.Generator]]]
_COMPONENTS = ("semantic_encoder", "unet", "scheduler", "latent_net", "latent_scheduler")


def diffae_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """The image DDIM scheduler of upstream DiffAE (T=1000, linear betas, clipped x0).

    ``prediction_type`` is diffusers' name for what the UNet predicts: ``"epsilon"`` (upstream
    DiffAE and its converted checkpoints) or ``"v_prediction"`` (the Shapes DiffAE; see
    ``examples/shapes/train_diffae.py``). :mod:`ipl_diffusion.ddim` reads it from the config.
    """
    return DDIMScheduler(
        prediction_type=prediction_type,
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=True,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
    )


def default_latent_scheduler() -> DDIMScheduler:
    """The latent DDIM scheduler of upstream DiffAE (T=1000, constant beta 0.008, no clipping)."""
    return DDIMScheduler(num_train_timesteps=1000, trained_betas=[0.008] * 1000, clip_sample=False)


def sample_z_sem(latent_net, latent_scheduler, batch_size: int, generator, device, num_inference_steps: int = 200,
                 progress_bar=None) -> torch.Tensor:
    """DiffAE's latent DDIM: ``z_sem (batch_size, 512)`` float32 from noise drawn with
    ``generator`` (on its device, then moved, so a seed gives the same codes everywhere),
    decoded in ``num_inference_steps`` (upstream ``T_latent``: 200) and denormalised.
    ``latent_scheduler`` None: :func:`default_latent_scheduler`. Both pipelines sample this way."""
    scheduler = latent_scheduler or default_latent_scheduler()
    shape = (batch_size, latent_net.config.num_channels)
    z = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
    z = ddim.ddim_decode(latent_net, z, None, scheduler, num_inference_steps, progress_bar=progress_bar)
    return latent_net.denormalize(z)


def check_codes(unet, z_sem: torch.Tensor, x: torch.Tensor, name: str = "x_T", gaussian: bool = False):
    """Check codes before ``unet`` decodes them; returns ``(z_sem, x)`` unchanged.

    Args:
        unet: the DiffAE UNet (its config gives ``sample_size``, ``in_channels``, ``z_sem_channels``).
        z_sem: ``(B, z_sem_channels)`` semantic codes.
        x: ``(B, in_channels, S, S)`` with ``S`` the UNet's ``sample_size`` (the UNet is
            convolutional and would silently decode another size into other-size images).
        name: how messages call ``x`` (``"x_T"``, ``"x_t0"``).
        gaussian: ``x`` should be pure noise: a ``UserWarning`` when its mean / std are far
            from N(0, I) (e.g. ``torch.rand``, uniform in [0, 1]; upstream DiffAE users hit this).

    Raises:
        UserError: a wrong shape, NaN / inf values, or batch sizes that differ.
    """
    from ipl_diffusion.errors import UserError

    size, channels = int(unet.config.sample_size), int(unet.config.in_channels)
    width = int(unet.config.get("z_sem_channels", z_sem.shape[-1]))
    if z_sem.ndim != 2 or z_sem.shape[1] != width:
        raise UserError(f"z_sem must be (B, {width}) for this model; got {tuple(z_sem.shape)}")
    if x.ndim != 4 or tuple(x.shape[1:]) != (channels, size, size):
        raise UserError(f"{name} must be (B, {channels}, {size}, {size}) for this {size}-px model; got {tuple(x.shape)}")
    if x.shape[0] != z_sem.shape[0]:
        raise UserError(f"z_sem has {z_sem.shape[0]} rows but {name} has {x.shape[0]}")
    for label, value in (("z_sem", z_sem), (name, x)):
        if not torch.isfinite(value).all():
            raise UserError(f"{label} contains NaN or infinite values")
    if gaussian and x.numel() >= 256:
        mean, std = x.float().mean().item(), x.float().std().item()
        if abs(mean) > 0.25 or not 0.6 < std < 1.5:
            warnings.warn(
                f"{name} has mean {mean:.2f} and std {std:.2f}, far from the N(0, I) noise DiffAE decodes; "
                "the images will look wrong (torch.rand is uniform in [0, 1]: use torch.randn)",
                UserWarning,
                stacklevel=3,
            )
    return z_sem, x


@dataclass
class DiffAEPipelineOutput(BaseOutput):
    """Output of :class:`DiffAEPipeline`.

    Attributes:
        images: list of PIL images, ``np.ndarray (B, H, W, 3)`` in ``[0, 1]``, ``torch.Tensor
            (B, 3, H, W)`` in ``[0, 1]`` (``"pt"``) or in ``[-1, 1]`` (``"latent"``).
        z_sem: semantic codes ``(B, 512)`` that were decoded.
        x_T: stochastic codes ``(B, 3, H, W)`` that were decoded.
    """

    images: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]
    z_sem: torch.Tensor
    x_T: torch.Tensor


class XFormersFallbackPipelineMixin:
    """``enable_xformers_memory_efficient_attention()`` that degrades gracefully (warns once, keeps SDPA).

    diffusers' pipeline version walks into every component and raises where xformers cannot
    run (no package, no CUDA). Pipelines of DiffAE models instead warn once for the whole
    pipeline and put PyTorch SDPA on every component that has attention processors, which
    gives the same outputs to numerical precision. Must precede ``DiffusionPipeline`` in the
    bases.
    """

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op=None) -> None:
        reason = xformers_unavailable_reason() if valid else None
        if reason is None:
            return super().set_use_memory_efficient_attention_xformers(valid, attention_op)
        warn_xformers_fallback(reason)
        for name in self.components:
            module = getattr(self, name, None)
            if isinstance(module, torch.nn.Module) and hasattr(module, "set_attn_processor"):
                module.set_attn_processor(AttnProcessor2_0())


class DiffAEPipeline(RemoteCodeLayoutMixin, XFormersFallbackPipelineMixin, DiffusionPipeline):
    r"""Diffusion autoencoder: encode (:meth:`encode`), decode (:meth:`decode`), sample / reconstruct (``__call__``).

    See the module docstring for the components.
    """

    model_cpu_offload_seq = "semantic_encoder->latent_net->unet"
    _optional_components = ["latent_net", "latent_scheduler"]

    def __init__(self, semantic_encoder, unet, scheduler: DDIMScheduler, latent_net=None, latent_scheduler=None):
        super().__init__()
        self.register_modules(
            semantic_encoder=semantic_encoder,
            unet=unet,
            scheduler=scheduler,
            latent_net=latent_net,
            latent_scheduler=latent_scheduler,
        )

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a folder written by :meth:`save_pretrained` (or ``ipl convert diffae``) or a Hub id.

        The one loading path of the project's pipelines
        (:func:`ipl_diffusion.pipelines.loading.load_pipeline`).

        Raises:
            UserFileNotFoundError: (a ``FileNotFoundError``) a folder without ``model_index.json``
                or a component's sub-folder (named), or a Hub id that is not in the local cache
                while ``HF_HUB_OFFLINE=1`` (no network wait).
        """
        return load_pipeline(super().from_pretrained, str(pretrained_model_name_or_path), _COMPONENTS, kwargs)

    # ------------------------------------------------------------------ helpers
    @property
    def image_size(self) -> int:
        return int(self.unet.config.sample_size)

    def preprocess(self, images, size: Optional[int] = None) -> torch.Tensor:
        """Images -> ``(B, 3, H, W)`` float32 in ``[-1, 1]`` on the pipeline's device, at ``size``
        (default: the UNet's sample size); :func:`ipl_diffusion.images.prepare_images`. The DDIM
        chain stays in float32 whatever the models' dtype (they cast their inputs)."""
        return prepare_images(images, size or self.image_size, self.device)

    @staticmethod
    def postprocess(images: torch.Tensor, output_type: str = "pil"):
        """``(B, 3, H, W)`` in ``[-1, 1]`` -> ``output_type`` (``"pil"``, ``"np"``, ``"pt"``,
        ``"latent"``); :func:`ipl_diffusion.images.postprocess_images`."""
        return postprocess_images(images, output_type)

    @staticmethod
    def _generator(generator: Generator, seed: Optional[int]) -> Generator:
        if seed is not None:
            if generator is not None:
                raise UserError("pass either generator or seed, not both")
            return torch.Generator().manual_seed(int(seed))
        return generator

    def _noise(self, batch_size: int, generator: Generator) -> torch.Tensor:
        # Drawn on the generator's device (CPU by default) and moved, so a seed gives the same
        # x_T on every device.
        shape = (batch_size, self.unet.config.in_channels, self.image_size, self.image_size)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    # ------------------------------------------------------------------ encode / decode
    @torch.no_grad()
    def encode_z_sem(self, images) -> torch.Tensor:
        """Semantic codes ``(B, 512)`` of images (any input :meth:`preprocess` takes)."""
        x0 = self.preprocess(images)
        return self.semantic_encoder(x0)

    @torch.no_grad()
    def encode(
        self,
        images,
        num_inference_steps: int = 250,
        inversion: str = "mirror",
        end_timestep: Optional[int] = None,
    ):
        """Encode images into ``(z_sem, x_T)``: the semantic code and DDIM-inverted noise.

        Args:
            images: paths, folder, PIL images or ``(B, 3, H, W)`` tensors in ``[-1, 1]``.
            num_inference_steps: DDIM inversion steps (upstream notebooks: 250).
            inversion: ``"mirror"`` (exact inverse of our decoder's steps) or ``"diffae"``
                (upstream ``encode_stochastic``); see :mod:`ipl_diffusion.ddim`.
            end_timestep: invert only to this timestep (DiffusionCLIP's ``t0``).

        Returns:
            ``z_sem (B, 512)`` and ``x_T (B, 3, H, W)``, on the pipeline's device.
        """
        x0 = self.preprocess(images)
        z_sem = self.semantic_encoder(x0)
        x_T = ddim.ddim_invert(
            self.unet,
            x0,
            z_sem,
            self.scheduler,
            num_inference_steps,
            end_timestep=end_timestep,
            variant=inversion,
            progress_bar=self.progress_bar,
        )
        return z_sem, x_T

    def check_codes(self, z_sem: torch.Tensor, x: torch.Tensor, name: str = "x_T", gaussian: bool = False):
        """:func:`check_codes` for this pipeline's UNet; returns float32 codes on its device."""
        z_sem, x = check_codes(self.unet, z_sem, x, name, gaussian)
        return z_sem.to(device=self.device, dtype=torch.float32), x.to(device=self.device, dtype=torch.float32)

    @torch.no_grad()
    def decode(
        self,
        z_sem: torch.Tensor,
        x_T: Optional[torch.Tensor] = None,
        num_inference_steps: int = 20,
        generator: Generator = None,
        output_type: str = "latent",
        start_timestep: Optional[int] = None,
    ):
        """Decode ``(z_sem, x_T)`` to images with deterministic DDIM (upstream ``render``).

        Args:
            z_sem: ``(B, 512)`` semantic codes.
            x_T: ``(B, 3, H, W)`` stochastic codes at the UNet's sample size; ``None`` draws
                Gaussian noise with ``generator``. A given ``x_T`` far from N(0, I) gets a
                ``UserWarning`` (unless ``start_timestep`` is given: ``x_t0`` is not pure noise).
            num_inference_steps: DDIM steps (upstream default ``T_eval=20``).
            generator: for ``x_T=None``.
            output_type: ``"latent"`` (default: tensor in ``[-1, 1]``), ``"pt"``, ``"np"``, ``"pil"``.
            start_timestep: decode from this intermediate timestep (DiffusionCLIP's ``t0``).

        Raises:
            UserError: codes of the wrong shape, with NaN / inf, or of different batch sizes
                (:meth:`check_codes`); ValueError: a bad ``output_type``.
        """
        if output_type not in OUTPUT_TYPES:
            raise UserError(f"output_type must be one of {OUTPUT_TYPES}; got {output_type!r}")
        if x_T is None:
            x_T = self._noise(z_sem.shape[0], generator)
        z_sem, x_T = self.check_codes(z_sem, x_T, gaussian=start_timestep is None)
        return self.postprocess(self._decode(z_sem, x_T, num_inference_steps, start_timestep), output_type)

    def _decode(self, z_sem, x_T, num_inference_steps, start_timestep=None):
        return ddim.ddim_decode(
            self.unet,
            x_T,
            z_sem,
            self.scheduler,
            num_inference_steps,
            start_timestep=start_timestep,
            progress_bar=self.progress_bar,
        )

    @torch.no_grad()
    def sample_z_sem(self, batch_size: int = 1, generator: Generator = None, num_inference_steps: int = 200):
        """Sample ``z_sem (batch_size, 512)`` with the latent DDIM network (upstream ``T_latent``: 200).

        Raises:
            ValueError: the pipeline has no ``latent_net``.
        """
        if self.latent_net is None:
            raise UserError(
                "this DiffAE pipeline has no latent_net, so it cannot sample z_sem; convert the "
                "*_autoenc_latent checkpoint, or pass images / z_sem instead"
            )
        return sample_z_sem(self.latent_net, self.latent_scheduler, batch_size, generator, self.device,
                            num_inference_steps, self.progress_bar)

    # ------------------------------------------------------------------ __call__
    @torch.no_grad()
    def __call__(
        self,
        images=None,
        batch_size: int = 1,
        num_inference_steps: int = 20,
        num_inversion_steps: int = 250,
        latent_num_inference_steps: int = 200,
        z_sem: Optional[torch.Tensor] = None,
        x_T: Optional[torch.Tensor] = None,
        invert: bool = True,
        generator: Generator = None,
        seed: Optional[int] = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Unconditional sampling, or reconstruction of given images.

        * ``images`` given: ``z_sem`` from the semantic encoder and ``x_T`` by DDIM inversion
          (``invert=False``: random ``x_T`` instead, which keeps the semantics but re-draws details);
        * otherwise ``z_sem`` (given, or sampled with the latent net) and ``x_T`` (given, or Gaussian).

        Args:
            images: paths, folder, PIL images or ``(B, 3, H, W)`` tensors in ``[-1, 1]``.
            batch_size: number of samples when neither images nor ``z_sem`` are given.
            num_inference_steps: DDIM decoding steps.
            num_inversion_steps: DDIM inversion steps for ``images``.
            latent_num_inference_steps: latent DDIM steps for sampling ``z_sem``.
            z_sem, x_T: codes to decode (``(B, 512)``, ``(B, 3, H, W)``).
            generator / seed: randomness for ``x_T`` and the latent noise (same seed, same images).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (tensor in ``[-1, 1]``).
            return_dict: return :class:`DiffAEPipelineOutput` or ``(images, z_sem, x_T)``.

        Raises:
            ValueError: bad ``output_type`` / ``batch_size``, inconsistent codes, no latent net
                for unconditional sampling.
            FileNotFoundError: missing / empty image folder.
        """
        if output_type not in OUTPUT_TYPES:
            raise UserError(f"output_type must be one of {OUTPUT_TYPES}; got {output_type!r}")
        generator = self._generator(generator, seed)
        given_x_T = x_T is not None
        if images is not None:
            if z_sem is not None:
                raise UserError("pass images or z_sem, not both")
            if invert and x_T is None:
                z_sem, x_T = self.encode(images, num_inversion_steps)
            else:
                z_sem = self.encode_z_sem(images)
        elif z_sem is None:
            if int(batch_size) < 1:
                raise UserError(f"batch_size must be >= 1; got {batch_size}")
            z_sem = self.sample_z_sem(int(batch_size), generator, latent_num_inference_steps)
        if x_T is None:
            x_T = self._noise(z_sem.shape[0], generator)
        # x_T of the inversion of images is not checked against N(0, I); a user's is.
        z_sem, x_T = self.check_codes(z_sem, x_T, gaussian=given_x_T)
        result = self.postprocess(self._decode(z_sem, x_T, num_inference_steps), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return result, z_sem, x_T
        return DiffAEPipelineOutput(images=result, z_sem=z_sem, x_T=x_T)
