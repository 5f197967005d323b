"""The latent mapper ``F(w, θ)`` of IPL (Eq. 2): a latent code -> ``m`` image-specific prompt vectors.

The paper calls ``F`` "a common four-layer fully-connected network" (§3.1). The released code
(``mapper/latent_mappers.py`` of
https://github.com/Picsart-AI-Research/IPL-Zero-Shot-Generative-Model-Adaptation) makes that precise,
and we follow it:

* ``PixelNorm`` on the input (``x / sqrt(mean(x²) + 1e-8)``), no other normalisation;
* 4 *equalised-learning-rate* linear layers ``latent_dim → 512 → 512 → 512 → n_ctx·ctx_dim``
  with ``lr_mul = 0.01``: the stored weight is ``randn / lr_mul`` and is scaled by
  ``lr_mul / sqrt(in_dim)`` at run time (effective init ``N(0, 1/in_dim)``), the bias is
  stored at 0 and scaled by ``lr_mul``. This is why Adam's learning rate is 0.05 rather than
  a usual 1e-4: the effective step on the used weights is 100× smaller;
* StyleGAN's "fused" leaky ReLU, ``leaky_relu(x + b, 0.2) · √2``, after **every** layer,
  the output layer included (the reference does this; ``activate_output=False`` turns it off);
* reshape to ``(B, n_ctx, ctx_dim)``; ``ctx_dim`` = the CLIP text width ``k`` (512 for
  ViT-B/32, 768 for ViT-L/14).

The input is one latent per image: StyleGAN's ``w`` (output of the mapping network, not W+)
or DiffAE's ``z_sem``; both are 512-d in the paper.

State-dict keys are ``mapping.{1..num_layers}.weight/bias`` (index 0 is the parameter-free
PixelNorm), i.e. the reference's ``mapping.mapping.*`` keys without the outer wrapper, so a
released ``mapper.pt`` converts by stripping one prefix (:meth:`LatentMapper.from_reference_checkpoint`).
"""

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ipl_diffusion.errors import UserError
from ipl_diffusion.models.config_keys import StrictConfigMixin


class PixelNorm(nn.Module):
    """``x / sqrt(mean(x², dim=1) + 1e-8)`` (StyleGAN's input normalisation), for ``(B, C)`` inputs."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate (Karras et al.), optionally with fused leaky ReLU.

    Stored ``weight ~ N(0, 1) / lr_mul``, used as ``weight · lr_mul / sqrt(in_features)``;
    stored ``bias = bias_init / lr_mul`` (0 here), used as ``bias · lr_mul``. With ``activate``, the
    output is ``leaky_relu(x W^T + b, 0.2) · √2`` (the √2 keeps the activation variance ~1).
    """

    def __init__(self, in_features, out_features, lr_mul=1.0, activate=False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.lr_mul = lr_mul
        self.activate = activate
        self.scale = lr_mul / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.reset_parameters()

    def reset_parameters(self, generator=None):
        with torch.no_grad():
            self.weight.copy_(
                torch.randn(self.weight.shape, generator=generator, dtype=self.weight.dtype) / self.lr_mul
            )
            self.bias.zero_()

    def forward(self, x):
        out = F.linear(x, self.weight * self.scale)
        bias = self.bias * self.lr_mul
        if self.activate:
            return F.leaky_relu(out + bias, negative_slope=0.2) * math.sqrt(2)
        return out + bias

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, lr_mul={self.lr_mul}, activate={self.activate}"


class LatentMapper(StrictConfigMixin, ModelMixin, ConfigMixin):
    """IPL latent mapper ``F`` (Eq. 2): ``(B, latent_dim)`` latents -> ``(B, n_ctx, ctx_dim)`` prompt vectors.

    Args:
        latent_dim: size of the input latent (StyleGAN ``w`` or DiffAE ``z_sem``; 512).
        n_ctx: number of prompt vectors ``m`` (4 in the paper).
        ctx_dim: size ``k`` of one prompt vector = CLIP text width (512 for ViT-B/32).
        num_layers: number of fully-connected layers (4 in the paper).
        hidden_dim: width of the hidden layers (512 in the reference code).
        lr_mul: equalised-lr multiplier (0.01 in the reference code).
        activate_output: apply the fused leaky ReLU after the last layer too (reference: True).

    Saved with ``save_pretrained`` as ``config.json`` + ``diffusion_pytorch_model.safetensors``.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        latent_dim: int = 512,
        n_ctx: int = 4,
        ctx_dim: int = 512,
        num_layers: int = 4,
        hidden_dim: int = 512,
        lr_mul: float = 0.01,
        activate_output: bool = True,
    ):
        super().__init__()
        for name, value in (("latent_dim", latent_dim), ("n_ctx", n_ctx), ("ctx_dim", ctx_dim),
                            ("num_layers", num_layers), ("hidden_dim", hidden_dim)):
            if int(value) < 1:
                raise ValueError(f"LatentMapper: {name} must be a positive integer, got {value}.")
        if lr_mul <= 0:
            raise ValueError(f"LatentMapper: lr_mul must be positive, got {lr_mul}.")
        widths = [latent_dim] + [hidden_dim] * (num_layers - 1) + [n_ctx * ctx_dim]
        layers = [PixelNorm()]
        for i in range(num_layers):
            last = i == num_layers - 1
            layers.append(EqualLinear(widths[i], widths[i + 1], lr_mul=lr_mul, activate=activate_output or not last))
        self.mapping = nn.Sequential(*layers)

    def reset_parameters(self, generator=None):
        """Re-draw all weights (``N(0,1)/lr_mul``, biases 0), optionally from a ``torch.Generator`` (CPU)."""
        for layer in self.mapping:
            if isinstance(layer, EqualLinear):
                layer.reset_parameters(generator=generator)
        return self

    def forward(self, latents):
        """Map latents to prompt vectors.

        Args:
            latents: ``(B, latent_dim)`` float tensor (one ``w`` / ``z_sem`` per image).

        Returns:
            ``(B, n_ctx, ctx_dim)`` prompt vectors ``[V]^i_1..[V]^i_m`` in the mapper's dtype.

        Raises:
            ValueError: wrong rank or last dimension (W+ codes ``(B, n_latent, 512)`` must be
                reduced to one ``w`` per image first, e.g. ``w_plus[:, 0]``).
        """
        if not torch.is_tensor(latents) or latents.ndim != 2 or latents.shape[-1] != self.config.latent_dim:
            shape = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
            raise ValueError(
                f"LatentMapper expects latents of shape (B, {self.config.latent_dim}) (one w / z_sem per image), "
                f"got {shape}. For StyleGAN W+ codes pass a single w per image, e.g. w_plus[:, 0]."
            )
        weight = self.mapping[1].weight
        out = self.mapping(latents.to(device=weight.device, dtype=weight.dtype))
        return out.reshape(latents.shape[0], self.config.n_ctx, self.config.ctx_dim)

    @classmethod
    def from_reference_checkpoint(cls, path, n_ctx=4, **config):
        """Load a mapper saved by the released IPL code (``checkpoint/mapper/mapper.pt``).

        The file is a pickle ``{"m": state_dict, "m_optim": ...}`` with keys
        ``mapping.mapping.{1..4}.weight/bias``; it is read with ``torch.load(weights_only=True)``.

        Args:
            path: the ``.pt`` file.
            n_ctx: number of prompt vectors it was trained with (``ctx_dim`` is inferred).
            **config: other config overrides.

        Raises:
            ValueError: unexpected keys / shapes.
        """
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise UserError(f"{path}: expected a dict checkpoint, got {type(state).__name__}.")
        state = state.get("m", state)
        state = {k[len("mapping."):] if k.startswith("mapping.mapping.") else k: v for k, v in state.items()}
        linear_ids = sorted({int(k.split(".")[1]) for k in state if k.startswith("mapping.") and k.endswith(".weight")})
        if not linear_ids:
            raise UserError(f"{path}: no 'mapping.mapping.<i>.weight' keys; not an IPL mapper checkpoint.")
        first, last = state[f"mapping.{linear_ids[0]}.weight"], state[f"mapping.{linear_ids[-1]}.weight"]
        if last.shape[0] % n_ctx:
            raise UserError(f"{path}: output width {last.shape[0]} is not divisible by n_ctx={n_ctx}.")
        inferred = dict(
            latent_dim=first.shape[1], n_ctx=n_ctx, ctx_dim=last.shape[0] // n_ctx, num_layers=len(linear_ids),
            hidden_dim=first.shape[0],
        )
        inferred.update(config)
        model = cls(**inferred)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(f"{path}: state dict does not match LatentMapper(missing={missing}, unexpected={unexpected}).")
        return model


class SharedPromptContext(StrictConfigMixin, ModelMixin, ConfigMixin):
    """One set of prompt vectors shared by every image: CoOp's learned context ("learned" scheme)
    or a fixed phrase's token embeddings (NADA's "a photo of a", "manual" scheme).

    It has the mapper's call signature, ``(B, latent_dim) -> (B, n_ctx, ctx_dim)``, ignoring the
    latent values, so Stage 1/Stage 2 code treats all prompt schemes alike.

    Args:
        n_ctx: number of prompt vectors ``m``.
        ctx_dim: size ``k`` of a prompt vector (CLIP text width).
        latent_dim: expected latent size, checked so that misuse fails like the mapper's
            (``None`` skips the check).
        init_std: std of the random init (CoOp: 0.02) when no initial vectors are loaded.

    The parameter is named ``ctx`` as in CoOp's prompt learner.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, n_ctx: int = 4, ctx_dim: int = 512, latent_dim: int = None, init_std: float = 0.02):
        super().__init__()
        if int(n_ctx) < 1 or int(ctx_dim) < 1:
            raise ValueError(f"SharedPromptContext: n_ctx and ctx_dim must be positive, got {n_ctx}, {ctx_dim}.")
        self.ctx = nn.Parameter(torch.randn(n_ctx, ctx_dim) * init_std)

    @classmethod
    def from_vectors(cls, vectors, latent_dim=None):
        """A context initialised with ``vectors`` ``(m, k)`` (e.g. a phrase's token embeddings)."""
        if not torch.is_tensor(vectors) or vectors.ndim != 2:
            raise ValueError(f"vectors must be an (m, k) tensor, got {getattr(vectors, 'shape', vectors)}.")
        module = cls(n_ctx=vectors.shape[0], ctx_dim=vectors.shape[1], latent_dim=latent_dim)
        with torch.no_grad():
            module.ctx.copy_(vectors.detach().to(module.ctx.dtype).cpu())
        return module.to(vectors.device)

    def forward(self, latents):
        """``(B, latent_dim)`` -> ``(B, n_ctx, ctx_dim)``: the shared vectors repeated ``B`` times.

        Raises:
            ValueError: ``latents`` is not ``(B, latent_dim)``.
        """
        latent_dim = self.config.latent_dim
        if not torch.is_tensor(latents) or latents.ndim != 2 or (latent_dim and latents.shape[-1] != latent_dim):
            shape = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
            raise ValueError(f"SharedPromptContext expects latents of shape (B, {latent_dim or 'latent_dim'}), got {shape}.")
        return self.ctx.unsqueeze(0).expand(latents.shape[0], -1, -1)


__all__ = ["LatentMapper", "SharedPromptContext", "EqualLinear", "PixelNorm"]
