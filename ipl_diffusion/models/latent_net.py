"""DiffAE's latent DDIM network as a diffusers model: ``(z_t, t) -> eps`` in ``z_sem`` space.

Mirrors upstream DiffAE's ``MLPSkipNet`` (``phizaz/diffae``, ``model/latentnet.py``; config
``latent_mlp_2048_norm_10layers`` used by ``ffhq256_autoenc_latent``) and the
``conds_mean``/``conds_std`` buffers of upstream's ``LitModel`` (``experiment.py``), which hold
the statistics of ``z_sem`` over the training set. The latent DDIM runs on *normalised*
``z_sem`` (upstream ``latent_znormalize=True``): sample ``z`` with this network, then
:meth:`LatentNetModel.denormalize` it before decoding with the UNet.

Upstream trains it with a constant beta schedule ``0.008`` over 1000 steps (``const0.008``);
build the matching diffusers scheduler with
``DDIMScheduler(num_train_timesteps=1000, trained_betas=[0.008] * 1000, clip_sample=False)``.

Defaults reproduce upstream exactly (54,109,696 parameters, "54.11 M"). A tiny config::

    latent_net = LatentNetModel(num_channels=32, num_hid_channels=64, num_layers=3,
                                skip_layers=(1, 2), num_time_emb_channels=16)
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .config_keys import StrictConfigMixin

__all__ = ["LatentNetModel", "LatentNetLayer"]


class LatentNetLayer(nn.Module):
    """One MLP layer (upstream ``MLPLNAct``).

    Hidden layers: ``SiLU(LayerNorm(linear(x) * (condition_bias + cond_proj(SiLU(temb)))))``;
    the last layer is a plain linear map. ``cond_proj`` is upstream's ``linear_emb`` (which
    upstream also registers a second time as ``cond_layers.1``).
    """

    def __init__(self, in_features: int, out_features: int, temb_channels: Optional[int], condition_bias: float):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.is_hidden = temb_channels is not None
        self.condition_bias = condition_bias
        if self.is_hidden:
            self.cond_proj = nn.Linear(temb_channels, out_features)
            self.norm = nn.LayerNorm(out_features)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        if not self.is_hidden:
            return x
        x = x * (self.condition_bias + self.cond_proj(F.silu(temb)))
        return F.silu(self.norm(x))


class LatentNetModel(StrictConfigMixin, ModelMixin, ConfigMixin):
    """Latent DDIM noise predictor over normalised ``z_sem`` with the normalisation statistics.

    Args (config):
        num_channels: width of ``z_sem`` (512).
        num_hid_channels: hidden width (2048).
        num_layers: number of linear layers (10); all but the last are conditioned and normed.
        skip_layers: layers whose input is concatenated with the network input ``z`` (1..9).
        num_time_emb_channels: width of the sinusoidal time features (64); the time MLP maps
            them to ``num_channels``.
        condition_bias: the ``1`` in ``x * (1 + scale)`` (upstream ``condition_bias=1``).

    Buffers ``conds_mean`` and ``conds_std`` (``(num_channels,)``, saved with the weights):
    statistics of ``z_sem`` over the training images; identity (0 and 1) until set.
    """

    @register_to_config
    def __init__(
        self,
        num_channels: int = 512,
        num_hid_channels: int = 2048,
        num_layers: int = 10,
        skip_layers: Sequence[int] = (1, 2, 3, 4, 5, 6, 7, 8, 9),
        num_time_emb_channels: int = 64,
        condition_bias: float = 1.0,
    ):
        super().__init__()
        if num_layers < 2:
            raise ValueError(f"num_layers must be at least 2; got {num_layers}")
        self.time_proj = Timesteps(num_time_emb_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(num_time_emb_channels, num_channels)
        layers = []
        for i in range(num_layers):
            last = i == num_layers - 1
            in_features = num_channels if i == 0 else num_hid_channels
            if i in skip_layers:
                in_features += num_channels
            out_features = num_channels if last else num_hid_channels
            layers.append(LatentNetLayer(in_features, out_features, None if last else num_channels, condition_bias))
        self.layers = nn.ModuleList(layers)
        self._skip = frozenset(skip_layers)
        self.register_buffer("conds_mean", torch.zeros(num_channels))
        self.register_buffer("conds_std", torch.ones(num_channels))

    def forward(self, sample: torch.Tensor, timestep: Union[torch.Tensor, float, int]) -> torch.Tensor:
        """Predict the noise in a normalised latent.

        Args:
            sample: ``z_t`` ``(B, num_channels)``, normalised ``z_sem`` plus noise.
            timestep: integer step(s) in ``[0, 1000)``: a number, 0-d or ``(B,)`` tensor.

        Returns:
            eps ``(B, num_channels)`` (a plain tensor; the latent net has no other output).
        """
        if sample.ndim != 2 or sample.shape[1] != self.config.num_channels:
            raise ValueError(f"sample must have shape (B, {self.config.num_channels}); got {tuple(sample.shape)}")
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=sample.device)
        timestep = timestep.to(sample.device).reshape(-1).expand(sample.shape[0])
        temb = self.time_embedding(self.time_proj(timestep).to(self.dtype))
        x = sample.to(self.dtype)
        h = x
        for i, layer in enumerate(self.layers):
            if i in self._skip:
                h = torch.cat([h, x], dim=1)
            h = layer(h, temb)
        return h.to(sample.dtype)

    def normalize(self, z_sem: torch.Tensor) -> torch.Tensor:
        """``(z_sem - conds_mean) / conds_std``: raw ``z_sem (B, C)`` -> latent-DDIM space."""
        return (z_sem - self.conds_mean.to(z_sem)) / self.conds_std.to(z_sem)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """``z * conds_std + conds_mean``: a sampled latent -> raw ``z_sem`` for the UNet."""
        return z * self.conds_std.to(z) + self.conds_mean.to(z)

    @torch.no_grad()
    def set_statistics(self, z_sem: torch.Tensor) -> None:
        """Set ``conds_mean/std`` from a ``(N, C)`` set of encoder outputs (upstream ``latent.pkl``)."""
        if z_sem.ndim != 2 or z_sem.shape[0] < 2:
            raise ValueError(f"need at least 2 codes of shape (N, C) to compute statistics; got {tuple(z_sem.shape)}")
        self.conds_mean.copy_(z_sem.mean(0))
        self.conds_std.copy_(z_sem.std(0))
