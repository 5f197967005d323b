"""StyleGAN2 generator (Karras et al., CVPR 2020) in plain PyTorch, in the rosinality layout.

The module tree and parameter names follow rosinality's ``stylegan2-pytorch`` ``model.py``
``Generator`` exactly, so the ``g_ema`` state dict of a rosinality / StyleGAN-NADA / IPL
checkpoint loads with ``load_state_dict(..., strict=True)``:

```
style.{1..n_mlp}.{weight,bias}                mapping network (PixelNorm at index 0)
input.input                                   learned constant (1, C4, 4, 4)
conv1.conv.{weight,modulation.*}              first StyledConv at 4x4        (w+ index 0)
conv1.noise.weight, conv1.activate.bias
to_rgb1.conv.{weight,modulation.*}, to_rgb1.bias                            (w+ index 1)
convs.{k}.conv.{weight,modulation.*,blur.kernel}  two StyledConvs per resolution 8..size
convs.{k}.noise.weight, convs.{k}.activate.bias                             (w+ index k+1)
to_rgbs.{m}.{conv.*,bias,upsample.kernel}     ToRGB skips                   (w+ index 2m+3)
noises.noise_{i}                              fixed noise maps (1, 1, r, r)
```

The file also holds rosinality's ``Discriminator`` (:class:`StyleGAN2Discriminator`, keys of a
checkpoint's ``"d"``), for training small generators such as the Shapes world's, and
:data:`SMALL_CONFIGS`, the configurations of those small generators.

The two custom CUDA ops of the reference code (``upfirdn2d`` and ``fused_leaky_relu``, JIT
compiled at import time there, which is what breaks it on CPU-only machines) are written
here as ordinary differentiable PyTorch ops, so the same file runs on CPU and GPU.

Channel widths follow rosinality: ``512`` up to 32x32, then ``16384 * channel_multiplier /
resolution`` (config-f is ``channel_multiplier=2``). The one addition is ``channel_max``
(default 512, the rosinality value), which caps every width; it exists so tests and small
worlds (the 32x32 Shapes generator) can build genuinely small generators with the same code.
"""

import math
import random
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ipl_diffusion.errors import UserError
from .config_keys import StrictConfigMixin

SQRT_2 = math.sqrt(2.0)


# --------------------------------------------------------------------------------------
# The two "custom ops", as plain PyTorch
# --------------------------------------------------------------------------------------


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad=(0, 0)) -> torch.Tensor:
    """Upsample, FIR-filter, downsample each channel of ``x`` (rosinality ``op/upfirdn2d``).

    Definition (what the CUDA kernel computes, per channel):
      1. insert ``up - 1`` zeros after every sample along both axes;
      2. pad with ``pad[0]`` zeros before and ``pad[1]`` zeros after, on both axes (a negative
         value crops instead);
      3. convolve (true convolution, i.e. the kernel flipped) with ``kernel`` (``(kh, kw)``),
         keeping only positions where the kernel lies fully inside ("valid");
      4. keep every ``down``-th sample, starting at 0.

    Args:
        x: ``(N, C, H, W)`` float tensor.
        kernel: ``(kh, kw)`` filter taps, same dtype/device as ``x`` (cast if not).
    Returns:
        ``(N, C, (H*up + pad0 + pad1 - kh) // down + 1, same for W)``.
    """
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    pad0, pad1 = pad
    out = x
    if up > 1:
        # Zero insertion as a reshape + pad: (h, 1, w, 1) -> (h, up, w, up) with zeros after.
        out = out.reshape(n, c, h, 1, w, 1)
        out = F.pad(out, [0, up - 1, 0, 0, 0, up - 1])
        out = out.reshape(n, c, h * up, w * up)
    # Constant padding with negative sizes crops, which is what the op does with negative pads.
    out = F.pad(out, [pad0, pad1, pad0, pad1])
    # conv2d is a correlation; flipping the kernel makes it the convolution of the definition.
    # A strided valid convolution equals the full one sampled every ``down`` from index 0.
    # The same filter per channel as a depthwise convolution (groups=C): folding channels into
    # the batch as (N*C, 1, H, W) instead is 10-20x slower on CPU (oneDNN has no fast path for
    # one-channel convolutions, least of all their backward).
    weight = torch.flip(kernel, [0, 1]).to(dtype=out.dtype, device=out.device)
    weight = weight.reshape(1, 1, kh, kw).expand(c, 1, kh, kw)
    return F.conv2d(out, weight, stride=down, groups=c)


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor, negative_slope: float = 0.2, scale: float = SQRT_2) -> torch.Tensor:
    """``leaky_relu(x + bias, negative_slope) * scale`` with ``bias`` broadcast along dim 1
    (rosinality ``op/fused_act``; the ``sqrt(2)`` gain keeps activations' second moment)."""
    shape = [1, -1] + [1] * (x.ndim - 2)
    return F.leaky_relu(x + bias.reshape(shape).to(x.dtype), negative_slope=negative_slope) * scale


class FusedLeakyReLU(nn.Module):
    """Per-channel bias + scaled leaky ReLU. Parameter: ``bias`` ``(channels,)``."""

    def __init__(self, channels: int, negative_slope: float = 0.2, scale: float = SQRT_2):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.negative_slope = negative_slope
        self.scale = scale

    def forward(self, x):
        return fused_leaky_relu(x, self.bias, self.negative_slope, self.scale)


def make_kernel(taps: Sequence[float]) -> torch.Tensor:
    """Separable 2-D FIR kernel from 1-D taps, normalised to sum 1 (``[1,3,3,1]`` -> 4x4 blur)."""
    k = torch.tensor(taps, dtype=torch.float32)
    if k.ndim == 1:
        k = k[None, :] * k[:, None]
    return k / k.sum()


# --------------------------------------------------------------------------------------
# Building blocks (names and parameter shapes as in rosinality)
# --------------------------------------------------------------------------------------


class PixelNorm(nn.Module):
    """Normalise each latent vector to unit root-mean-square (input of the mapping network)."""

    def forward(self, x):
        return x * torch.rsqrt(torch.mean(x * x, dim=1, keepdim=True) + 1e-8)


class Upsample(nn.Module):
    """2x upsampling with an FIR filter; used on the ToRGB skip path. Buffer: ``kernel``."""

    def __init__(self, taps, factor: int = 2):
        super().__init__()
        self.factor = factor
        # Zero insertion divides the signal's mean by factor**2; the gain restores it.
        self.register_buffer("kernel", make_kernel(taps) * factor**2)
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x):
        return upfirdn2d(x, self.kernel, up=self.factor, down=1, pad=self.pad)


class Blur(nn.Module):
    """FIR low-pass filter applied after a transposed (upsampling) convolution. Buffer: ``kernel``."""

    def __init__(self, taps, pad, upsample_factor: int = 1):
        super().__init__()
        kernel = make_kernel(taps)
        if upsample_factor > 1:
            kernel = kernel * upsample_factor**2
        self.register_buffer("kernel", kernel)
        self.pad = pad

    def forward(self, x):
        return upfirdn2d(x, self.kernel, pad=self.pad)


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate (weights stored as N(0,1)/lr_mul, scaled at run time).

    ``activation`` truthy: ``fused_leaky_relu(x W^T, bias * lr_mul)`` as in the mapping network.
    Parameters: ``weight`` ``(out_dim, in_dim)``, ``bias`` ``(out_dim,)``.
    """

    def __init__(self, in_dim, out_dim, bias=True, bias_init=0.0, lr_mul=1.0, activation=None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init))) if bias else None
        self.activation = activation
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul

    def forward(self, x):
        bias = self.bias * self.lr_mul if self.bias is not None else None
        if self.activation:
            out = F.linear(x, self.weight * self.scale)
            return fused_leaky_relu(out, bias if bias is not None else out.new_zeros(out.shape[1]))
        return F.linear(x, self.weight * self.scale, bias=bias)

    def extra_repr(self):
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, lr_mul={self.lr_mul}"


class ModulatedConv2d(nn.Module):
    """Style-modulated (and optionally demodulated) convolution, optionally 2x upsampling.

    Per sample ``b``: ``W_b = scale * W * s_b`` over input channels with ``s_b = A(w_b)``
    (``modulation``, bias initialised to 1), then ``W_b /= ||W_b||`` per output channel when
    ``demodulate``. All samples run as one grouped convolution.
    Parameters: ``weight`` ``(1, out, in, k, k)``, ``modulation.{weight,bias}``; ``blur.kernel``
    when upsampling.
    """

    def __init__(self, in_channel, out_channel, kernel_size, style_dim, demodulate=True, upsample=False, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        self.in_channel = in_channel
        self.out_channel = out_channel
        self.kernel_size = kernel_size
        self.upsample = upsample
        self.demodulate = demodulate
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        self.scale = 1 / math.sqrt(in_channel * kernel_size**2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1)

    def extra_repr(self):
        return f"{self.in_channel}, {self.out_channel}, {self.kernel_size}, upsample={self.upsample}, demodulate={self.demodulate}"

    def forward(self, x, style):
        batch, in_channel, height, width = x.shape
        k = self.kernel_size
        s = self.modulation(style).reshape(batch, 1, in_channel, 1, 1)
        weight = self.scale * self.weight * s  # (B, out, in, k, k)
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum(dim=[2, 3, 4], keepdim=True) + 1e-8)
        x = x.reshape(1, batch * in_channel, height, width)
        if self.upsample:
            # conv_transpose2d wants (in, out/groups, k, k) per group.
            weight = weight.transpose(1, 2).reshape(batch * in_channel, self.out_channel, k, k)
            out = F.conv_transpose2d(x, weight, padding=0, stride=2, groups=batch)
            out = out.reshape(batch, self.out_channel, out.shape[-2], out.shape[-1])
            return self.blur(out)
        weight = weight.reshape(batch * self.out_channel, in_channel, k, k)
        out = F.conv2d(x, weight, padding=self.padding, groups=batch)
        return out.reshape(batch, self.out_channel, height, width)


class NoiseInjection(nn.Module):
    """Adds ``weight * noise`` (one learned scalar); fresh N(0,1) noise when none is given."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, image, noise=None):
        if noise is None:
            batch, _, height, width = image.shape
            noise = image.new_empty(batch, 1, height, width).normal_()
        return image + self.weight * noise


class ConstantInput(nn.Module):
    """The learned 4x4 constant the synthesis network starts from. Parameter: ``input``."""

    def __init__(self, channel, size=4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, batch_size: int):
        return self.input.expand(batch_size, -1, -1, -1)


class StyledConv(nn.Module):
    """ModulatedConv2d -> NoiseInjection -> FusedLeakyReLU (the unit NADA freezes/unfreezes)."""

    def __init__(self, in_channel, out_channel, kernel_size, style_dim, upsample=False, blur_kernel=(1, 3, 3, 1), demodulate=True):
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim, demodulate=demodulate, upsample=upsample, blur_kernel=blur_kernel)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)

    def forward(self, x, style, noise=None):
        return self.activate(self.noise(self.conv(x, style), noise=noise))


class ToRGB(nn.Module):
    """1x1 modulated conv (no demodulation) to RGB, plus the upsampled skip from the previous scale."""

    def __init__(self, in_channel, style_dim, upsample=True, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x, style, skip=None):
        out = self.conv(x, style) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


def stylegan2_channels(resolution: int, channel_multiplier: int = 2, channel_max: int = 512) -> int:
    """Feature width at ``resolution`` (rosinality's table: 512 up to 32, then 16384*cm/res)."""
    return int(min(channel_max, 512 if resolution <= 32 else 16384 * channel_multiplier // resolution))


# --------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------

LatentInput = Union[torch.Tensor, Sequence[torch.Tensor]]


class StyleGAN2Generator(StrictConfigMixin, ModelMixin, ConfigMixin):
    """StyleGAN2 generator, rosinality ``Generator`` layout (strict ``g_ema`` compatibility).

    Args (saved in ``config.json``):
        size: output resolution, a power of two in ``[32, 1024]`` (rosinality also builds 8/16;
            we accept any power of two >= 8).
        style_dim: latent width of ``z`` and ``w`` (512 for every public checkpoint).
        n_mlp: depth of the mapping network (8 in config-f; 2 in some small models).
        channel_multiplier: 2 for config-f (FFHQ 1024, AFHQ 512), 1 for the narrower configs.
        blur_kernel: FIR taps of the up-sampling filter.
        lr_mlp: equalised-LR multiplier of the mapping network (0.01).
        channel_max: cap on every feature width (512 = rosinality; smaller only for tiny models).

    Attributes: ``n_latent = 2*log2(size) - 2`` (W+ rows: 14 at 256, 18 at 1024),
    ``num_layers`` (noise maps), ``log_size``.

    Use :meth:`from_rosinality_state_dict` (or ``ipl_diffusion.conversion.stylegan2``) for
    upstream ``.pt`` files, ``from_pretrained`` / ``save_pretrained`` (safetensors) for ours.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        size: int = 256,
        style_dim: int = 512,
        n_mlp: int = 8,
        channel_multiplier: int = 2,
        blur_kernel: Sequence[int] = (1, 3, 3, 1),
        lr_mlp: float = 0.01,
        channel_max: int = 512,
    ):
        super().__init__()
        if size < 8 or size & (size - 1):
            raise ValueError(f"size must be a power of two >= 8 (e.g. 256, 512, 1024), got {size}")
        if n_mlp < 1:
            raise ValueError(f"n_mlp must be >= 1, got {n_mlp}")
        if channel_multiplier < 1:
            raise ValueError(f"channel_multiplier must be >= 1, got {channel_multiplier}")
        blur_kernel = list(blur_kernel)
        self.size = size
        self.style_dim = style_dim
        self.log_size = int(math.log2(size))
        self.num_layers = (self.log_size - 2) * 2 + 1
        self.n_latent = self.log_size * 2 - 2

        self.style = nn.Sequential(PixelNorm(), *[EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation="fused_lrelu") for _ in range(n_mlp)])

        def ch(res):
            return stylegan2_channels(res, channel_multiplier, channel_max)

        self.input = ConstantInput(ch(4))
        self.conv1 = StyledConv(ch(4), ch(4), 3, style_dim, blur_kernel=blur_kernel)
        self.to_rgb1 = ToRGB(ch(4), style_dim, upsample=False)

        self.convs = nn.ModuleList()
        self.upsamples = nn.ModuleList()  # empty; kept so child order matches rosinality/NADA
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for layer_idx in range(self.num_layers):
            res = 2 ** ((layer_idx + 5) // 2)
            self.noises.register_buffer(f"noise_{layer_idx}", torch.randn(1, 1, res, res))

        in_channel = ch(4)
        for i in range(3, self.log_size + 1):
            out_channel = ch(2**i)
            self.convs.append(StyledConv(in_channel, out_channel, 3, style_dim, upsample=True, blur_kernel=blur_kernel))
            self.convs.append(StyledConv(out_channel, out_channel, 3, style_dim, blur_kernel=blur_kernel))
            self.to_rgbs.append(ToRGB(out_channel, style_dim, blur_kernel=blur_kernel))
            in_channel = out_channel

    # ---- latents --------------------------------------------------------------------

    def get_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Mapping network: ``z`` ``(N, style_dim)`` -> ``w`` ``(N, style_dim)``."""
        self._check_latent(z, "z", allow_plus=False)
        return self.style(z)

    @torch.no_grad()
    def mean_latent(self, n_samples: int = 4096, seed: Optional[int] = 0) -> torch.Tensor:
        """Truncation centre: mean of ``w`` over ``n_samples`` z ~ N(0, I) -> ``(1, style_dim)``.

        As rosinality ``mean_latent(4096)`` (what NADA and IPL use), but seeded so the centre
        is reproducible (``seed=None`` uses the global RNG).
        """
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        z = torch.randn(n_samples, self.style_dim, generator=gen).to(self.device, self.dtype)
        return self.style(z).mean(0, keepdim=True)

    def make_noise(self, generator: Optional[torch.Generator] = None):
        """One fresh noise map per layer, shapes as ``noises.noise_i``."""
        return [torch.randn(getattr(self.noises, f"noise_{i}").shape, generator=generator).to(self.device, self.dtype) for i in range(self.num_layers)]

    def _check_latent(self, latent, name, allow_plus):
        expected = f"(N, {self.style_dim})" + (f" or (N, {self.n_latent}, {self.style_dim})" if allow_plus else "")
        if not isinstance(latent, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape {expected}, received {type(latent).__name__}")
        shape = tuple(latent.shape)
        ok = (latent.ndim == 2 and shape[1] == self.style_dim) or (allow_plus and latent.ndim == 3 and shape[1:] == (self.n_latent, self.style_dim))
        if not ok or shape[0] == 0:
            raise ValueError(f"{name} has shape {shape}; expected {expected} with N >= 1 for this {self.size}px generator")
        if not latent.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, received dtype {latent.dtype}")

    def to_w_plus(
        self,
        latents: LatentInput,
        input_is_latent: bool = False,
        truncation: float = 1.0,
        truncation_latent: Optional[torch.Tensor] = None,
        inject_index: Optional[int] = None,
    ) -> torch.Tensor:
        """Turn ``z`` / ``w`` / ``w+`` (one tensor, or a list of two for style mixing) into W+.

        Args:
            latents: a tensor or a list/tuple of one or two tensors. With ``input_is_latent=False``
                each is ``z`` ``(N, style_dim)``; with ``True`` each is ``w`` ``(N, style_dim)`` or
                ``w+`` ``(N, n_latent, style_dim)``.
            truncation: psi; ``w <- c + psi * (w - c)`` with ``c = truncation_latent`` (default
                :meth:`mean_latent` with seed 0). 1 = off.
            inject_index: style mixing crossover: W+ rows ``[0, inject_index)`` come from the first
                latent, the rest from the second (random in ``[1, n_latent-1]`` if None, as
                rosinality).
        Returns:
            ``(N, n_latent, style_dim)``.
        Raises:
            ValueError: wrong shapes (expected vs received), more than two latents, mismatched
                batch sizes, or an ``inject_index`` outside ``[1, n_latent - 1]``.
        """
        styles = list(latents) if isinstance(latents, (list, tuple)) else [latents]
        if not 1 <= len(styles) <= 2:
            raise ValueError(f"expected one latent, or two for style mixing; received {len(styles)}")
        name = "w/w+" if input_is_latent else "z"
        for s in styles:
            self._check_latent(s, name, allow_plus=input_is_latent)
        if len({s.shape[0] for s in styles}) > 1:
            raise ValueError(f"style-mixing latents must have the same batch size, received {[tuple(s.shape) for s in styles]}")
        if not input_is_latent:
            styles = [self.style(s) for s in styles]
        if truncation != 1:
            centre = truncation_latent if truncation_latent is not None else self.mean_latent()
            if centre.numel() != self.style_dim:
                raise ValueError(f"truncation_latent must hold {self.style_dim} values, e.g. shape (1, {self.style_dim}); received {tuple(centre.shape)}")
            # (1, D) broadcasts against w (N, D) and w+ (N, L, D) alike.
            centre = centre.reshape(1, self.style_dim).to(styles[0].dtype)
            styles = [centre + truncation * (s - centre) for s in styles]
        plus = [s if s.ndim == 3 else s.unsqueeze(1).expand(-1, self.n_latent, -1) for s in styles]
        if len(plus) == 1:
            return plus[0]
        if inject_index is None:
            inject_index = random.randint(1, self.n_latent - 1)
        if not 1 <= inject_index <= self.n_latent - 1:
            raise ValueError(f"inject_index must lie in [1, {self.n_latent - 1}], got {inject_index}")
        return torch.cat([plus[0][:, :inject_index], plus[1][:, inject_index:]], dim=1)

    # ---- synthesis ------------------------------------------------------------------

    def synthesis(self, w_plus: torch.Tensor, noise=None, randomize_noise: bool = True) -> torch.Tensor:
        """Synthesis network: W+ ``(N, n_latent, style_dim)`` -> image ``(N, 3, size, size)`` (about [-1, 1]).

        ``noise``: list of ``num_layers`` maps (broadcastable to ``(N, 1, r, r)``), or None for
        fresh random noise (``randomize_noise=True``) or the stored ``noises.noise_i``.
        """
        self._check_latent(w_plus, "w+", allow_plus=True)
        if w_plus.ndim != 3:
            raise ValueError(f"synthesis takes w+ of shape (N, {self.n_latent}, {self.style_dim}), received {tuple(w_plus.shape)}")
        if noise is None:
            noise = [None] * self.num_layers if randomize_noise else [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]
        elif len(noise) != self.num_layers:
            raise ValueError(f"noise must be a list of {self.num_layers} maps, received {len(noise)}")

        out = self.input(w_plus.shape[0])
        out = self.conv1(out, w_plus[:, 0], noise=noise[0])
        skip = self.to_rgb1(out, w_plus[:, 1])
        # convs[k] consumes w+ row k+1; to_rgbs[m] consumes row 2m+3 (see latent_index_modules).
        i = 1
        for conv_up, conv, noise_up, noise_same, to_rgb in zip(self.convs[::2], self.convs[1::2], noise[1::2], noise[2::2], self.to_rgbs):
            out = conv_up(out, w_plus[:, i], noise=noise_up)
            out = conv(out, w_plus[:, i + 1], noise=noise_same)
            skip = to_rgb(out, w_plus[:, i + 2], skip)
            i += 2
        return skip

    def forward(
        self,
        styles: LatentInput,
        return_latents: bool = False,
        inject_index: Optional[int] = None,
        truncation: float = 1.0,
        truncation_latent: Optional[torch.Tensor] = None,
        input_is_latent: bool = False,
        noise=None,
        randomize_noise: bool = True,
    ):
        """Generate images; same call as rosinality ``Generator.forward``.

        Args:
            styles: ``z`` ``(N, style_dim)``, or with ``input_is_latent=True`` ``w`` ``(N, style_dim)``
                or ``w+`` ``(N, n_latent, style_dim)``; a list of two for style mixing (rosinality
                passes ``[z]``; a bare tensor works too).
            others: see :meth:`to_w_plus` and :meth:`synthesis`.
        Returns:
            ``(image, w_plus_or_None)``: image ``(N, 3, size, size)`` float, nominally [-1, 1]
            (not clamped); W+ ``(N, n_latent, style_dim)`` when ``return_latents``.
        Raises:
            ValueError: latents of the wrong shape, with the expected and received shapes.
        """
        w_plus = self.to_w_plus(styles, input_is_latent=input_is_latent, truncation=truncation, truncation_latent=truncation_latent, inject_index=inject_index)
        image = self.synthesis(w_plus, noise=noise, randomize_noise=randomize_noise)
        return image, (w_plus if return_latents else None)

    # ---- layer bookkeeping (used by NADA's layer freezing) ---------------------------

    def latent_index_modules(self, index: int):
        """Names of the sub-modules that consume W+ row ``index`` in :meth:`synthesis`.

        Row 0 -> ``conv1``; row 1 -> ``to_rgb1`` and ``convs.0``; row j >= 2 -> ``convs.{j-1}``
        (if it exists), plus ``to_rgbs.{(j-3)//2}`` for odd j >= 3.
        """
        if not 0 <= index < self.n_latent:
            raise ValueError(f"W+ index must lie in [0, {self.n_latent - 1}], got {index}")
        names = []
        if index == 0:
            return ["conv1"]
        if index == 1:
            names.append("to_rgb1")
        if index - 1 < len(self.convs):
            names.append(f"convs.{index - 1}")
        if index >= 3 and index % 2 == 1:
            names.append(f"to_rgbs.{(index - 3) // 2}")
        return names

    # ---- rosinality interop ----------------------------------------------------------

    @staticmethod
    def config_from_rosinality_state_dict(state_dict) -> dict:
        """Infer ``size``, ``style_dim``, ``n_mlp``, ``channel_multiplier``, ``channel_max`` from
        the tensor shapes of a rosinality ``g_ema`` state dict.

        ``channel_multiplier`` only shows at resolutions where ``16384*cm/res < channel_max``
        (64 px and up for the 512-wide configs); where no layer reveals it, the network is
        identical for every value and 2 (config-f) is reported.
        Raises ``ValueError`` naming the missing key when the dict is not a generator.
        """
        for key in ("input.input", "conv1.conv.modulation.weight", "to_rgb1.conv.weight"):
            if key not in state_dict:
                raise UserError(
                    f"not a rosinality StyleGAN2 generator state dict: key {key!r} is missing "
                    f"(found e.g. {sorted(state_dict)[:5]}); pass checkpoint['g_ema']"
                )
        style_dim = int(state_dict["conv1.conv.modulation.weight"].shape[1])
        n_mlp = sum(1 for k in state_dict if k.startswith("style.") and k.endswith(".weight"))
        n_to_rgbs = len({k.split(".")[1] for k in state_dict if k.startswith("to_rgbs.")})
        size = 2 ** (n_to_rgbs + 2)
        channel_max = int(state_dict["input.input"].shape[1])
        channel_multiplier = None
        for i in range(3, n_to_rgbs + 3):
            res = 2**i
            width = int(state_dict[f"convs.{2 * (i - 3)}.conv.weight"].shape[1])
            if res > 32 and width < channel_max:
                channel_multiplier = max(1, round(width * res / 16384))
                break
        return dict(size=size, style_dim=style_dim, n_mlp=n_mlp, channel_multiplier=channel_multiplier or 2, channel_max=channel_max)

    @classmethod
    def from_rosinality_state_dict(cls, state_dict, **requested) -> "StyleGAN2Generator":
        """Build a generator from a rosinality ``g_ema`` state dict and load it strictly.

        Hyper-parameters are read from the tensor shapes. Any of ``size``, ``style_dim``,
        ``n_mlp``, ``channel_multiplier``, ``channel_max`` given in ``requested`` must agree with
        the checkpoint (``lr_mlp`` and ``blur_kernel`` cannot be inferred and are taken as given).

        Raises:
            ValueError: a requested hyper-parameter disagrees with the checkpoint (the message
                names it and both values), or keys/shapes still do not match (missing /
                unexpected keys listed).
        """
        inferred = cls.config_from_rosinality_state_dict(state_dict)
        evidence = {
            "size": "number of to_rgbs.* layers",
            "style_dim": "conv1.conv.modulation.weight",
            "n_mlp": "number of style.*.weight layers",
            "channel_multiplier": "widths of convs.* at 64 px and above",
            "channel_max": "input.input",
        }
        for name, value in requested.items():
            if name in inferred and value is not None and value != inferred[name]:
                if name == "channel_multiplier" and all(
                    stylegan2_channels(2**i, value, inferred["channel_max"]) == stylegan2_channels(2**i, inferred[name], inferred["channel_max"])
                    for i in range(2, inferred["size"].bit_length())
                ):
                    inferred[name] = value  # indistinguishable at this size: honour the request
                    continue
                raise UserError(
                    f"checkpoint and requested config disagree on {name}: the checkpoint has "
                    f"{name}={inferred[name]} (from {evidence[name]}) but {name}={value} was requested"
                )
        extra = {k: v for k, v in requested.items() if k not in inferred and v is not None}
        model = cls(**inferred, **extra)
        model.load_rosinality_state_dict(state_dict)
        return model

    def load_rosinality_state_dict(self, state_dict):
        """``load_state_dict(strict=True)`` with a readable error (missing / unexpected keys,
        shape mismatches, each with the layer name) instead of PyTorch's wall of text."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        wrong = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or wrong:
            parts = []
            if missing:
                parts.append(f"missing keys {missing[:6]}{' ...' if len(missing) > 6 else ''}")
            if unexpected:
                parts.append(f"unexpected keys {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
            if wrong:
                parts.append(f"shape mismatches {wrong[:4]}{' ...' if len(wrong) > 4 else ''}")
            raise UserError(f"state dict does not match a {self.size}px StyleGAN2 generator {dict(self.config)}: " + "; ".join(parts))
        self.load_state_dict(state_dict, strict=True)
        return self

    def to_rosinality_state_dict(self) -> dict:
        """The ``g_ema`` state dict in rosinality layout (a plain copy of ``state_dict()``)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()}


# --------------------------------------------------------------------------------------
# Discriminator (rosinality ``Discriminator``; only needed to *train* a generator)
# --------------------------------------------------------------------------------------


class EqualConv2d(nn.Module):
    """Conv2d with equalised learning rate. Parameters: ``weight`` ``(out, in, k, k)``, ``bias``."""

    def __init__(self, in_channel, out_channel, kernel_size, stride=1, padding=0, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channel, in_channel, kernel_size, kernel_size))
        self.scale = 1 / math.sqrt(in_channel * kernel_size**2)
        self.stride, self.padding = stride, padding
        self.bias = nn.Parameter(torch.zeros(out_channel)) if bias else None

    def forward(self, x):
        return F.conv2d(x, self.weight * self.scale, bias=self.bias, stride=self.stride, padding=self.padding)


class ConvLayer(nn.Sequential):
    """[Blur] -> EqualConv2d (stride 2 when downsampling) -> [FusedLeakyReLU], as an
    ``nn.Sequential`` so the keys are ``N.weight`` / ``N.bias`` like rosinality's."""

    def __init__(self, in_channel, out_channel, kernel_size, downsample=False, blur_kernel=(1, 3, 3, 1), bias=True, activate=True):
        layers = []
        if downsample:
            p = (len(blur_kernel) - 2) + (kernel_size - 1)
            layers.append(Blur(blur_kernel, pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(EqualConv2d(in_channel, out_channel, kernel_size, stride=stride, padding=padding, bias=bias and not activate))
        if activate:
            layers.append(FusedLeakyReLU(out_channel))
        super().__init__(*layers)


class ResBlock(nn.Module):
    """Two 3x3 convs (the second downsampling) plus a 1x1 downsampling skip, scaled by 1/sqrt(2)."""

    def __init__(self, in_channel, out_channel, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        self.conv1 = ConvLayer(in_channel, in_channel, 3, blur_kernel=blur_kernel)
        self.conv2 = ConvLayer(in_channel, out_channel, 3, downsample=True, blur_kernel=blur_kernel)
        self.skip = ConvLayer(in_channel, out_channel, 1, downsample=True, blur_kernel=blur_kernel, activate=False, bias=False)

    def forward(self, x):
        return (self.conv2(self.conv1(x)) + self.skip(x)) / SQRT_2


class StyleGAN2Discriminator(StrictConfigMixin, ModelMixin, ConfigMixin):
    """StyleGAN2 residual discriminator, rosinality ``Discriminator`` layout (``checkpoint["d"]``).

    Input ``(N, 3, size, size)`` images in [-1, 1]; output ``(N, 1)`` logits (real > fake).
    The minibatch-stddev layer groups up to 4 samples (the largest group size <= 4 that divides
    the batch, so any batch size works; rosinality needs ``N % 4 == 0`` or ``N < 4``).
    """

    @register_to_config
    def __init__(self, size: int = 256, channel_multiplier: int = 2, blur_kernel: Sequence[int] = (1, 3, 3, 1), channel_max: int = 512):
        super().__init__()
        if size < 8 or size & (size - 1):
            raise ValueError(f"size must be a power of two >= 8, got {size}")
        blur_kernel = list(blur_kernel)

        def ch(res):
            return stylegan2_channels(res, channel_multiplier, channel_max)

        log_size = int(math.log2(size))
        layers = [ConvLayer(3, ch(size), 1)]
        in_channel = ch(size)
        for i in range(log_size, 2, -1):
            out_channel = ch(2 ** (i - 1))
            layers.append(ResBlock(in_channel, out_channel, blur_kernel))
            in_channel = out_channel
        self.convs = nn.Sequential(*layers)
        self.stddev_group, self.stddev_feat = 4, 1
        self.final_conv = ConvLayer(in_channel + 1, ch(4), 3)
        self.final_linear = nn.Sequential(EqualLinear(ch(4) * 4 * 4, ch(4), activation="fused_lrelu"), EqualLinear(ch(4), 1))
        self.size = size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1:] != (3, self.size, self.size):
            raise ValueError(f"expected images of shape (N, 3, {self.size}, {self.size}), received {tuple(images.shape)}")
        out = self.convs(images)
        batch, channel, height, width = out.shape
        group = min(batch, self.stddev_group)
        while batch % group:
            group -= 1
        # Std of each feature over the group, averaged to one extra map: lets D see diversity.
        stats = out.view(group, -1, self.stddev_feat, channel // self.stddev_feat, height, width)
        stats = torch.sqrt(stats.var(0, unbiased=False) + 1e-8).mean([2, 3, 4], keepdim=True).squeeze(2)
        out = torch.cat([out, stats.repeat(group, 1, height, width)], 1)
        out = self.final_conv(out)
        return self.final_linear(out.reshape(batch, -1))


# Small generators trained with this code (not upstream configs). ``shapes32`` is the Shapes
# world's 32x32 source generator (the defaults of examples/shapes/train_stylegan2.py): 64
# channels at every scale and a 4-layer mapping network, trainable on a CPU.
SMALL_CONFIGS = {
    "shapes32": dict(size=32, style_dim=128, n_mlp=4, channel_multiplier=1, channel_max=64),
}
