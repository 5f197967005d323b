"""ipl-diffusion: zero-shot generative model adaptation with Image-specific Prompt Learning.

Public names are imported lazily so that ``import ipl_diffusion`` stays cheap and the
pipelines (``ipl_diffusion.pipelines``, whose files live in the repository's top-level
``pipelines/`` folder; ``ipl_diffusion/pipelines`` links to it) never form an
import cycle.
"""

import importlib

__version__ = "0.1.0"

# name -> module that defines it
_LAZY = {
    "LatentMapper": "ipl_diffusion.mapper",
    "CLIPPromptEncoder": "ipl_diffusion.clip_text",
    "DiffAEPipeline": "ipl_diffusion.pipelines.pipeline_diffae",
    "IPLPipeline": "ipl_diffusion.pipelines.pipeline_ipl",
    "StyleGANIPLPipeline": "ipl_diffusion.pipelines.pipeline_stylegan_ipl",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ipl_diffusion' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
