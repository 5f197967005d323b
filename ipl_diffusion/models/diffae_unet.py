"""DiffAE's ``z_sem``-conditioned UNet as a diffusers model.

Mirrors upstream DiffAE's ``BeatGANsAutoencModel`` decoder (``phizaz/diffae``,
``model/unet.py`` + ``model/unet_autoenc.py``, config ``ffhq256_autoenc``); the semantic
encoder lives in :mod:`ipl_diffusion.models.semantic_encoder`.

Defaults reproduce ``ffhq256_autoenc`` exactly (138,341,891 parameters, "138.34 M"; with the encoder 168,492,291). A tiny
config for tests and toy data::

    unet = DiffAEUNetModel(sample_size=16, model_channels=32, channel_mult=(1, 2),
                           num_res_blocks=1, attention_resolutions=(8,), embed_channels=64,
                           z_sem_channels=32)

Layout (module names -> upstream checkpoint names, see
:mod:`ipl_diffusion.conversion.diffae`)::

    time_proj, time_embedding   sinusoid [cos, sin] of width model_channels -> MLP (time_embed.time_embed)
    conv_in                     conv3x3 in_channels -> model_channels       (input_blocks.0.0)
    down_blocks[k]              resnet [+ attention] or a down-resnet       (input_blocks.{k+1})
    mid_block                   resnet_1, attention, resnet_2               (middle_block)
    up_blocks[k]                skip-concat resnet [+ attention] [+ up-resnet] (output_blocks.k)
    norm_out, conv_out          GN -> SiLU -> conv3x3 (zero-initialised)    (out.0, out.2)

Every resnet is a :class:`~ipl_diffusion.models.diffae_blocks.DiffAEResBlock` conditioned on
the time embedding (scale, shift) and on the raw ``z_sem`` (scale), every attention a diffusers
``Attention`` so ``set_attn_processor``, SDPA and ``enable_xformers_memory_efficient_attention``
work (the latter warns once and keeps SDPA where xformers cannot run). Gradient checkpointing:
``enable_gradient_checkpointing()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from .diffae_blocks import DiffAELevelsMixin, DiffAEResBlock, GroupNorm32, XFormersFallbackMixin, check_spatial_size, make_attention
from .config_keys import StrictConfigMixin

__all__ = ["DiffAEUNetModel", "DiffAEUNetOutput", "DiffAEUNetLayer", "DiffAEMidBlock"]


@dataclass
class DiffAEUNetOutput(BaseOutput):
    """``sample``: the prediction, ``(B, out_channels, H, W)``, same dtype as the input: noise eps
    (upstream DiffAE), or v for a model trained with ``prediction_type="v_prediction"``."""

    sample: torch.Tensor


class DiffAEUNetLayer(nn.Module):
    """One upstream ``TimestepEmbedSequential``: ``resnet`` [-> ``attention``] [-> ``resample``].

    In the decoder the skip tensor is concatenated to the input first (upstream
    ``has_lateral``). ``resample`` is the up-resnet upstream appends to the last decoder
    block of each level; in the encoder path a down step is its own layer whose ``resnet``
    has ``down=True``.
    """

    def __init__(
        self,
        resnet: DiffAEResBlock,
        attention: Optional[nn.Module] = None,
        resample: Optional[DiffAEResBlock] = None,
    ):
        super().__init__()
        self.resnet = resnet
        self.attention = attention
        self.resample = resample

    def forward(self, h, temb=None, cond=None, skip=None):
        if skip is not None:
            h = torch.cat([h, skip], dim=1)
        h = self.resnet(h, temb, cond)
        if self.attention is not None:
            h = self.attention(h)
        if self.resample is not None:
            h = self.resample(h, temb, cond)
        return h


class DiffAEMidBlock(nn.Module):
    """Upstream ``middle_block``: resnet -> attention -> resnet at the lowest resolution."""

    def __init__(self, resnet_1: DiffAEResBlock, attention: nn.Module, resnet_2: DiffAEResBlock):
        super().__init__()
        self.resnet_1 = resnet_1
        self.attention = attention
        self.resnet_2 = resnet_2

    def forward(self, h, temb=None, cond=None):
        h = self.resnet_1(h, temb, cond)
        h = self.attention(h)
        return self.resnet_2(h, temb, cond)


class DiffAEUNetModel(StrictConfigMixin, DiffAELevelsMixin, XFormersFallbackMixin, ModelMixin, AttentionMixin, ConfigMixin):
    """DiffAE conditional UNet: ``(x_t, t, z_sem) -> eps`` (or ``v``; the pipeline's scheduler
    config ``prediction_type`` records which, and :func:`ipl_diffusion.ddim.predict_eps` converts).

    Args (config):
        sample_size: image size the attention placement refers to (upstream ``img_size``).
            Other sizes divisible by ``2 ** (len(channel_mult) - 1)`` also run.
        in_channels, out_channels: image channels (3, 3).
        model_channels: base width (upstream ``net_ch``, 128).
        channel_mult: width multiplier per level (upstream ``net_ch_mult``, ``(1, 1, 2, 2, 4, 4)``).
        num_res_blocks: resnets per level in the down path; the up path has one more (2).
        attention_resolutions: *pixel* resolutions (relative to ``sample_size``) with
            attention after each resnet (``(16,)``); the middle block always has one.
        num_attention_heads: heads of every attention (1).
        dropout: dropout inside every resnet (0.1 as in training; call ``.eval()`` for inference).
        embed_channels: width of the time embedding (512).
        z_sem_channels: width of ``z_sem`` (512).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 256,
        in_channels: int = 3,
        out_channels: int = 3,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 1, 2, 2, 4, 4),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        num_attention_heads: int = 1,
        dropout: float = 0.1,
        embed_channels: int = 512,
        z_sem_channels: int = 512,
    ):
        super().__init__()
        self.gradient_checkpointing = False
        self.time_proj = Timesteps(model_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(model_channels, embed_channels)

        def resnet(cin, cout, **kw):
            return DiffAEResBlock(cin, cout, embed_channels, z_sem_channels, dropout, **kw)

        def attention(ch, resolution):
            return make_attention(ch, num_attention_heads) if resolution in attention_resolutions else None

        ch = int(channel_mult[0] * model_channels)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        skip_channels = [ch]
        resolution = sample_size
        down = []
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                out = int(mult * model_channels)
                down.append(DiffAEUNetLayer(resnet(ch, out), attention(out, resolution)))
                ch = out
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down.append(DiffAEUNetLayer(resnet(ch, ch, down=True)))
                skip_channels.append(ch)
                resolution //= 2
        self.down_blocks = nn.ModuleList(down)

        self.mid_block = DiffAEMidBlock(resnet(ch, ch), make_attention(ch, num_attention_heads), resnet(ch, ch))

        up = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                out = int(mult * model_channels)
                res = resnet(ch + skip_channels.pop(), out)
                ch = out
                attn = attention(ch, resolution)
                upsample = None
                if level and i == num_res_blocks:
                    upsample = resnet(ch, ch, up=True)
                    resolution *= 2
                up.append(DiffAEUNetLayer(res, attn, upsample))
        self.up_blocks = nn.ModuleList(up)

        self.norm_out = GroupNorm32(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Union[torch.Tensor, float, int],
        z_sem: torch.Tensor,
        return_dict: bool = True,
    ) -> Union[DiffAEUNetOutput, tuple]:
        """Predict the noise in ``sample``.

        Args:
            sample: ``x_t``, ``(B, in_channels, H, W)``, H and W multiples of
                :attr:`downsampling_factor`.
            timestep: integer diffusion step in ``[0, num_train_timesteps)`` as the network
                saw in training (upstream ``rescale_timesteps=False``): a number, a 0-d tensor or
                ``(B,)``.
            z_sem: semantic code ``(B, z_sem_channels)`` (raw encoder output, not normalised).
            return_dict: return :class:`DiffAEUNetOutput` (default) or a 1-tuple.

        Returns:
            eps (or v, see the class docstring) with the shape and dtype of ``sample`` (``.sample``
            of the output).

        Raises:
            ValueError: wrong image shape / size or a ``z_sem`` that does not match the batch.
        """
        check_spatial_size(sample, self.downsampling_factor, self.config.in_channels, type(self).__name__)
        batch = sample.shape[0]
        if z_sem.ndim != 2 or z_sem.shape != (batch, self.config.z_sem_channels):
            raise ValueError(
                f"z_sem must have shape ({batch}, {self.config.z_sem_channels}); got {tuple(z_sem.shape)}"
            )
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=sample.device)
        timestep = timestep.to(sample.device).reshape(-1)
        if timestep.numel() == 1:
            timestep = timestep.expand(batch)
        elif timestep.numel() != batch:
            raise ValueError(f"timestep must be a scalar or have {batch} entries; got {timestep.numel()}")

        temb = self.time_embedding(self.time_proj(timestep).to(dtype=self.dtype))
        cond = z_sem.to(dtype=self.dtype)
        h = self.conv_in(sample.to(dtype=self.dtype))
        skips = [h]
        for layer in self.down_blocks:
            h = self._run(layer, h, temb, cond)
            skips.append(h)
        h = self._run(self.mid_block, h, temb, cond)
        for layer in self.up_blocks:
            h = self._run(layer, h, temb, cond, skips.pop())
        eps = self.conv_out(F.silu(self.norm_out(h))).to(sample.dtype)
        if not return_dict:
            return (eps,)
        return DiffAEUNetOutput(sample=eps)
