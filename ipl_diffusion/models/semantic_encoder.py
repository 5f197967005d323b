"""DiffAE's semantic encoder as a diffusers model: image -> ``z_sem``.

Mirrors upstream DiffAE's ``BeatGANsEncoderModel`` as built by ``BeatGANsAutoencModel``
(``phizaz/diffae``, ``model/unet.py``, ``model/unet_autoenc.py``; config
``ffhq256_autoenc``: 7 levels ``(1, 1, 2, 2, 4, 4, 4)`` down to 4x4, attention at 16x16,
``enc_pool="adaptivenonzero"``). Its resnets take no time embedding and therefore are the
single-conv form ``x + conv3x3(SiLU(GN(x)))`` with no dropout.

Defaults reproduce ``ffhq256_autoenc`` exactly (30,150,400 parameters, "30.15 M"). A tiny
config for tests and toy data::

    encoder = SemanticEncoder(sample_size=16, model_channels=32, channel_mult=(1, 2),
                              num_res_blocks=1, attention_resolutions=(8,), z_sem_channels=32)

Layout: ``conv_in`` (upstream ``encoder.input_blocks.0.0``), ``down_blocks[k]``
(``encoder.input_blocks.{k+1}``), ``mid_block`` (``encoder.middle_block``), ``norm_out`` and
``conv_out`` (``encoder.out.0`` and ``encoder.out.3``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .diffae_blocks import DiffAELevelsMixin, DiffAEResBlock, GroupNorm32, XFormersFallbackMixin, check_spatial_size, make_attention
from .diffae_unet import DiffAEMidBlock, DiffAEUNetLayer
from .config_keys import StrictConfigMixin

__all__ = ["SemanticEncoder"]


class SemanticEncoder(StrictConfigMixin, DiffAELevelsMixin, XFormersFallbackMixin, ModelMixin, AttentionMixin, ConfigMixin):
    """DiffAE semantic encoder: ``(B, 3, H, W)`` images in ``[-1, 1]`` -> ``z_sem (B, z_sem_channels)``.

    Args (config):
        sample_size: image size the attention placement refers to (256). Other sizes divisible
            by ``2 ** (len(channel_mult) - 1)`` also run (global average pooling at the end).
        in_channels: image channels (3).
        model_channels: base width (128).
        channel_mult: width multiplier per level (``(1, 1, 2, 2, 4, 4, 4)``).
        num_res_blocks: resnets per level (2).
        attention_resolutions: pixel resolutions with attention after each resnet (``(16,)``).
        num_attention_heads: heads of every attention (1).
        z_sem_channels: width of ``z_sem`` (512).

    ``z_sem`` is the raw encoder output (no normalisation); the latent DDIM normalises it with
    ``conds_mean/conds_std`` (:class:`~ipl_diffusion.models.latent_net.LatentNetModel`).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 256,
        in_channels: int = 3,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 1, 2, 2, 4, 4, 4),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        num_attention_heads: int = 1,
        z_sem_channels: int = 512,
    ):
        super().__init__()
        self.gradient_checkpointing = False
        ch = int(channel_mult[0] * model_channels)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        resolution = sample_size
        down = []
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                out = int(mult * model_channels)
                attn = make_attention(out, num_attention_heads) if resolution in attention_resolutions else None
                down.append(DiffAEUNetLayer(DiffAEResBlock(ch, out), attn))
                ch = out
            if level != len(channel_mult) - 1:
                down.append(DiffAEUNetLayer(DiffAEResBlock(ch, ch, down=True)))
                resolution //= 2
        self.down_blocks = nn.ModuleList(down)
        self.mid_block = DiffAEMidBlock(
            DiffAEResBlock(ch, ch), make_attention(ch, num_attention_heads), DiffAEResBlock(ch, ch)
        )
        # "adaptivenonzero" pooling head: GN -> SiLU -> global average pool -> 1x1 conv.
        self.norm_out = GroupNorm32(ch)
        self.conv_out = nn.Conv2d(ch, z_sem_channels, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Encode images.

        Args:
            images: ``(B, in_channels, H, W)`` float in ``[-1, 1]``, H and W multiples of
                :attr:`downsampling_factor`.

        Returns:
            ``z_sem``: ``(B, z_sem_channels)`` in the dtype of ``images``.

        Raises:
            ValueError: wrong shape or a size not divisible by the downsampling factor.
        """
        check_spatial_size(images, self.downsampling_factor, self.config.in_channels, type(self).__name__)
        h = self.conv_in(images.to(dtype=self.dtype))
        for layer in self.down_blocks:
            h = self._run(layer, h)
        h = self._run(self.mid_block, h)
        h = F.adaptive_avg_pool2d(F.silu(self.norm_out(h)), 1)
        return self.conv_out(h).flatten(1).to(images.dtype)
