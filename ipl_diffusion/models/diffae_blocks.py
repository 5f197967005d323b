"""Building blocks shared by the DiffAE semantic encoder and the DiffAE conditional UNet.

They mirror the blocks of upstream DiffAE (``phizaz/diffae``, ``model/blocks.py`` and
``model/nn.py``, config ``ffhq256_autoenc``):

* :class:`GroupNorm32` - group norm computed in float32 (upstream ``GroupNorm32``), with
  ``min(32, C)`` groups (upstream ``normalization``).
* :class:`DiffAEResBlock` - the residual block. With a time embedding it is DiffAE's
  two-condition block (time scale-shift, then the multiplicative ``z_sem`` term, both
  applied after the second group norm and before SiLU); without one it is the encoder's
  single-conv block ``x + conv3x3(SiLU(GN(x)))``.
* :func:`make_attention` - DiffAE's spatial self-attention block expressed as a diffusers
  :class:`~diffusers.models.attention_processor.Attention` (group norm, 1 head, residual),
  so ``set_attn_processor``, SDPA and xformers work on it.
* :class:`DiffAELevelsMixin` - what the UNet and the semantic encoder share: one halving of
  the resolution per ``channel_mult`` level, and blocks run under optional gradient
  checkpointing.
* :class:`XFormersFallbackMixin` - ``enable_xformers_memory_efficient_attention()`` that,
  where xformers cannot run, warns once and keeps PyTorch SDPA instead of raising.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.utils import is_xformers_available
from torch import nn

__all__ = [
    "GroupNorm32",
    "DiffAEResBlock",
    "make_attention",
    "check_spatial_size",
    "xformers_unavailable_reason",
    "XFormersFallbackMixin",
    "DiffAELevelsMixin",
]


class GroupNorm32(nn.GroupNorm):
    """Group norm with ``min(32, C)`` groups, computed in float32 and cast back.

    Upstream DiffAE normalises in float32 even under fp16 autocast; doing the same keeps
    half-precision outputs close to the float32 ones.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__(min(32, num_channels), num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def _resample(x: torch.Tensor, up: bool, down: bool) -> torch.Tensor:
    # Parameter-free resampling, as upstream's Upsample/Downsample(use_conv=False).
    if up:
        return F.interpolate(x, scale_factor=2, mode="nearest")
    if down:
        return F.avg_pool2d(x, kernel_size=2, stride=2)
    return x


class DiffAEResBlock(nn.Module):
    """DiffAE residual block (upstream ``model/blocks.py::ResBlock``).

    With ``temb_channels`` set (the UNet)::

        h = conv1(SiLU(norm1(x)))                       # (resampled before conv1 if up/down)
        s_t, b_t = time_emb_proj(SiLU(temb)).chunk(2)   # time: scale, then shift
        h = norm2(h) * (1 + s_t) + b_t
        h = h * (1 + cond_emb_proj(SiLU(z_sem)))        # z_sem: scale only
        h = conv2(dropout(SiLU(h)))
        return conv_shortcut(x) + h

    which is the code form of the paper's AdaGN(h, t, z_sem) = z_s (t_s GN(h) + t_b).
    Without ``temb_channels`` (the semantic encoder, upstream ``use_condition=False``) the
    block has no second half: ``conv_shortcut(x) + conv1(SiLU(norm1(x)))``.

    ``in_channels`` includes the concatenated skip ("lateral") channels of the UNet's
    decoder blocks; ``conv_shortcut`` is a 1x1 conv when the channel count changes.
    ``up``/``down`` resample both paths by 2 (nearest / average pool).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: Optional[int] = None,
        temb_channels: Optional[int] = None,
        cond_channels: Optional[int] = None,
        dropout: float = 0.0,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        if up and down:
            raise ValueError("a DiffAEResBlock resamples up or down, not both")
        self.up, self.down = up, down
        self.norm1 = GroupNorm32(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.has_conditions = temb_channels is not None
        if self.has_conditions:
            self.time_emb_proj = nn.Linear(temb_channels, 2 * out_channels)
            self.cond_emb_proj = nn.Linear(cond_channels, out_channels) if cond_channels else None
            self.norm2 = GroupNorm32(out_channels)
            self.dropout = nn.Dropout(dropout)
            self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
            # Zero-initialised last conv: each block starts as the identity (upstream
            # resnet_use_zero_module=True).
            nn.init.zeros_(self.conv2.weight)
            nn.init.zeros_(self.conv2.bias)
        elif cond_channels:
            raise ValueError("a z_sem condition needs a time embedding (temb_channels)")
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(
        self,
        x: torch.Tensor,
        temb: Optional[torch.Tensor] = None,
        cond: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        h = F.silu(self.norm1(x))
        h = _resample(h, self.up, self.down)
        x = _resample(x, self.up, self.down)
        h = self.conv1(h)
        if self.has_conditions:
            h = self.norm2(h)
            scale, shift = self.time_emb_proj(F.silu(temb)).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
            if self.cond_emb_proj is not None and cond is not None:
                h = h * (1 + self.cond_emb_proj(F.silu(cond)).to(h.dtype)[:, :, None, None])
            h = self.conv2(self.dropout(F.silu(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


def make_attention(channels: int, num_heads: int = 1, zero_init: bool = True) -> Attention:
    """DiffAE's spatial self-attention block as a diffusers ``Attention``.

    Upstream ``AttentionBlock``: ``x + proj_out(attn(qkv(GN(x))))`` over the H*W positions,
    softmax scale ``1/sqrt(C/heads)``. Here ``group_norm`` is the GN, ``to_q/to_k/to_v`` the
    three slices of the 1x1 ``qkv`` conv, ``to_out.0`` ``proj_out`` (zero-initialised, as
    upstream) and ``residual_connection=True`` the skip. Input/output ``(B, C, H, W)``.
    """
    if channels % num_heads:
        raise ValueError(f"attention channels {channels} are not divisible by num_heads {num_heads}")
    attn = Attention(
        query_dim=channels,
        heads=num_heads,
        dim_head=channels // num_heads,
        bias=True,
        out_bias=True,
        norm_num_groups=min(32, channels),
        eps=1e-5,
        residual_connection=True,
        rescale_output_factor=1.0,
        upcast_softmax=True,
        _from_deprecated_attn_block=True,
    )
    if zero_init:
        nn.init.zeros_(attn.to_out[0].weight)
        nn.init.zeros_(attn.to_out[0].bias)
    return attn


def check_spatial_size(x: torch.Tensor, factor: int, in_channels: int, name: str) -> None:
    """Raise ``ValueError`` unless ``x`` is ``(B, in_channels, H, W)`` with H, W divisible by ``factor``.

    Called before any forward computation so that a wrong image size fails with a clear
    message instead of a shape mismatch deep inside the skip connections.
    """
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ValueError(f"{name} expects images of shape (B, {in_channels}, H, W); got {tuple(x.shape)}")
    height, width = x.shape[-2:]
    if height % factor or width % factor:
        raise ValueError(
            f"{name} needs H and W divisible by its downsampling factor {factor}; got {height}x{width}. "
            f"Resize or crop the images (e.g. ipl_diffusion.images.load_image(path, size)) first."
        )


def xformers_unavailable_reason() -> Optional[str]:
    """``None`` if xformers' memory-efficient attention can run here, else why not (a sentence)."""
    if not is_xformers_available():
        return "the xformers package is not installed"
    if not torch.cuda.is_available():
        return "xformers memory-efficient attention needs a CUDA GPU and none is available"
    try:
        import xformers.ops  # noqa: F401
    except Exception as err:  # a broken build (e.g. compiled for another torch) fails here
        return f"xformers cannot be imported ({type(err).__name__}: {err})"
    return None


def warn_xformers_fallback(reason: str) -> None:
    warnings.warn(
        f"enable_xformers_memory_efficient_attention(): {reason}; "
        "falling back to PyTorch scaled_dot_product_attention (AttnProcessor2_0).",
        UserWarning,
        stacklevel=3,
    )


class XFormersFallbackMixin:
    """Make ``enable_xformers_memory_efficient_attention()`` degrade gracefully.

    diffusers raises ``ModuleNotFoundError``/``ValueError`` when xformers is missing or
    there is no GPU. A model trained on a GPU box is often reused on a laptop with the
    same script, so instead we warn once and select PyTorch SDPA (``AttnProcessor2_0``),
    whose outputs match xformers' to numerical precision. Must precede ``ModelMixin`` in
    the bases; needs ``AttentionMixin.set_attn_processor``.
    """

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op: Optional[Callable] = None):
        if valid:
            reason = xformers_unavailable_reason()
            if reason is not None:
                warn_xformers_fallback(reason)
                self.set_attn_processor(AttnProcessor2_0())
                return
        super().set_use_memory_efficient_attention_xformers(valid, attention_op)


class DiffAELevelsMixin:
    """Shared by :class:`DiffAEUNetModel` and :class:`SemanticEncoder` (both have a
    ``channel_mult`` config and diffusers' ``gradient_checkpointing`` flag)."""

    @property
    def downsampling_factor(self) -> int:
        """Input H and W must be multiples of this (``2 ** (len(channel_mult) - 1)``)."""
        return 2 ** (len(self.config.channel_mult) - 1)

    def _run(self, layer, *args):
        # Checkpoint only when a backward pass will follow; inference keeps the plain call.
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(layer, *args)
        return layer(*args)
