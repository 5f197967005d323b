"""diffusers models (``ModelMixin, ConfigMixin``): DiffAE's semantic encoder, conditional UNet and
latent DDIM network, and the StyleGAN2 generator.

Each module's docstring gives the upstream layout it mirrors and a tiny config for tests.
"""

from .diffae_unet import DiffAEUNetModel, DiffAEUNetOutput
from .latent_net import LatentNetModel
from .semantic_encoder import SemanticEncoder
from .stylegan2 import StyleGAN2Generator
